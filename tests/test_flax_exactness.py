"""Options and dtypes of the Flax entry points (linen and NNX) against the reference.

The plain kernel of every registry model, with every ``implementation``, and the
descriptors' dtypes are checked by ``test_registry.py``; this file checks what
is specific to the Flax entry points
(``ntklayers.flax.ntk_fn(module)(variables, x1, x2, **apply_kwargs)`` and
``ntklayers.flax.nnx.ntk_fn()(model, x1, x2)``): ``layerwise`` keys (the Flax
module paths), ``trace_axes``, ``diagonal_axes``, ``trainable`` and float32,
against ``reference.py`` (``jax.jacrev`` of the same ``f(params, x)`` and NumPy).

Tolerances are ``reference.TOL64`` (float64, ``rel_err <= 1e-10``) and
``reference.TOL32`` (float32 against the float64 reference of the *same*
parameters and inputs upcast to float64).

Cost: compilation dominates (each kernel is one program). Options use
``implementation="auto"``; the heaviest combinations are ``@pytest.mark.slow``
(see ``FAST_OPTIONS``).
"""

from __future__ import annotations


import jax
import jax.numpy as jnp
import numpy as np
import pytest

import models_flax
from reference import (TOL32, TOL64, apply_axes, assert_rel_close, batch_jacobians,
                       flat_jacobian, full_kernel, mask_columns)

# Library bugs: {model name: reason}, run as strict xfails so that a fix is noticed.
# (Empty: "nnx_batchnorm_train" failed with flax's TraceContextError until
# ntklayers/flax/_nnx_kernel.py created the merged model's Variables inside `f`.)
KNOWN_BUGS: dict[str, str] = {}

# What runs by default (compilation of the attention and conv models costs
# seconds each on CPU); everything else is @pytest.mark.slow:
# * layerwise: every model (its keys are the Flax-specific part);
# * trace/diagonal/trainable: one model per Flax feature: linen apply kwargs +
#   mutable + samples that interact (linen_batchnorm_train), integer tokens
#   (linen_embed), plain NNX modules (nnx_mixed_plain), the (graphdef, params,
#   *states) form with BatchStat state (nnx_batchnorm_eval).
FAST_OPTIONS = {"linen_batchnorm_train", "linen_embed", "nnx_mixed_plain",
                "nnx_batchnorm_eval",
                # issue #6 classes (models_classes.py): one per class and framework
                "linen_c1_tied_variables", "nnx_c1_tied", "linen_c2_prototypes",
                "nnx_c2_permuted", "linen_c3_center", "nnx_c3_batch_attention"}
MODELS = models_flax.FLAX_MODELS + models_flax.CLASS_MODELS


def _params(models=MODELS, slow=lambda m: m.slow):
  out = []
  for m in models:
    marks = [pytest.mark.slow] if slow(m) else []
    if m.name in KNOWN_BUGS:
      marks.append(pytest.mark.xfail(strict=True, reason=KNOWN_BUGS[m.name]))
    out.append(pytest.param(m, id=m.name, marks=marks))
  return out


# Layerwise blocks of the scanned attention stack and the normalization zoo compile
# for many seconds: slow suite only (their full kernels run in test_registry).
_HEAVY_LAYERWISE = {"linen_scanned_blocks", "linen_norms_dropin", "linen_norms_dropin_train",
                    "nnx_norms_dropin", "nnx_norms_dropin_train"}
ALL = _params(slow=lambda m: m.slow or m.name in _HEAVY_LAYERWISE)
OPTIONS = _params(slow=lambda m: m.slow or m.name not in FAST_OPTIONS)


# ------------------------------------------------------------ trainable ---


def _is_bias(path) -> bool:
  return any(isinstance(k, jax.tree_util.DictKey) and k.key == "bias" for k in path)


def no_biases(params):
  """Callable ``trainable`` mask (linen dicts and ``nnx.State`` alike): no ``bias``."""
  return jax.tree_util.tree_map_with_path(lambda path, _: not _is_bias(path), params)


# ------------------------------------------------------------ reference ---


def jacobians(name: str):
  """Reference Jacobians ``(J(x1), J(x2))`` (all leaves) of model ``name`` in float64,
  cached per process (shared with ``test_registry``)."""
  model, built = models_flax.BY_NAME[name], models_flax.build(name)
  return batch_jacobians(built.f, built.params, built.x1, built.x2,
                         coupled=model.coupled, cache_key=name)


