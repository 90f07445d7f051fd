"""``ntklayers.compat.neural_tangents`` against neural-tangents 0.6.5's own outputs.

``tests/fixtures/nt_kernels.npz`` was written by
``tests/fixtures/make_nt_kernel_fixtures.py`` in a neural-tangents environment
(jax 0.4.23); the models are rebuilt here from the same module, on the stored
weights and inputs, and every output is compared in float64 at ``TOL64``
(neural-tangents' four implementations agree with each other to 1e-12, checked
when the fixture was written). The full sweep of axes is ``slow``; by default
each model runs its default, full and per-example layouts.

The models are neural-tangents user code (biases broadcast by rank promotion), so
these tests run under JAX's default promotion rules, not conftest's strict ones.
"""

from __future__ import annotations

import importlib.util
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ntklayers.compat.neural_tangents as nt
from reference import TOL64, assert_rel_close

HERE = pathlib.Path(__file__).resolve().parent
_spec = importlib.util.spec_from_file_location(
    "make_nt_kernel_fixtures", HERE / "fixtures" / "make_nt_kernel_fixtures.py")
fx = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(fx)
DATA = dict(np.load(HERE / "fixtures" / "nt_kernels.npz"))
NDIM = {"mlp": 2, "cnn": 2, "rank3": 3}
IMPLEMENTATIONS = [nt.NtkImplementation.AUTO, nt.NtkImplementation.JACOBIAN_CONTRACTION,
                   nt.NtkImplementation.NTK_VECTOR_PRODUCTS,
                   nt.NtkImplementation.STRUCTURED_DERIVATIVES]


@pytest.fixture(autouse=True)
def user_promotion():
  with jax.numpy_rank_promotion("allow"), jax.numpy_dtype_promotion("standard"):
    yield


def model(name: str):
  """``(f, params, p1, x1, x2, xb1, xb2)`` of fixture model ``name``, as jnp arrays."""
  def tree(prefix):
    return {k[len(prefix):]: jnp.asarray(v) for k, v in DATA.items()
            if k.startswith(prefix)}
  return (fx.MODELS[name][0], tree(f"{name}/params/"), tree(f"{name}/p1/"),
          *(jnp.asarray(DATA[f"{name}/{k}"]) for k in ("x1", "x2", "xb1", "xb2")))


# The default run: three layouts of the MLP, NT's default layout of the CNN, the full
# kernel of the rank-3 model; every other case is slow.
FAST = {"mlp": [((), ()), ((1,), ()), ((), (0,))], "cnn": [((1,), ())],
        "rank3": [((), ())]}


def axes_params():
  out = []
  for name, ndim in NDIM.items():
    fast = FAST[name]
    for trace, diag in fx.axes_cases(ndim):
      marks = [] if (trace, diag) in fast else [pytest.mark.slow]
      out.append(pytest.param(name, trace, diag, marks=marks,
                              id=f"{name}-{fx.axes_key(trace, diag)}"))
  return out


@pytest.mark.parametrize("name,trace,diag", axes_params())
def test_ntk_and_nngp_every_axes(name, trace, diag):
  f, params, _, x1, x2, _, _ = model(name)
  key = fx.axes_key(trace, diag)
  b = None if 0 in trace + diag else x2
  k = nt.empirical_kernel_fn(f, trace, diag, vmap_axes=0)(x1, b, ("ntk", "nngp"), params)
  assert_rel_close(k.ntk, DATA[f"{name}/ntk/{key}"], TOL64)
  assert_rel_close(k.nngp, DATA[f"{name}/nngp/{key}"], TOL64)


@pytest.mark.parametrize("impl", IMPLEMENTATIONS, ids=lambda i: i.name)
@pytest.mark.parametrize("name", ["mlp", pytest.param("cnn", marks=pytest.mark.slow),
                                  pytest.param("rank3", marks=pytest.mark.slow)])
def test_every_implementation(name, impl):
  f, params, _, x1, x2, _, _ = model(name)
  ndim = NDIM[name]
  ntk_fn = nt.empirical_ntk_fn(f, implementation=impl)  # trace_axes=(-1,)
  key = fx.axes_key((ndim - 1,), ())
  stored = DATA.get(f"{name}/ntk_impl{int(impl)}/{key}", DATA[f"{name}/ntk/{key}"])
  assert_rel_close(ntk_fn(x1, x2, params), stored, TOL64)


