"""Options and dtypes of the Haiku entry point against the independent reference.

The plain kernel of every registry model (Haiku, linen, NNX), with every
``implementation``, is checked by ``test_registry.py``; this file checks the
options on the Haiku models (``layerwise``, ``trace_axes``, ``diagonal_axes``,
``trainable``, the batch axis on outputs of every rank) with
``implementation="auto"`` on every model, a few option x implementation spot
checks, and float32.

Tolerances are ``reference.TOL64`` (float64: ``rel_err <= 1e-10``, where
``rel_err = max|K - K_ref| / max|K_ref|``) and ``reference.TOL32`` (float32: the
kernel against the float64 reference of the *same* parameters and inputs upcast
to float64). ``TOL32`` holds for well-conditioned models only:
``batchnorm_train`` (batch statistics of 3 examples) is left out, since there
even the float32 *reference* is 1.6e-4 away from the float64 one.
"""

from __future__ import annotations

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import models
import ntklayers
from reference import (TOL32, TOL64, apply_axes, assert_rel_close, batch_jacobians,
                       full_kernel, mask_columns, reference_ntk)

# ------------------------------------------------------------ trainable ---


def no_biases(params):
  """Callable ``trainable`` mask: every leaf except Haiku biases named ``b``."""
  return hk.data_structures.map(lambda module, name, value: name != "b", params)


def excluded_module(name: str) -> str:
  """The module frozen by the "exclude one layer" mask of model ``name``."""
  params = models.build(name).params
  return "shared" if "shared" in params else sorted(params)[0]


def exclude_one_module(name: str):
  """Prefix-tree ``trainable`` mask ``{module: bool}`` freezing one module."""
  frozen = excluded_module(name)
  return {m: m != frozen for m in models.build(name).params}


MASKS = {
    None: lambda name: None,
    "no_biases": lambda name: no_biases,
    "exclude_one": exclude_one_module,
}


def full_mask(params, trainable):
  """Our own expansion of a ``trainable`` mask to one bool per leaf."""
  if trainable is None:
    return None
  mask = trainable(params) if callable(trainable) else trainable
  return {m: {n: bool(mask[m]) if isinstance(mask[m], bool) else bool(mask[m][n])
              for n in params[m]} for m in params}


def trainable_modules(params, trainable) -> set[str]:
  mask = full_mask(params, trainable)
  if mask is None:
    return set(params)
  return {m for m in params if any(mask[m].values())}


# ------------------------------------------------------------ reference ---


def model_jacobians(model, f, params, x1, x2, cache_key=None):
  """``reference.batch_jacobians`` of a registry model (its warnings tolerated)."""
  with models.expect_fallback_warning(model):
    return batch_jacobians(f, params, x1, x2, coupled=model.coupled, cache_key=cache_key)


def jacobians(name: str):
  """Reference Jacobians of model ``name`` in float64, cached per process (shared
  with ``test_registry``); masked references select columns (``mask_columns``)."""
  built = models.build(name)
  return model_jacobians(models.BY_NAME[name], built.f, built.params, built.x1, built.x2,
                         cache_key=name)


def reference(name: str, *, same: bool = False, trace_axes=(), diagonal_axes=(),
              mask_kind: str | None = None) -> np.ndarray:
  j1, j2 = jacobians(name)
  built = models.build(name)
  mask = full_mask(built.params, MASKS[mask_kind](name))
  if mask is not None:
    cols = mask_columns(built.params, mask)
    j1, j2 = j1[..., cols], j2[..., cols]
  full = full_kernel(j1, j1 if same else j2)
  return apply_axes(full, j1.ndim - 1, trace_axes, diagonal_axes)


def kernel(model, *, same: bool = False, dtype=jnp.float64, **options):
  built = models.build(model.name, dtype)
  with models.expect_fallback_warning(model):
    fn = ntklayers.ntk_fn(built.f, **options)
    return fn(built.params, built.x1, None if same else built.x2)


