"""The empirical NNGP (``nngp_fn``) and NNGP + NTK in one call (``kernel_fn``, ``get``).

References are independent: the model's outputs contracted by NumPy
(``np.tensordot``) and laid out by ``reference.apply_axes`` (neural-tangents'
conventions); NTKs against ``reference.reference_ntk``. Float64, ``TOL64``.
"""

from __future__ import annotations

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import models
import models_flax
import ntklayers
from reference import TOL64, apply_axes, assert_rel_close, reference_ntk

AXES = [((), ()), ((-1,), ()), ((), (0,)), ((), (-1,)), ((0,), ()), ((-1,), (0,))]
AXES_RANK3 = [((), ()), ((1,), (2,)), ((2,), (0, 1)), ((0, 2), ()), ((), (0, 1, 2))]


def reference_nngp(f, params, x1, x2=None, trace_axes=(), diagonal_axes=()):
  """``f(x1) f(x2)^T`` by NumPy, in neural-tangents' layout."""
  f = jax.jit(f)
  o1 = np.asarray(f(params, x1), np.float64)
  o2 = o1 if x2 is None else np.asarray(f(params, x2), np.float64)
  full = np.tensordot(o1, o2, axes=0)
  return apply_axes(full, o1.ndim, trace_axes, diagonal_axes)


def _same_batch(trace_axes, diagonal_axes) -> bool:
  return 0 in [a % 2 for a in trace_axes + diagonal_axes]


def _sweep():
  """Every axes case on the MLP; the CNN and a coupled model (slow) on the others."""
  out = [pytest.param("mlp_relu", t, d) for t, d in AXES]
  for name in ("cnn2d", "batchnorm_train"):
    out += [pytest.param(name, t, d, marks=[pytest.mark.slow]) for t, d in AXES]
  return out


@pytest.mark.parametrize("name,trace_axes,diagonal_axes", _sweep())
def test_nngp_fn_against_outputs(name, trace_axes, diagonal_axes):
  built = models.build(name)
  nngp_fn = ntklayers.nngp_fn(built.f, trace_axes=trace_axes, diagonal_axes=diagonal_axes)
  x2 = None if _same_batch(trace_axes, diagonal_axes) else built.x2
  k = nngp_fn(built.params, built.x1, x2)
  ref = reference_nngp(built.f, built.params, built.x1, x2, trace_axes, diagonal_axes)
  assert k.shape == ref.shape
  assert_rel_close(k, ref, TOL64)


@pytest.mark.parametrize("trace_axes,diagonal_axes", [
    pytest.param(*a, marks=[pytest.mark.slow] if k > 1 else []) for k, a in enumerate(AXES_RANK3)])
def test_nngp_rank3_outputs(trace_axes, diagonal_axes):
  built = models.build("conv1d_seq")
  x2 = None if 0 in trace_axes + diagonal_axes else built.x2
  k = ntklayers.nngp_fn(built.f, trace_axes=trace_axes, diagonal_axes=diagonal_axes)(
      built.params, built.x1, x2)
  assert_rel_close(k, reference_nngp(built.f, built.params, built.x1, x2, trace_axes,
                                     diagonal_axes), TOL64)


@pytest.mark.parametrize("name", ["mlp_mixed_hk_linear", "batchnorm_train",
                                  pytest.param("conv1d_seq", marks=pytest.mark.slow)])
def test_kernel_fn_both(name):
  built = models.build(name)
  with models.expect_fallback_warning(models.BY_NAME[name]):
    k = ntklayers.kernel_fn(built.f, trace_axes=(-1,))(built.params, built.x1, built.x2)
  assert type(k).__name__ == "Kernels" and k._fields == ("nngp", "ntk")
  assert_rel_close(k.nngp, reference_nngp(built.f, built.params, built.x1, built.x2, (-1,)),
                   TOL64)
  coupled = models.BY_NAME[name].coupled
  ref = reference_ntk(built.f, built.params, built.x1, built.x2, trace_axes=(-1,))
  assert_rel_close(k.ntk, ref, TOL64)
  if not coupled:
    assert np.array_equal(k.ntk, ntklayers.ntk_fn(built.f, trace_axes=(-1,))(
        built.params, built.x1, built.x2))


def test_get_forms():
  built = models.build("mlp_relu")
  p, x1, x2 = built.params, built.x1, built.x2
  both = ntklayers.kernel_fn(built.f)(p, x1, x2)
  swapped = ntklayers.kernel_fn(built.f, get=("ntk", "nngp"))(p, x1, x2)
  assert swapped._fields == ("ntk", "nngp")
  assert np.array_equal(swapped.ntk, both.ntk) and np.array_equal(swapped.nngp, both.nngp)
  assert np.array_equal(ntklayers.kernel_fn(built.f, get=None)(p, x1, x2).nngp, both.nngp)
  assert np.array_equal(ntklayers.kernel_fn(built.f, get="NTK")(p, x1, x2), both.ntk)
  assert np.array_equal(ntklayers.kernel_fn(built.f, get="nngp")(p, x1, x2), both.nngp)
  one = ntklayers.kernel_fn(built.f, get=("nngp",))(p, x1, x2)
  assert one._fields == ("nngp",) and np.array_equal(one.nngp, both.nngp)