@pytest.mark.slow
@pytest.mark.parametrize("impl", IMPLEMENTATIONS, ids=lambda i: i.name)
@pytest.mark.parametrize("name", list(NDIM))
def test_every_implementation_full_kernel(name, impl):
  f, params, _, x1, x2, _, _ = model(name)
  full = nt.empirical_ntk_fn(f, (), (), None, int(impl))(x1, x2, params)
  stored = DATA.get(f"{name}/ntk_impl{int(impl)}/t_d", DATA[f"{name}/ntk/t_d"])
  assert_rel_close(full, stored, TOL64)


@pytest.mark.slow
def test_nngp_fn_every_axes_mlp():
  f, params, _, x1, x2, _, _ = model("mlp")
  for trace, diag in fx.axes_cases(2):
    b = None if 0 in trace + diag else x2
    k = nt.empirical_nngp_fn(f, trace, diag)(x1, b, params)
    assert_rel_close(k, DATA[f"mlp/nngp/{fx.axes_key(trace, diag)}"], TOL64)


@pytest.mark.parametrize("label", [
    g if g in ("both", "none") else pytest.param(g, marks=pytest.mark.slow) for g in fx.GETS])
def test_kernel_fn_get(label):
  f, params, _, x1, x2, _, _ = model("mlp")
  get = fx.GETS[label]
  k = nt.empirical_kernel_fn(f, vmap_axes=0)(x1, x2, get, params)
  if isinstance(get, str):
    assert_rel_close(k, DATA[f"mlp/kernel/{label}"], TOL64)
    return
  fields = ("nngp", "ntk") if get is None else get
  assert type(k).__name__ == "EmpiricalKernel" and k._fields == fields
  for g in fields:
    assert_rel_close(getattr(k, g), DATA[f"mlp/kernel/{label}/{g}"], TOL64)


@pytest.mark.parametrize("name", ["mlp", pytest.param("cnn", marks=pytest.mark.slow)])
def test_ntk_vp_linearize_taylor(name):
  f, params, p1, x1, x2, _, _ = model(name)
  ct = jnp.asarray(DATA[f"{name}/ct"])
  vp = jax.jit(lambda c: nt.empirical_ntk_vp_fn(f, x1, x2, params)(c))(ct)
  assert_rel_close(vp, DATA[f"{name}/vp"], TOL64)
  assert_rel_close(jax.jit(nt.linearize(f, params))(p1, x1), DATA[f"{name}/lin"], TOL64)
  for degree in range(4):
    assert_rel_close(jax.jit(nt.taylor_expand(f, params, degree))(p1, x1),
                     DATA[f"{name}/taylor{degree}"], TOL64)


@pytest.mark.parametrize("name", ["mlp", pytest.param("rank3", marks=pytest.mark.slow)])
def test_batch(name):
  f, params, _, _, _, xb1, xb2 = model(name)
  batched = nt.batch(nt.empirical_kernel_fn(f, vmap_axes=0), batch_size=2)
  k = batched(xb1, xb2, ("nngp", "ntk"), params)
  assert_rel_close(k.nngp, DATA[f"{name}/batch/x2/nngp"], TOL64)
  assert_rel_close(k.ntk, DATA[f"{name}/batch/x2/ntk"], TOL64)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["mlp", "rank3"])
def test_batch_no_divisibility(name):
  f, params, _, _, _, xb1, xb2 = model(name)
  # Blocks of 4 over 6 examples, of 3 over 4.
  k = nt.batch(nt.empirical_ntk_fn(f), batch_size=4)(xb2, None, params)
  assert k.shape == (6, 6) + (() if NDIM[name] == 2 else (3, 3))
  assert_rel_close(k[:4, :4],
                   nt.empirical_ntk_fn(f)(xb2[:4], None, params), TOL64)
  assert_rel_close(nt.batch(nt.empirical_ntk_fn(f), batch_size=3)(xb1, None, params),
                   DATA[f"{name}/batch/none/ntk"], TOL64)


def test_batch_diagonal_shapes_are_the_unbatched_ones():
  """neural-tangents' batch reshapes per-example kernels wrongly; ntk_blocked's blocks
  keep the unbatched layout."""
  f, params, _, x1, _, _, _ = model("rank3")
  for trace, diag in [((), (0,))]:
    k = nt.batch(nt.empirical_ntk_fn(f, trace, diag), batch_size=2)(x1, None, params)
    assert_rel_close(k, DATA[f"rank3/ntk/{fx.axes_key(trace, diag)}"], TOL64)