# The option checks (layerwise, axes, masks) run on the class models of issue #6
# in the slow suite only; their plain kernels (every implementation, in
# test_registry), the batch axis on every rank and the fuzzer cover them in the
# default suite.
# Models whose option checks compile for many seconds (scans of attention blocks,
# 3-D and strided convolutions) also run them in the slow suite only.
_HEAVY_OPTIONS = {"scanned_blocks", "layer_stack", "scan_rnn", "conv3d", "cnn2d",
                  "cross_attention_mask"}
OPTIONS = (models.model_params([m for m in models.MODELS if m.name not in _HEAVY_OPTIONS])
           + models.model_params([m for m in models.MODELS if m.name in _HEAVY_OPTIONS],
                                 slow=True)
           + models.model_params(models.CLASS_MODELS, slow=True))


# -------------------------------------------------------- reference self-checks ---


def test_reference_linear_model_closed_form():
  """For ``f(x) = x @ w + b``: ``K[n1, n2, o1, o2] = (x1 . x2 + 1) delta(o1, o2)``."""
  rng = np.random.default_rng(0)
  params = {"w": jnp.asarray(rng.normal(size=(4, 3))), "b": jnp.asarray(rng.normal(size=3))}
  x1, x2 = jnp.asarray(rng.normal(size=(3, 4))), jnp.asarray(rng.normal(size=(2, 4)))
  f = lambda p, x: x @ p["w"] + p["b"][None]
  expected = np.einsum("ai,bi->ab", x1, x2)[:, :, None, None] + 1.0
  expected = expected * np.eye(3)
  np.testing.assert_allclose(reference_ntk(f, params, x1, x2), expected, rtol=1e-12)
  np.testing.assert_allclose(reference_ntk(f, params, x1, x2, trace_axes=(-1,)),
                             expected.trace(axis1=2, axis2=3) / 3, rtol=1e-12)
  only_w = reference_ntk(f, params, x1, x2, mask={"w": True, "b": False})
  np.testing.assert_allclose(only_w, expected - np.eye(3), rtol=1e-12, atol=1e-12)


def test_reference_axes_against_loops():
  """``apply_axes`` against explicit loops on a random [2,3,4] x [2,3,4] kernel."""
  rng = np.random.default_rng(1)
  full = rng.normal(size=(2, 3, 4, 2, 3, 4))
  # trace axis 2, diagonal axis 0, keep axis 1: [N, A1, A2]
  out = apply_axes(full, 3, trace_axes=(-1,), diagonal_axes=(0,))
  loops = np.zeros((2, 3, 3))
  for n in range(2):
    for a1 in range(3):
      for a2 in range(3):
        loops[n, a1, a2] = sum(full[n, a1, c, n, a2, c] for c in range(4)) / 4
  np.testing.assert_allclose(out, loops, rtol=1e-12)
  # no options: [N1, N2, A1, A2, C1, C2]
  np.testing.assert_array_equal(apply_axes(full, 3),
                                full.transpose(0, 3, 1, 4, 2, 5))
  # diagonal on axis 1 only: [N1, N2, A, C1, C2]
  out = apply_axes(full, 3, diagonal_axes=(1,))
  assert out.shape == (2, 2, 3, 4, 4)
  np.testing.assert_array_equal(out[1, 0, 2, 3, 1], full[1, 2, 3, 0, 2, 1])


# ----------------------------------------------------- options, "auto" only ---


@pytest.mark.parametrize("model", OPTIONS)
def test_layerwise_sums_to_reference(model):
  blocks = kernel(model, layerwise=True)
  params = models.build(model.name).params
  assert isinstance(blocks, dict)
  assert set(blocks) == set(params), "layerwise keys must be the module names"
  ref = reference(model.name)
  for v in blocks.values():
    assert v.shape == ref.shape
  assert_rel_close(sum(blocks.values()), ref, TOL64)


@pytest.mark.parametrize("model", OPTIONS)
def test_trace_last_axis(model):
  same = model.out_rank == 1  # [N] outputs: the last axis is the batch axis
  k = kernel(model, same=same, trace_axes=(-1,))
  ref = reference(model.name, same=same, trace_axes=(-1,))
  assert k.shape == ref.shape
  assert_rel_close(k, ref, TOL64)