@pytest.mark.parametrize("get,error,match", [
    ("nngpp", ValueError, "unknown kernels"),
    ((), ValueError, "at least one"),
    (("ntk", "ntk"), ValueError, "twice"),
    (3, TypeError, "'nngp', 'ntk' or a tuple"),
    (("ntk", None), TypeError, "'nngp', 'ntk' or a tuple"),
])
def test_bad_get(get, error, match):
  with pytest.raises(error, match=match):
    ntklayers.kernel_fn(lambda p, x: x @ p, get=get)


def test_nngp_refuses_pytree_outputs():
  f = lambda p, x: (x @ p, x @ p)
  with pytest.raises(TypeError, match="single array"):
    ntklayers.nngp_fn(f)(jnp.ones((3, 2)), jnp.ones((4, 3)))


def test_nngp_needs_no_trainable_params_and_no_params_at_all():
  """The NNGP differentiates nothing: ``params`` may be empty (a fixed feature map)."""
  x = jnp.arange(12.).reshape(4, 3)
  k = ntklayers.nngp_fn(lambda p, x: jnp.tanh(x), trace_axes=(-1,))(None, x)
  assert_rel_close(k, np.tanh(np.asarray(x)) @ np.tanh(np.asarray(x)).T / 3, TOL64)


def test_kernel_fn_inside_jit_and_with_model_kwargs():
  built = models.build("mlp_relu")

  def f(p, x, scale):
    return built.f(p, x) * scale

  kernel_fn = ntklayers.kernel_fn(f, trace_axes=(-1,))
  k = jax.jit(lambda p, a, b, s: kernel_fn(p, a, b, scale=s))(
      built.params, built.x1, built.x2, jnp.asarray(2.))
  ref = 4 * reference_nngp(built.f, built.params, built.x1, built.x2, (-1,))
  assert_rel_close(k.nngp, ref, TOL64)


def test_layerwise_ntk_beside_nngp():
  built = models.build("mlp_relu")
  k = ntklayers.kernel_fn(built.f, layerwise=True)(built.params, built.x1)
  o = built.f(built.params, built.x1).shape[1]
  assert isinstance(k.ntk, dict) and k.nngp.shape == (models.N1, models.N1, o, o)
  assert_rel_close(sum(k.ntk.values()), reference_ntk(built.f, built.params, built.x1),
                   TOL64)


def test_nonfinite_nngp_warns():
  f = lambda p, x: x @ p / 0.
  with pytest.warns(RuntimeWarning, match="NaN or inf"):
    ntklayers.nngp_fn(f)(jnp.ones((3, 2)), jnp.ones((4, 3)))


def test_float32_nngp():
  built = models.build("mlp_relu", jnp.float32)
  k = ntklayers.kernel_fn(built.f, trace_axes=(-1,))(built.params, built.x1)
  assert k.nngp.dtype == jnp.float32
  ref = reference_nngp(built.f, jax.tree.map(lambda a: a.astype(jnp.float64), built.params),
                       built.x1.astype(jnp.float64), None, (-1,))
  assert_rel_close(k.nngp, ref, 1e-5)  # float32 outputs, a few ulps per product


@pytest.mark.parametrize("name", ["linen_mlp", "nnx_mlp",
                                  pytest.param("linen_batchnorm_train", marks=pytest.mark.slow)])
def test_flax_entry_points(name):
  built = models_flax.BY_NAME[name].build(jnp.float64)
  standard = built.extra.get("standard", False)
  with warnings.catch_warnings(), models_flax.flax_promotion(standard):
    warnings.simplefilter("ignore", UserWarning)  # fallback notes of plain layers
    k = built.ntk_fn(get=("nngp", "ntk"), trace_axes=(-1,))(built.x1, built.x2)
    nngp = built.ntk_fn(get="nngp")(built.x1, None)
    ref_nngp = reference_nngp(built.f, built.params, built.x1, built.x2, (-1,))
    ref_ntk = reference_ntk(built.f, built.params, built.x1, built.x2, trace_axes=(-1,))
    ref_full = reference_nngp(built.f, built.params, built.x1)
  assert_rel_close(k.nngp, ref_nngp, TOL64)
  assert_rel_close(k.ntk, ref_ntk, TOL64)
  assert_rel_close(nngp, ref_full, TOL64)
