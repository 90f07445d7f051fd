"""Exactness of every model of the shared registry, in every framework (one suite).

Every descriptor of ``models.registry()`` (Haiku, linen, NNX and the classes of
issue #6) is built once (``models.build`` / ``models_flax.build`` are cached) and
its kernel, through the framework's own entry point and every
``implementation``, is compared with the independent reference of
``reference.py`` (``jax.jacrev`` of the whole batch and NumPy) in float64, to
``reference.TOL64``:

* Haiku: ``ntklayers.ntk_fn(f)(params, x1, x2)``;
* linen: ``ntklayers.flax.ntk_fn(module)(variables, x1, x2, **apply_kwargs)``;
* NNX: ``ntklayers.flax.nnx.ntk_fn()(model, x1, x2)``;
* the stock-layer models of ``models_stock`` (Haiku, plain JAX, linen, NNX,
  Equinox): their framework's entry point (``ntklayers.equinox.ntk_fn()(model,
  x1, x2)`` for Equinox, ``ntklayers.ntk_fn(f)`` for Haiku and plain JAX).

Descriptor fields are honoured: ``coupled`` models are differentiated one whole
batch at a time by the reference; ``warning`` / ``fallback_warning`` say which
ntklayers warnings the model may emit (any other warning is an error, see
pyproject.toml); ``slow`` models are ``@pytest.mark.slow``.

Options (``layerwise``, ``trace_axes``, ``diagonal_axes``, ``trainable``) and
float32 are checked per framework in ``test_exactness.py`` and
``test_flax_exactness.py``.

Cost: compilation dominates (one program per model and implementation, plus one
reference Jacobian per model, shared through ``reference.batch_jacobians``'
cache with those files). The heaviest combinations (``HEAVY``) run in the slow
suite only.
"""

from __future__ import annotations

import collections
import warnings

import jax
import jax.numpy as jnp
import models
import models_flax
import models_stock
import numpy as np
import pytest
from reference import (IMPLEMENTATIONS, TOL64, apply_axes, assert_rel_close, batch_jacobians,
                       full_kernel)

import ntklayers

REGISTRY = models.registry(stock=True)
STOCK = frozenset(m.name for m in models_stock.stock_models())

# {model name: implementations that run in the slow suite only}: the attention,
# conv and normalization models whose every implementation compiles for seconds on
# CPU. Their "auto" kernel always runs by default, except for the descriptors
# marked slow; the generic implementations are also fuzzed (test_fuzz).
HEAVY: dict[str, tuple[str, ...]] = {
    "linen_transformer": ("structured", "ntk_vp", "jacobian"),
    "nnx_transformer": ("structured", "ntk_vp", "jacobian"),
    "linen_scanned_blocks": ("structured", "ntk_vp", "jacobian"),
    "scanned_blocks": ("structured", "ntk_vp", "jacobian"),
    "linen_cnn": ("structured", "ntk_vp", "jacobian"),
    "nnx_cnn": ("structured", "ntk_vp", "jacobian"),
    "cnn2d": ("structured", "ntk_vp", "jacobian"),
    "conv3d": ("structured", "ntk_vp", "jacobian"),
    "linen_norms_dropin": ("structured", "ntk_vp", "jacobian"),
    "nnx_norms_dropin": ("structured", "ntk_vp", "jacobian"),
}


def framework(model: models.ModelDescriptor) -> str:
  return getattr(model, "framework", "haiku")


def build(model: models.ModelDescriptor) -> models.Built:
  """The cached float64 build of ``model`` (any framework)."""
  if model.name in STOCK:
    return models_stock.build(model.name)
  if framework(model) == "haiku":
    return models.build(model.name)
  return models_flax.build(model.name)


def kernel(model: models.ModelDescriptor, implementation: str):
  """The plain kernel of ``model`` on ``(x1, x2)`` through its framework's entry point."""
  built = build(model)
  with models.expect_fallback_warning(model):
    if framework(model) == "haiku" and model.name not in STOCK:
      return ntklayers.ntk_fn(built.f, implementation=implementation)(
          built.params, built.x1, built.x2)
    return built.ntk_fn(implementation=implementation)(built.x1, built.x2)


def reference(model: models.ModelDescriptor) -> np.ndarray:
  """``[N1, N2, *rest, *rest]`` reference kernel (NT layout) of ``model`` in float64."""
  built = build(model)
  with models.expect_fallback_warning(model):
    j1, j2 = batch_jacobians(built.f, built.params, built.x1, built.x2,
                             coupled=model.coupled, cache_key=model.name)
  return apply_axes(full_kernel(j1, j2), j1.ndim - 1)


# The generic whole-model implementations do not depend on the layers, and
# "structured" differs from "auto" only in the route of fallback parameters, so the
# default suite runs those three on these representatives only (every model in the
# slow suite, and random models in test_fuzz); "auto" runs on all.
GENERIC_DEFAULT = frozenset({
    "mlp_relu", "mlp_mixed_hk_linear", "batchnorm_train", "embed_tokens", "weight_shared",
    "scan_rnn", "linen_mlp", "linen_mixed_plain", "linen_batchnorm_train", "nnx_mlp",
    "nnx_mixed_plain", "nnx_batchnorm_train", "c1_tied_params_dict", "layernorm_variants",
    "cross_attention_mask"})

