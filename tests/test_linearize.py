"""``linearize`` and ``taylor_expand`` (neural-tangents' semantics) on every framework
entry point, against independent references: the Jacobian (``jax.jacrev``) and Hessian
(``jax.hessian``) of the flattened parameters contracted by NumPy. Float64, ``TOL64``."""

from __future__ import annotations

import math

import flax.linen as nn
import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.flatten_util import ravel_pytree

import models
import models_flax
import ntklayers
import ntklayers.flax
from reference import TOL64, assert_rel_close, reference_ntk


def perturb(params, scale=0.05, seed=3):
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda a: a + scale * jnp.asarray(rng.normal(size=a.shape), a.dtype),
                      params)


def reference_taylor(f, params0, params, x, degree):
  """``sum_k D^k f[d^k] / k!`` for ``degree <= 2`` from ``jacrev`` and ``hessian`` of the
  output with respect to the flat parameter vector."""
  flat0, unravel = ravel_pytree(params0)
  d = np.asarray(ravel_pytree(params)[0] - flat0)
  g = lambda v: f(unravel(v), x)
  out = np.asarray(jax.jit(g)(flat0))
  if degree >= 1:
    out = out + np.asarray(jax.jit(jax.jacrev(g))(flat0)) @ d
  if degree >= 2:
    hess = np.asarray(jax.jit(jax.hessian(g))(flat0))
    out = out + 0.5 * np.einsum("...ij,i,j->...", hess, d, d)
  return out


@pytest.mark.parametrize("degree", [1, 2])
def test_haiku_apply_against_jacobian_and_hessian(degree):
  built = models.build("mlp_tanh_nobias")
  p1 = perturb(built.params)
  fn = (ntklayers.linearize(built.f, built.params) if degree == 1 else
        ntklayers.taylor_expand(built.f, built.params, 2))
  assert_rel_close(jax.jit(fn)(p1, built.x1),
                   reference_taylor(built.f, built.params, p1, built.x1, degree), TOL64)
  assert_rel_close(fn(built.params, built.x1), built.f(built.params, built.x1), TOL64)


def test_linearize_is_taylor_degree_one_and_degree_zero_is_constant():
  built = models.build("mlp_tanh_nobias")
  p1 = perturb(built.params)
  lin = ntklayers.linearize(built.f, built.params)(p1, built.x1)
  assert_rel_close(ntklayers.taylor_expand(built.f, built.params, 1)(p1, built.x1), lin,
                   TOL64)
  assert np.array_equal(ntklayers.taylor_expand(built.f, built.params, 0)(p1, built.x1),
                        built.f(built.params, built.x1))


def test_exact_for_a_linear_model():
  f = lambda p, x: x @ p["w"] + p["b"][None]
  p0 = {"w": jnp.ones((3, 2)), "b": jnp.zeros(2)}
  p1 = perturb(p0, scale=1.0)
  x = jnp.linspace(-1., 1., 12).reshape(4, 3)
  assert_rel_close(ntklayers.linearize(f, p0)(p1, x), f(p1, x), 1e-14)


def test_polynomial_is_exact_at_its_degree():
  f = lambda p, x: (p["a"] * x) ** 3 + p["b"] ** 2 * x
  p0 = {"a": jnp.asarray(0.5), "b": jnp.asarray(-1.)}
  p1 = {"a": jnp.asarray(0.9), "b": jnp.asarray(0.3)}
  x = jnp.array([1., -2., 0.5])
  for degree in range(4):
    got = ntklayers.taylor_expand(f, p0, degree)(p1, x)
    # the exact expansion of each term: (a0 + t da)^3 x^3 and (b0 + t db)^2 x
    da, db, a0, b0 = 0.4, 1.3, 0.5, -1.
    terms = [a0 ** 3 * x ** 3 + b0 ** 2 * x, 3 * a0 ** 2 * da * x ** 3 + 2 * b0 * db * x,
             3 * a0 * da ** 2 * x ** 3 + db ** 2 * x, da ** 3 * x ** 3]
    assert_rel_close(got, sum(terms[:degree + 1]), 1e-12)
  assert_rel_close(ntklayers.taylor_expand(f, p0, 5)(p1, x), f(p1, x), 1e-12)