@pytest.mark.parametrize("model", OPTIONS)
def test_diagonal_batch_axis(model):
  k = kernel(model, same=True, diagonal_axes=(0,))
  ref = reference(model.name, same=True, diagonal_axes=(0,))
  assert k.shape == ref.shape and k.shape[0] == models.N1
  assert_rel_close(k, ref, TOL64)


@pytest.mark.parametrize("model", OPTIONS)
def test_trainable_callable_without_biases(model):
  k = kernel(model, trainable=no_biases)
  ref = reference(model.name, mask_kind="no_biases")
  assert_rel_close(k, ref, TOL64)


@pytest.mark.parametrize("model", OPTIONS)
def test_trainable_prefix_tree_excluding_one_module(model):
  trainable = exclude_one_module(model.name)
  blocks = kernel(model, trainable=trainable, layerwise=True)
  params = models.build(model.name).params
  assert set(blocks) == trainable_modules(params, trainable)
  assert excluded_module(model.name) not in blocks
  ref = reference(model.name, mask_kind="exclude_one")
  assert_rel_close(sum(blocks.values()), ref, TOL64)


# Trace/diagonal axes on outputs of every rank, the batch axis included (issue #6,
# class 5: tracing the batch axis of [N, O] outputs was wrong). Cases that trace or
# diagonalize axis 0 compare x1 with itself (N1 == N2).
AXES_CASES = {
    1: [dict(trace_axes=(0,)), dict(diagonal_axes=(0,))],
    2: [dict(trace_axes=(0,)), dict(trace_axes=(0, -1)), dict(trace_axes=(-1,)),
        dict(diagonal_axes=(0,)), dict(diagonal_axes=(-1,)), dict(diagonal_axes=(0, 1)),
        dict(trace_axes=(-1,), diagonal_axes=(0,)), dict(trace_axes=(0,), diagonal_axes=(-1,))],
    3: [dict(trace_axes=(1,)), dict(diagonal_axes=(1,)),
        dict(diagonal_axes=(-1,), trace_axes=(1,)), dict(trace_axes=(-1,), diagonal_axes=(0,)),
        dict(trace_axes=(0, 1)), dict(diagonal_axes=(0, 1, 2)), dict(trace_axes=(0,)),
        dict(trace_axes=(0, -1)), dict(diagonal_axes=(-1,)),
        dict(trace_axes=(0,), diagonal_axes=(-1,))],
    4: [dict(trace_axes=(0,)), dict(trace_axes=(0, -1)), dict(diagonal_axes=(0,)),
        dict(trace_axes=(1, 2)), dict(trace_axes=(-1,), diagonal_axes=(0,)),
        dict(trace_axes=(0,), diagonal_axes=(1,))],
}
AXES_MODELS = ["c5_rank1", "c5_mlp_rank2", "mlp_mixed_hk_linear", "batchnorm_train",
               "conv1d_seq", "layernorm_variants", "transformer", "c5_rank4_conv"]
assert {models.BY_NAME[n].out_rank for n in AXES_MODELS} == set(AXES_CASES)


def _case_id(case) -> str:
  return "-".join(f"{k}{v}" for k, v in sorted(case.items())).replace(" ", "")


def _uses_batch_axis(case) -> bool:
  return 0 in case.get("trace_axes", ()) + case.get("diagonal_axes", ())


def _axes_params():
  out = []
  for p in models.model_params([models.BY_NAME[n] for n in AXES_MODELS]):
    (m,) = p.values
    out += [pytest.param(m, c, id=f"{m.name}-{_case_id(c)}", marks=p.marks)
            for c in AXES_CASES[m.out_rank]]
  return out


@pytest.mark.parametrize("model, case", _axes_params())
def test_axes_every_rank(model, case):
  same = _uses_batch_axis(case)
  k = kernel(model, same=same, **case)
  ref = reference(model.name, same=same, **case)
  assert k.shape == ref.shape
  assert_rel_close(k, ref, TOL64)


BATCH_AXIS_CASES = [dict(trace_axes=(0,)), dict(trace_axes=(0, -1)), dict(diagonal_axes=(0,))]


