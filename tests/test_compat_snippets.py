"""Typical neural-tangents user code, run unchanged on ``ntklayers.compat.neural_tangents``.

The snippets follow neural-tangents' README and docstrings (``jax.example_libraries.stax``,
Haiku and Flax models, ``empirical_kernel_fn(..., vmap_axes=0)``, ``nt.linearize``,
``nt.predict.gradient_descent_mse``, ``nt.batch``), shrunk to test sizes; only the
import line differs. Their kernels are checked against ntklayers' own entry points
and the independent reference of ``tests/reference.py``; then what is refused, and
how. User code runs under JAX's default promotion rules.
"""

from __future__ import annotations

import flax.linen as nn
import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import random
from jax.example_libraries import stax

import ntklayers
import ntklayers.flax  # noqa: F401  (the linen snippet uses ntklayers.flax)
import ntklayers.compat.neural_tangents as nt
from reference import TOL64, assert_rel_close, reference_ntk


@pytest.fixture(autouse=True)
def user_promotion():
  with jax.numpy_rank_promotion("allow"), jax.numpy_dtype_promotion("standard"):
    yield


def test_readme_stax_workflow():
  key1, key2, key3 = random.split(random.PRNGKey(1), 3)
  x_train = random.normal(key1, (6, 5))
  x_test = random.normal(key2, (3, 5))
  y_train = jnp.sin(x_train[:, :1])
  init_fn, f = stax.serial(stax.Dense(16), stax.Relu, stax.Dense(1))
  _, params = init_fn(key3, (-1, 5))

  kernel_fn = nt.empirical_kernel_fn(
      f, trace_axes=(-1,), vmap_axes=0,
      implementation=nt.NtkImplementation.STRUCTURED_DERIVATIVES)
  ntk_train_train = kernel_fn(x_train, None, "ntk", params)
  ntk_test_train = kernel_fn(x_test, x_train, "ntk", params)
  k_both = kernel_fn(x_train, None, ("nngp", "ntk"), params)

  predict_fn = nt.predict.gradient_descent_mse(ntk_train_train, y_train)
  y_train_0 = f(params, x_train)
  y_test_0 = f(params, x_test)
  y_train_t, y_test_t = predict_fn(1.0, y_train_0, y_test_0, ntk_test_train)

  f_lin = nt.linearize(f, params)
  f_taylor = nt.taylor_expand(f, params, 2)

  ref = reference_ntk(f, params, x_train, trace_axes=(-1,))
  assert_rel_close(ntk_train_train, ref, TOL64)
  assert_rel_close(k_both.ntk, ref, TOL64)
  assert_rel_close(k_both.nngp, y_train_0 @ y_train_0.T, TOL64)
  assert_rel_close(ntk_test_train, reference_ntk(f, params, x_test, x_train,
                                                 trace_axes=(-1,)), TOL64)
  assert y_train_t.shape == (6, 1) and y_test_t.shape == (3, 1)
  assert_rel_close(f_lin(params, x_test), y_test_0, TOL64)
  assert_rel_close(f_taylor(params, x_test), y_test_0, TOL64)


def test_readme_haiku_and_ntk_vector_products():
  def forward(x):
    return hk.nets.MLP([8, 3])(x)

  f = hk.without_apply_rng(hk.transform(forward))
  x1 = random.normal(random.PRNGKey(1), (4, 5))
  x2 = random.normal(random.PRNGKey(2), (3, 5))
  params = f.init(random.PRNGKey(0), x1)
  ntk_fn = nt.empirical_ntk_fn(f.apply, vmap_axes=0,
                               implementation=nt.NtkImplementation.NTK_VECTOR_PRODUCTS)
  k = ntk_fn(x1, x2, params)
  ntk_vp_fn = nt.empirical_ntk_vp_fn(f.apply, x1, x2, params)
  cotangents = random.normal(random.PRNGKey(4), f.apply(params, x2).shape)
  ntk_vp = ntk_vp_fn(cotangents)

  full = ntklayers.ntk_fn(f.apply)(params, x1, x2)
  assert_rel_close(k, ntklayers.ntk_fn(f.apply, trace_axes=(-1,))(params, x1, x2), TOL64)
  assert_rel_close(ntk_vp, jnp.einsum("nmop,mp->no", full, cotangents), TOL64)


@pytest.mark.filterwarnings("ignore:ntklayers:UserWarning")  # stock layers on the fallback
def test_readme_flax():
  class CNN(nn.Module):
    @nn.compact
    def __call__(self, x):
      x = nn.Conv(features=4, kernel_size=(3, 3))(x)
      x = nn.relu(x)
      x = nn.avg_pool(x, window_shape=(2, 2), strides=(2, 2))
      x = x.reshape((x.shape[0], -1))
      x = nn.Dense(features=3)(x)
      return x

  model = CNN()
  x1 = random.normal(random.PRNGKey(1), (3, 6, 6, 2))
  x2 = random.normal(random.PRNGKey(2), (2, 6, 6, 2))
  params = model.init(random.PRNGKey(0), x1)
  kernel_fn = nt.empirical_kernel_fn(model.apply, trace_axes=(), vmap_axes=0,
                                     implementation=nt.NtkImplementation.AUTO)
  k = kernel_fn(x1, x2, "ntk", params)
  # neural-tangents differentiates the whole `params` tree: ntk_fn does the same.
  assert_rel_close(k, ntklayers.ntk_fn(model.apply)(params, x1, x2), TOL64)
  assert_rel_close(k, ntklayers.flax.ntk_fn(model)(params, x1, x2), TOL64)