def reference(name: str, *, same: bool = False, trace_axes=(), diagonal_axes=(),
              mask=None) -> np.ndarray:
  j1, j2 = jacobians(name)
  if mask is not None:
    cols = mask_columns(models_flax.build(name).params, mask)
    j1, j2 = j1[..., cols], j2[..., cols]
  full = full_kernel(j1, j1 if same else j2)
  return apply_axes(full, j1.ndim - 1, trace_axes, diagonal_axes)


def kernel(name: str, *, same: bool = False, dtype=jnp.float64, **options):
  built = models_flax.build(name, dtype)
  with models_flax.models.expect_fallback_warning(models_flax.BY_NAME[name]):
    return built.ntk_fn(**options)(built.x1, None if same else built.x2)


# ----------------------------------------------------------------- tests ---


@pytest.mark.parametrize("model", ALL)
def test_layerwise_keys_and_sum(model):
  """Keys are the Flax module paths (linen ``Dense_0``, ``.../query``; NNX
  ``layers/0``, ``att/query``), plain modules included; values sum to the kernel."""
  blocks = kernel(model.name, layerwise=True)
  built = models_flax.build(model.name)
  assert isinstance(blocks, dict)
  assert sorted(blocks) == sorted(built.layer_names)
  ref = reference(model.name)
  for v in blocks.values():
    assert v.shape == ref.shape
  assert_rel_close(sum(blocks.values()), ref, TOL64)


@pytest.mark.parametrize("model", OPTIONS)
def test_trace_last_axis(model):
  k = kernel(model.name, trace_axes=(-1,))
  ref = reference(model.name, trace_axes=(-1,))
  assert k.shape == ref.shape
  assert_rel_close(k, ref, TOL64)


@pytest.mark.parametrize("model", OPTIONS)
def test_diagonal_batch_axis(model):
  k = kernel(model.name, same=True, diagonal_axes=(0,))
  ref = reference(model.name, same=True, diagonal_axes=(0,))
  assert k.shape == ref.shape and k.shape[0] == models_flax.models.N1
  assert_rel_close(k, ref, TOL64)


@pytest.mark.parametrize("model", OPTIONS)
def test_trainable_callable_without_biases(model):
  params = models_flax.build(model.name).params
  mask = no_biases(params)
  n_frozen = sum(not m for m in jax.tree.leaves(mask))
  assert 0 < n_frozen < len(jax.tree.leaves(params))
  k = kernel(model.name, trainable=no_biases)
  assert_rel_close(k, reference(model.name, mask=mask), TOL64)


@pytest.mark.parametrize("case", [dict(trace_axes=(0,)), dict(trace_axes=(0, -1)),
                                  dict(trace_axes=(0,), diagonal_axes=(-1,))],
                         ids=["trace0", "trace0-1", "trace0-diag-1"])
@pytest.mark.parametrize("name", ["linen_mlp", "nnx_mlp"])
def test_trace_batch_axis_rank2(name, case):
  """Issue #6, class 5: the batch axis of [N, O] outputs traced (x2 = x1)."""
  k = kernel(name, same=True, **case)
  ref = reference(name, same=True, **case)
  assert k.shape == ref.shape
  assert_rel_close(k, ref, TOL64)


FLOAT32_CASES = [("linen_mlp", "auto"), ("nnx_mlp", "structured"),
                 pytest.param("linen_cnn", "auto", marks=pytest.mark.slow),
                 pytest.param("nnx_transformer", "auto", marks=pytest.mark.slow)]


@pytest.mark.parametrize("name, implementation", FLOAT32_CASES)
def test_float32_within_tolerance(name, implementation):
  built32 = models_flax.build(name, jnp.float32)
  for leaf in jax.tree.leaves((built32.params, built32.x1)):
    assert leaf.dtype == jnp.float32, leaf.dtype
  k = kernel(name, dtype=jnp.float32, implementation=implementation)
  assert k.dtype == jnp.float32

  def up(tree):
    return jax.tree.map(lambda a: a.astype(jnp.float64), tree)

  j1 = flat_jacobian(built32.f, up(built32.params), up(built32.x1))
  j2 = flat_jacobian(built32.f, up(built32.params), up(built32.x2))
  ref = apply_axes(full_kernel(j1, j2), j1.ndim - 1)
  assert_rel_close(k, ref, TOL32)
  # Not vacuous: float32 really differs from float64 (here ~1e-7).
  assert np.max(np.abs(np.asarray(k, np.float64) - ref)) > 0