# The NTK of a linearized model: its layers see the expansion point, a constant, so
# every parameter is on the exact fallback, and ntklayers says so (UserWarnings).
FALLBACK = pytest.mark.filterwarnings("ignore:ntklayers:UserWarning")


@FALLBACK
def test_ntk_of_the_linearized_model_is_the_ntk_at_the_expansion_point():
  built = models.build("mlp_mixed_hk_linear")
  f_lin = ntklayers.linearize(built.f, built.params)
  k_lin = ntklayers.ntk_fn(f_lin)(perturb(built.params, scale=0.3), built.x1, built.x2)
  ref = reference_ntk(built.f, built.params, built.x1, built.x2)
  assert_rel_close(k_lin, ref, TOL64)


def test_pytree_outputs_model_kwargs_and_grad():
  def f(p, x, *, scale):
    h = jnp.tanh(x @ p["w"])
    return {"out": h * scale, "aux": (jnp.sum(h, axis=-1),)}

  p0 = {"w": jnp.linspace(-1., 1., 6).reshape(3, 2)}
  p1 = perturb(p0)
  x = jnp.linspace(-1., 1., 12).reshape(4, 3)
  f_lin = ntklayers.linearize(f, p0)
  out = f_lin(p1, x, scale=2.)
  assert jax.tree.structure(out) == jax.tree.structure(f(p0, x, scale=2.))
  ref = reference_taylor(lambda p, x: f(p, x, scale=2.)["out"], p0, p1, x, 1)
  assert_rel_close(out["out"], ref, TOL64)
  # The linearized model is linear in its parameters: its gradient is J^T at p0.
  loss = lambda p: jnp.sum(f_lin(p, x, scale=2.)["out"])
  assert_rel_close(jax.grad(loss)(p1)["w"], jax.grad(loss)(p0)["w"], TOL64)


@pytest.mark.parametrize("call,error,match", [
    (lambda f, p: ntklayers.taylor_expand(f, p, -1), ValueError, "non-negative int"),
    (lambda f, p: ntklayers.taylor_expand(f, p, 1.5), ValueError, "non-negative int"),
    (lambda f, p: ntklayers.linearize(f, {"w": jnp.ones(2, jnp.int32)}), TypeError,
     "must be floating"),
    (lambda f, p: ntklayers.linearize(f, p)({"v": jnp.ones(2)}, 1.), ValueError,
     "structure of the expansion point"),
    (lambda f, p: ntklayers.linearize(f, p)({"w": jnp.ones(3)}, 1.), ValueError,
     r"params\['w'\]` has shape \(3,\)"),
    (lambda f, p: ntklayers.linearize(3, p), TypeError, "callable"),
])
def test_errors(call, error, match):
  with pytest.raises(error, match=match):
    call(lambda p, x: p["w"] * x, {"w": jnp.ones(2)})


# ------------------------------------------------------------------- Flax ---


class _BN(nn.Module):
  @nn.compact
  def __call__(self, x, train: bool = False):
    h = nn.Dense(6, param_dtype=jnp.float64)(x)
    h = nn.BatchNorm(use_running_average=not train, param_dtype=jnp.float64)(h)
    return nn.Dense(2, param_dtype=jnp.float64)(jnp.tanh(h))


def test_linen_only_params_move():
  module = _BN()
  x = jnp.linspace(-1., 1., 15).reshape(5, 3)
  with jax.numpy_dtype_promotion("standard"):
    variables = models_flax.linen_variables(module, jnp.float64, x)
    f_lin = ntklayers.flax.linen.linearize(module, variables)
    moved = {"params": perturb(variables["params"]),
             "batch_stats": jax.tree.map(lambda a: a + 1., variables["batch_stats"])}
    got = f_lin(moved, x)
    rest = {"batch_stats": variables["batch_stats"]}
    f = lambda p, x: module.apply({"params": p, **rest}, x)
    ref = reference_taylor(f, variables["params"], moved["params"], x, 1)
    f0 = ntklayers.flax.linen.taylor_expand(module, variables, 0)(moved, x)
    # train=True updates batch_stats: with `mutable` the updates are dropped.
    f_train = ntklayers.flax.linen.linearize(module, variables, mutable=["batch_stats"])
    assert f_train(moved, x, train=True).shape == (5, 2)
  assert_rel_close(got, ref, TOL64)  # the moved batch_stats were ignored
  assert_rel_close(f0, module.apply(variables, x), TOL64)
  with pytest.raises(ValueError, match="'params' collection"):
    f_lin(moved["params"], x)