# The stock-layer models (models_stock) whose "auto" kernel runs in the default
# suite, each for what it adds: Equinox's vmapped per-example layers (weights
# [out, in]), a plain lax.conv_general_dilated CNN, and a plain table[ids] gather
# with x @ w + b layers (about 11 s on one core). Every other stock model and
# implementation runs in the slow suite.
STOCK_DEFAULT = frozenset({"equinox_stock_mlp", "jax_stock_cnn", "jax_stock_embed"})


def _slow_stock(m: models.ModelDescriptor) -> bool:
  return m.name in STOCK and m.name not in STOCK_DEFAULT


def _params():
  out = []
  for m in REGISTRY:
    for impl in IMPLEMENTATIONS:
      generic = impl != "auto" and m.name not in GENERIC_DEFAULT
      slow = m.slow or generic or impl in HEAVY.get(m.name, ()) or _slow_stock(m)
      # The generic routes of the non-representative models: the full matrix
      # (``-m bench``), not CI's slow tier (the representatives and the fuzzer cover them).
      marks = ([pytest.mark.slow, pytest.mark.bench] if generic else
               [pytest.mark.slow] if slow else [])
      out.append(pytest.param(m, impl, id=f"{m.name}-{impl}", marks=marks))
  return out


# ------------------------------------------------------------- registry ---


def test_registry_names_unique_and_complete():
  names = [m.name for m in REGISTRY]
  dupes = [n for n, c in collections.Counter(names).items() if c > 1]
  assert not dupes, f"registry names must be unique: {dupes}"
  assert set(models.BY_NAME) | set(models_flax.BY_NAME) | STOCK == set(names)
  assert set(HEAVY) <= set(names), set(HEAVY) - set(names)
  assert STOCK_DEFAULT <= STOCK, STOCK_DEFAULT - STOCK
  assert {framework(m) for m in REGISTRY} == {"haiku", "linen", "nnx", "equinox", "jax"}


@pytest.mark.parametrize("model", [
    pytest.param(m, id=m.name, marks=[pytest.mark.slow] if _slow_stock(m) else [])
    for m in REGISTRY])
def test_descriptor_builds_float64(model):
  """Every descriptor builds float64 parameters (``param_dtype`` reached every Flax
  layer: linen/NNX default to float32) and inputs of its declared shapes."""
  built = build(model)
  assert isinstance(built, models.Built) and len(built) == 4
  if framework(model) != "haiku":
    assert built.framework == model.framework == model.name.split("_")[0]
  for leaf in jax.tree.leaves(built.params):
    assert leaf.dtype == jnp.float64, (model.name, leaf.dtype)
  expected = jnp.int32 if model.int_inputs else jnp.float64
  shapes = jax.tree.leaves(model.x_shape, is_leaf=lambda s: isinstance(s, tuple))
  for x, n in ((built.x1, models.N1), (built.x2, models.N2)):
    assert len(jax.tree.leaves(x)) == len(shapes)
    for leaf, shape in zip(jax.tree.leaves(x), shapes):
      assert leaf.dtype == expected, (model.name, leaf.dtype)
      assert leaf.shape == (n, *shape)
  with models.expect_fallback_warning(model):
    out = jax.eval_shape(built.f, built.params, built.x1)
  assert out.ndim == model.out_rank


# ------------------------------------------------------------ exactness ---


@pytest.mark.parametrize("model, implementation", _params())
def test_kernel_matches_reference(model, implementation):
  k = kernel(model, implementation)
  ref = reference(model)
  assert k.shape == ref.shape
  assert k.dtype == jnp.float64
  assert_rel_close(k, ref, TOL64)


# ------------------------------------------------------------ structure ---


def _structured_params():
  """The descriptors marked ``expect_structured``, and a sanity case of the check
  itself: a drop-in MLP (structured)."""
  marked = [pytest.param(m.name, id=m.name, marks=[pytest.mark.slow] if m.slow else [])
            for m in REGISTRY if m.expect_structured]
  return marked + [pytest.param("mlp_relu", id="sanity-dropins")]


def _fallback_groups(f, params, x1, x2, model=None) -> tuple[str, ...]:
  kernel_fn = ntklayers.ntk_fn(f)
  with warnings.catch_warnings():
    warnings.filterwarnings("ignore", message=models.NTKLAYERS_WARNING)
    kernel_fn(params, x1, x2)
  return kernel_fn.fallback


@pytest.mark.parametrize("name", _structured_params())
def test_structure_as_expected(name):
  """A model marked ``expect_structured`` leaves no parameter to the fallback under
  ``implementation="auto"`` (checked through ``ntklayers.ntk_fn(f)`` on the build's
  ``f`` and ``params``, the same traced program as the framework's entry point; for
  Haiku and plain JAX models the kernel compiled by the test above)."""
  built = build({m.name: m for m in REGISTRY}[name])
  assert _fallback_groups(built.f, built.params, built.x1, built.x2) == ()


def test_structure_check_sees_the_fallback():
  """The check above can fail: a weight used through ``tanh`` is on the fallback."""
  x = jnp.asarray(np.ones((2, 3)))
  params = {"lin": {"w": jnp.asarray(np.ones((3, 2)))}}
  assert _fallback_groups(lambda p, x: x @ jnp.tanh(p["lin"]["w"]), params, x, x) == ("lin",)