@pytest.mark.parametrize("implementation", ["structured", "ntk_vp", "jacobian"])
@pytest.mark.parametrize("name, case", [
    pytest.param(n, c, id=f"{n}-{_case_id(c)}") for n in ("c5_mlp_rank2", "c5_rank1")
    for c in BATCH_AXIS_CASES if models.BY_NAME[n].out_rank > 1 or len(
        c.get("trace_axes", ())) < 2])
def test_batch_axis_every_implementation(name, case, implementation):
  k = kernel(models.BY_NAME[name], same=True, implementation=implementation, **case)
  assert_rel_close(k, reference(name, same=True, **case), TOL64)


@pytest.mark.parametrize("case", BATCH_AXIS_CASES, ids=_case_id)
@pytest.mark.parametrize("name", ["c5_mlp_rank2", "conv1d_seq", "c3_center"])
def test_batch_axis_distinct_x2_of_same_size(name, case):
  """Traced/diagonal batch axis with ``x2 != x1`` and ``N2 == N1``."""
  model, built = models.BY_NAME[name], models.build(name)
  x2 = jax.tree.map(lambda a: 0.7 * a[::-1] + 0.1, built.x1)
  with models.expect_fallback_warning(model):
    k = ntklayers.ntk_fn(built.f, **case)(built.params, built.x1, x2)
  j1, j2 = model_jacobians(model, built.f, built.params, built.x1, x2)
  assert_rel_close(k, apply_axes(full_kernel(j1, j2), j1.ndim - 1, **case), TOL64)


# ----------------------------------------- option x implementation spot checks ---

SPOT_MODELS = ["cross_attention_mask", "mlp_mixed_hk_linear", "batchnorm_train",
               "scan_rnn", "weight_shared"]


@pytest.mark.parametrize("implementation", ["structured", "ntk_vp", "jacobian"])
@pytest.mark.parametrize("name", SPOT_MODELS)
def test_spot_layerwise_trace_trainable(name, implementation):
  """``layerwise`` + ``trace_axes`` + a callable ``trainable`` at once."""
  model = models.BY_NAME[name]
  blocks = kernel(model, implementation=implementation, layerwise=True,
                  trace_axes=(-1,), trainable=no_biases)
  params = models.build(name).params
  assert set(blocks) == trainable_modules(params, no_biases)
  ref = reference(name, trace_axes=(-1,), mask_kind="no_biases")
  assert_rel_close(sum(blocks.values()), ref, TOL64)


@pytest.mark.parametrize("implementation", ["structured", "ntk_vp", "jacobian"])
@pytest.mark.parametrize("name", SPOT_MODELS)
def test_spot_diagonal_batch_axis(name, implementation):
  model = models.BY_NAME[name]
  k = kernel(model, same=True, implementation=implementation, diagonal_axes=(0,))
  ref = reference(name, same=True, diagonal_axes=(0,))
  assert_rel_close(k, ref, TOL64)


# ---------------------------------------------------------------- float32 ---

FLOAT32_CASES = [("mlp_relu", "auto"), ("cnn2d", "auto"), ("cross_attention_mask", "auto"),
                 ("embed_tokens", "auto"), ("layernorm_variants", "auto"),
                 ("batchnorm_eval", "structured"), ("mlp_mixed_hk_linear", "ntk_vp"),
                 ("conv1d_seq", "jacobian")]


@pytest.mark.slow
@pytest.mark.parametrize("name, implementation", FLOAT32_CASES)
def test_float32_within_tolerance(name, implementation):
  model = models.BY_NAME[name]
  built32 = models.build(name, jnp.float32)
  for leaf in jax.tree.leaves((built32.params, built32.x1)):
    assert leaf.dtype in (jnp.float32, jnp.int64, jnp.int32), leaf.dtype
  k = kernel(model, dtype=jnp.float32, implementation=implementation)
  assert k.dtype == jnp.float32

  def up(tree):
    return jax.tree.map(
        lambda a: a.astype(jnp.float64) if jnp.issubdtype(a.dtype, jnp.floating) else a,
        tree)

  j1, j2 = model_jacobians(model, built32.f, up(built32.params), up(built32.x1),
                           up(built32.x2))
  assert_rel_close(k, apply_axes(full_kernel(j1, j2), j1.ndim - 1), TOL32)