@FALLBACK
def test_linen_ntk_of_linearized_model():
  built = models_flax.BY_NAME["linen_mlp"].build(jnp.float64)
  module, variables = built.extra["module"], built.extra["variables"]
  f_lin = ntklayers.flax.linen.linearize(module, variables)
  moved = {"params": perturb(variables["params"], scale=0.3)}
  k = ntklayers.ntk_fn(lambda p, x: f_lin({"params": p}, x))(moved["params"], built.x1)
  assert_rel_close(k, ntklayers.flax.ntk_fn(module)(variables, built.x1), TOL64)


@FALLBACK
def test_nnx_model_state_and_dict():
  model = models_flax.nnx_model(
      lambda rngs: nnx.Sequential(nnx.Linear(3, 5, param_dtype=jnp.float64, rngs=rngs),
                                  jnp.tanh,
                                  nnx.Linear(5, 2, param_dtype=jnp.float64, rngs=rngs)),
      jnp.float64)
  x = jnp.linspace(-1., 1., 12).reshape(4, 3)
  graphdef, params0, *rest = nnx.split(model, nnx.Param, ...)
  # The documented closure. nnx.split's States share Variables with the model, so
  # the expansion point is copied before the model is trained in place.
  params0, rest = jax.tree.map(lambda a: a, (params0, rest))
  f = lambda p, x: nnx.merge(graphdef, p, *rest)(x)
  f_lin = ntklayers.flax.nnx.linearize(model)
  f2 = ntklayers.flax.nnx.taylor_expand(model, 2)
  p1 = perturb(params0)
  ref = reference_taylor(f, params0, p1, x, 1)
  ref2 = reference_taylor(f, params0, p1, x, 2)
  assert_rel_close(f_lin(p1, x), ref, TOL64)  # an nnx.State
  assert_rel_close(f_lin(p1.to_pure_dict(), x), ref, TOL64)  # its plain dict
  assert_rel_close(f2(p1, x), ref2, TOL64)
  # A model being trained: its current Param state is read; the expansion point
  # stays where it was.
  nnx.update(model, p1)
  assert_rel_close(f_lin(model, x), ref, TOL64)
  assert_rel_close(ntklayers.linearize(f, params0)(p1, x), ref, TOL64)  # the closure
  k = ntklayers.ntk_fn(lambda p, x: f_lin(p, x))(p1.to_pure_dict(), x)
  assert_rel_close(k, reference_ntk(f, params0, x), TOL64)


def test_taylor_degree_three_by_nested_jvps_matches_the_series():
  net = hk.without_apply_rng(hk.transform(lambda x: jnp.sin(hk.Linear(2)(x))))
  x = jnp.linspace(-1., 1., 6).reshape(2, 3)
  p0 = models.init_params(net.init, jnp.float64, x)
  d = jax.tree.map(lambda a: 0.1 * jnp.ones_like(a), p0)
  p1 = jax.tree.map(jnp.add, p0, d)
  # Along the line p0 + t d the model is sin(z0 + t dz): its series is explicit.
  xn = np.asarray(x)
  z0 = xn @ np.asarray(p0["linear"]["w"]) + np.asarray(p0["linear"]["b"])
  dz = xn @ np.asarray(d["linear"]["w"]) + np.asarray(d["linear"]["b"])
  derivs = [np.sin(z0), np.cos(z0) * dz, -np.sin(z0) * dz ** 2, -np.cos(z0) * dz ** 3]
  ref = sum(t / math.factorial(k) for k, t in enumerate(derivs))
  assert_rel_close(ntklayers.taylor_expand(net.apply, p0, 3)(p1, x), ref, TOL64)