def test_batch_snippet_and_no_divisibility():
  init_fn, f = stax.serial(stax.Dense(8), stax.Tanh, stax.Dense(2))
  _, params = init_fn(random.PRNGKey(0), (-1, 3))
  x1 = random.normal(random.PRNGKey(1), (7, 3))
  x2 = random.normal(random.PRNGKey(2), (5, 3))
  kernel_fn = nt.empirical_kernel_fn(f, vmap_axes=0)
  kernel_fn_batched = nt.batch(kernel_fn, device_count=-1, batch_size=3)
  k = kernel_fn_batched(x1, x2, "ntk", params)
  assert isinstance(k, jax.Array)
  assert_rel_close(k, kernel_fn(x1, x2, "ntk", params), TOL64)
  host = nt.batch(kernel_fn, batch_size=3, store_on_device=False)(x1, None, "nngp", params)
  assert isinstance(host, np.ndarray)
  assert_rel_close(host, kernel_fn(x1, None, "nngp", params), TOL64)


def test_pytree_outputs_one_kernel_per_leaf():
  def f(params, x):
    h = jnp.tanh(x @ params["w"])
    return {"a": h, "b": (h ** 2 @ params["v"],)}

  params = {"w": jnp.ones((3, 4)) / 3, "v": jnp.ones((4, 2))}
  x1 = jnp.linspace(-1., 1., 9).reshape(3, 3)
  k = nt.empirical_kernel_fn(f, trace_axes=())(x1, None, None, params)
  assert set(k) == {"a", "b"} and type(k["b"][0]).__name__ == "EmpiricalKernel"
  for leaf, kernel in (("a", k["a"]), ("b", k["b"][0])):
    g = (lambda p, x: f(p, x)["a"]) if leaf == "a" else (lambda p, x: f(p, x)["b"][0])
    assert_rel_close(kernel.ntk, reference_ntk(g, params, x1), TOL64)
  ntk = nt.empirical_ntk_fn(f)(x1, None, params)
  assert jax.tree.structure(ntk) == jax.tree.structure({"a": 0, "b": (0,)})


def test_vmap_axes_zero_on_interacting_examples_is_still_exact():
  """neural-tangents trusts ``vmap_axes=0`` (wrong kernels if examples interact);
  ntklayers checks, so the kernel stays exact."""
  def f(params, x):
    h = x @ params
    return h - jnp.mean(h, axis=0, keepdims=True)

  params = jnp.linspace(-1., 1., 6).reshape(3, 2)
  x = jnp.linspace(-1., 2., 12).reshape(4, 3)
  k = nt.empirical_ntk_fn(f, trace_axes=(), vmap_axes=0)(x, None, params)
  assert_rel_close(k, reference_ntk(f, params, x), TOL64)


@pytest.mark.parametrize("call,error,match", [
    (lambda: nt.stax, AttributeError, "infinite-width kernels"),
    (lambda: nt.Kernel, AttributeError, "not provided"),
    (lambda: nt.empirical_ntk_fn(lambda p, x: x, vmap_axes=1), NotImplementedError,
     "batch on axis 0"),
    (lambda: nt.empirical_ntk_fn(lambda p, x: x, vmap_axes=(0, 1, None)),
     NotImplementedError, "out_axes=1"),
    (lambda: nt.empirical_ntk_fn(lambda p, x: x, vmap_axes="0"), TypeError, "vmap_axes"),
    (lambda: nt.empirical_ntk_fn(lambda p, x: x, implementation=4), ValueError,
     "NtkImplementation"),
    (lambda: nt.empirical_ntk_fn(lambda p, x: x, _fwd="yes"), TypeError, "_fwd"),
    (lambda: nt.batch(lambda x1, x2, params: x1), TypeError, "must come from"),
    (lambda: nt.batch(nt.empirical_ntk_fn(lambda p, x: x), batch_size=-1), ValueError,
     "batch_size"),
    (lambda: nt.empirical_kernel_fn(lambda p, x: x @ p)(jnp.ones((2, 3)), None, (),
                                                       jnp.ones((3, 2))),
     ValueError, "non-empty"),
    (lambda: nt.empirical_kernel_fn(lambda p, x: x @ p)(jnp.ones((2, 3)), None, "cov1",
                                                       jnp.ones((3, 2))),
     ValueError, "unknown kernels"),
    (lambda: nt.monte_carlo_kernel_fn(lambda k, s: (None, 1.), lambda p, x: x,
                                      random.PRNGKey(0), 0), ValueError, "n_samples"),
])
def test_refusals(call, error, match):
  with pytest.raises(error, match=match):
    call()


def test_unhashable_static_kwarg_is_named():
  f = lambda p, x, opts: x @ p
  with pytest.raises(TypeError, match="'opts'"):
    nt.empirical_ntk_fn(f)(jnp.ones((2, 3)), None, jnp.ones((3, 2)), opts={1, 2})