def _dropout():
  d = lambda k: jnp.asarray(DATA[f"dropout/{k}"])
  params = {k[len("dropout/params/"):]: jnp.asarray(v) for k, v in DATA.items()
            if k.startswith("dropout/params/")}
  return fx.dropout_mlp, params, d("x1"), d("x2"), d("scale1"), d("scale2"), d("key")


def test_rng_split_per_side():
  """``rng`` becomes two keys (the second ``fold_in(key, 1)`` for ``x2 != x1``), so the
  two sides have different dropout masks (the two-sided Jacobian route)."""
  f, params, x1, x2, _, _, key = _dropout()
  kernel_fn = nt.empirical_kernel_fn(f, trace_axes=())
  with jax.threefry_partitionable(False):  # jax 0.4.23's random bits
    for label, b in (("x2", x2), ("none", None)):
      k = kernel_fn(x1, b, None, params, rng=key)
      assert_rel_close(k.nngp, DATA[f"dropout/rng/{label}/nngp"], TOL64)
      assert_rel_close(k.ntk, DATA[f"dropout/rng/{label}/ntk"], TOL64)


def test_per_side_kwargs_with_and_without_vmap_axes():
  f, params, x1, x2, s1, s2, _ = _dropout()
  k = nt.empirical_kernel_fn(f, trace_axes=())(x1, x2, None, params, scale=(s1, s2))
  assert_rel_close(k.nngp, DATA["dropout/scale/nngp"], TOL64)
  assert_rel_close(k.ntk, DATA["dropout/scale/ntk"], TOL64)
  k = nt.empirical_kernel_fn(f, trace_axes=(), vmap_axes=(0, 0, {"scale": 0}))(
      x1, x2, None, params, scale=(s1, s2))
  assert_rel_close(k.nngp, DATA["dropout/scale_vmap/nngp"], TOL64)
  assert_rel_close(k.ntk, DATA["dropout/scale_vmap/ntk"], TOL64)


@pytest.mark.slow
def test_per_example_kwargs_in_batch():
  f, params, x1, x2, s1, s2, _ = _dropout()
  k = nt.batch(nt.empirical_kernel_fn(f, trace_axes=()), batch_size=2)(
      x1, x2, None, params, scale=(s1, s2))
  assert_rel_close(k.ntk, DATA["dropout/scale/ntk"], TOL64)
  for trace, diag in [((2,), (0, 1)), ((1,), (0,))]:
    g, params, _, x1, _, _, _ = model("rank3")
    k = nt.batch(nt.empirical_ntk_fn(g, trace, diag), batch_size=2)(x1, None, params)
    assert_rel_close(k, DATA[f"rank3/ntk/{fx.axes_key(trace, diag)}"], TOL64)


def _init_fn(k, shape):
  k1, k2 = jax.random.split(k)
  return None, {"w1": jax.random.normal(k1, (shape[-1], 6)) / 2., "b1": jnp.zeros(6),
                "w2": jax.random.normal(k2, (6, 3)) / 2.5, "b2": jnp.zeros(3)}


def test_monte_carlo():
  f, _, x1, x2, _, _, _ = _dropout()
  with jax.threefry_partitionable(False):
    mc = nt.monte_carlo_kernel_fn(_init_fn, f, jax.random.PRNGKey(3), 3)
    k = mc(x1, None, ("nngp", "ntk"))
    assert_rel_close(k.nngp, DATA["mc/none/nngp"], TOL64)
    assert_rel_close(k.ntk, DATA["mc/none/ntk"], TOL64)


@pytest.mark.slow
def test_monte_carlo_x2_and_generator():
  f, _, x1, x2, _, _, _ = _dropout()
  with jax.threefry_partitionable(False):
    mc = nt.monte_carlo_kernel_fn(_init_fn, f, jax.random.PRNGKey(3), 3)
    assert_rel_close(mc(x1, x2, "ntk"), DATA["mc/x2/ntk"], TOL64)
    gen = nt.monte_carlo_kernel_fn(_init_fn, f, jax.random.PRNGKey(3), [1, 2])(
        x1, None, "nngp")
    for n, k in zip((1, 2), gen):
      assert_rel_close(k, DATA[f"mc/gen{n}/nngp"], TOL64)
