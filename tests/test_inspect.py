"""``ntklayers.inspect``: the plan before the kernel, and the one-time slow-route warning."""

from __future__ import annotations

import warnings

import haiku as hk
import jax
import jax.numpy as jnp
import pytest

import ntklayers
import ntklayers.haiku as nh
from reference import TOL64, assert_rel_close, reference_ntk


def _net(dropin: bool, plain_leaf: bool = False):
  linear = nh.Linear if dropin else hk.Linear

  def fn(x):
    h = jax.nn.relu(hk.Conv2D(4, 3)(x))
    h = h.reshape(h.shape[0], -1)
    if plain_leaf:  # read through sin: no pattern can take it
      h = h * jnp.sin(hk.get_parameter("gate", (1, h.shape[-1]), dtype=h.dtype, init=jnp.ones))
    return linear(3)(h)

  net = hk.without_apply_rng(hk.transform(fn))
  x = jax.random.normal(jax.random.key(0), (3, 5, 5, 2))
  return net.apply, net.init(jax.random.key(1), x), x


def test_routes_reasons_and_sizes():
  f, params, x = _net(dropin=True, plain_leaf=True)
  with warnings.catch_warnings():
    warnings.simplefilter("error")  # inspect reports in its table, not by warnings
    info = ntklayers.inspect(f, params, x)
  routes = {p: g.route for g in info.groups for p in g.paths}
  assert routes["['linear']['w']"] == "structured (tag)"
  assert routes["['conv2_d']['w']"] == "structured (recognized)"
  assert routes["['conv2_d']['b']"] == "structured (recognized)"
  assert routes["['~']['gate']"].startswith("fallback")
  gate = next(g for g in info.groups if "['~']['gate']" in g.paths)
  assert "recognized pattern" in gate.reason
  assert gate.size == 5 * 5 * 4  # SAME conv output 5x5x4, flattened
  assert sum(g.size for g in info.groups) == sum(a.size for a in jax.tree.leaves(params))
  assert all(g.flops > 0 and g.memory > 0 for g in info.groups)
  assert info.shapes == (3, 3, 3)
  text = str(info)
  assert "structured (recognized)" in text and "['~']['gate']" in text
  assert "samples:" in text and "total:" in text


def test_structure_annotated_sends_stock_layers_to_the_fallback():
  f, params, x = _net(dropin=False)
  info = ntklayers.inspect(f, params, x, structure="annotated")
  assert all(g.route.startswith("fallback") for g in info.groups)
  assert all("structure='annotated'" in g.reason for g in info.groups)
  assert info.fallback_fraction == 1.0
  auto = ntklayers.inspect(f, params, x)
  assert auto.fallback_fraction == 0.0


def test_inspect_evaluates_nothing():
  calls = []
  f0, params, x = _net(dropin=False)

  def f(p, xb):
    calls.append(type(xb).__name__)
    return f0(p, xb)

  ntklayers.inspect(f, params, x)
  assert calls and all("Tracer" in c for c in calls)


def test_route_of_inspect_is_the_route_of_the_kernel():
  f, params, x = _net(dropin=False)
  kernel_fn = ntklayers.ntk_fn(f, trace_axes=(-1,))
  info = kernel_fn.inspect(params, x)
  assert not [g for g in info.groups if g.route.startswith("fallback")]
  k = kernel_fn(params, x)
  assert kernel_fn.fallback == ()
  assert_rel_close(k, reference_ntk(f, params, x, None, trace_axes=(-1,)), TOL64)


def test_slow_route_warns_once_per_kernel_function():
  f, params, x = _net(dropin=False)
  kernel_fn = ntklayers.ntk_fn(f, structure="annotated")
  with pytest.warns(ntklayers.SlowRouteWarning, match=r"100% .*ntklayers.inspect"):
    k = kernel_fn(params, x)
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    kernel_fn(params, x)  # once per kernel function
  assert_rel_close(k, reference_ntk(f, params, x, None), TOL64)


def test_no_slow_route_warning_when_the_fallback_was_asked_for():
  f, params, x = _net(dropin=False)
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    ntklayers.ntk_fn(f, implementation="jacobian")(params, x)
    ntklayers.ntk_fn(f)(params, x)  # recognized: structured


def test_inspect_rejects_bad_inputs_like_the_kernel():
  f, params, x = _net(dropin=False)
  with pytest.raises(ValueError, match="x2"):
    ntklayers.inspect(f, params, x, jnp.ones((2, 5, 5, 3)))


def test_widening_cast_of_a_parameter_is_recognized_and_exact():
  """float32 parameters in a float64 computation (Flax's promote_dtype casts them):
  the cast is exact, so the layer stays structured, and the kernel is the float64
  parameters' kernel to float64 rounding; a narrowing cast is not a view."""
  w32 = jax.random.normal(jax.random.key(0), (3, 4), jnp.float32)
  x = jax.random.normal(jax.random.key(1), (5, 3), jnp.float64)

  def f(p, x):
    return jnp.tanh(x @ p["w"].astype(jnp.float64)) @ jnp.ones((4, 2), jnp.float64)

  kernel_fn = ntklayers.ntk_fn(f)
  info = kernel_fn.inspect({"w": w32}, x)
  assert [g.route for g in info.groups] == ["structured (recognized)"], str(info)
  ref = reference_ntk(f, {"w": w32.astype(jnp.float64)}, x, None)
  assert_rel_close(kernel_fn({"w": w32}, x), ref, TOL64)

  def narrowing(p, x):
    w = p["w"].astype(jnp.float32).astype(jnp.float64)  # rounds: not a view
    return jnp.tanh(x @ w) @ jnp.ones((4, 2), jnp.float64)

  info = ntklayers.inspect(narrowing, {"w": w32.astype(jnp.float64)}, x)
  assert [g.route for g in info.groups][0].startswith("fallback"), str(info)


@pytest.mark.parametrize("implementation", ["auto", "jacobian", "structured"])
def test_fallback_jacobians_of_a_model_that_cannot_run_per_example(implementation):
  """A model that reshapes by its batch size cannot run on one example: the
  fallback's Jacobians are then the whole batch's (exact), not per example."""
  w = jax.random.normal(jax.random.key(0), (4, 2), jnp.float64)
  x = jax.random.normal(jax.random.key(1), (3, 4), jnp.float64)

  def f(p, x):
    return jnp.tanh(x @ jnp.sin(p["w"])).reshape(3, -1)  # the batch size, hard-coded

  k = ntklayers.ntk_fn(f, implementation=implementation)({"w": w}, x)
  assert_rel_close(k, reference_ntk(f, {"w": w}, x, None), TOL64)
