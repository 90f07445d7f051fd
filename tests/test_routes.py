"""``implementation="auto"``'s route choice (``_core/_routes.py``) and scaled views.

The cost model predicts the FLOPs of every route from the traced program and the
factor shapes; ``auto`` takes the structured route unless a whole-model route is
predicted ``MARGIN`` times cheaper. Scaled views (``_views.scaled``): a parameter
times a value every example shares (BatchNorm's ``scale * rsqrt(var + eps)``) is
still a structured scale when it multiplies data, with the factor in the primal.
Every kernel here is checked against the ``jax.jacrev`` reference in float64.
"""

from __future__ import annotations

import warnings

import flax.linen as nn
import haiku as hk
import jax
import jax.numpy as jnp
import pytest
from flax import nnx

import ntklayers
from ntklayers._core import _cost
from ntklayers._core import _routes
from reference import TOL64, assert_rel_close, reference_ntk

KEY = jax.random.key


def _routes_of(f, params, x) -> dict[str, str]:
  info = ntklayers.inspect(f, params, x)
  return {p: g.route for g in info.groups for p in g.paths}


def _exact(f, params, x, **kw):
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    k = ntklayers.ntk_fn(f, **kw)(params, x)
  assert_rel_close(k, reference_ntk(f, params, x, None), TOL64)


# ------------------------------------------------------------ scaled views ---


def _haiku_bn():
  def fn(x, train):
    h = hk.Conv2D(4, 3)(x)
    h = hk.BatchNorm(True, True, 0.9)(h, is_training=train)
    return hk.Linear(3)(jax.nn.relu(h).reshape(h.shape[0], -1))

  net = hk.transform_with_state(fn)
  x = jax.random.normal(KEY(1), (5, 6, 6, 2), jnp.float64)
  params, state = net.init(KEY(0), x, True)
  state = jax.tree.map(lambda a: a + 0.5 if a.dtype.kind == "f" else a, state)
  params = jax.tree.map(lambda a: a + 0.3 * jax.random.normal(KEY(4), a.shape, a.dtype), params)
  return (lambda p, x: net.apply(p, state, None, x, False)[0]), params, x


class _LinenBN(nn.Module):
  @nn.compact
  def __call__(self, x):
    h = nn.Conv(4, (3, 3), param_dtype=jnp.float64)(x)
    h = nn.BatchNorm(use_running_average=True, param_dtype=jnp.float64)(h)
    return nn.Dense(2, param_dtype=jnp.float64)(jax.nn.relu(h).reshape(h.shape[0], -1))


def _linen_bn():
  x = jax.random.normal(KEY(1), (5, 4, 4, 3), jnp.float64)
  with jax.numpy_dtype_promotion("standard"):  # (linen creates float32 statistics)
    v = _LinenBN().init(KEY(0), x)
  stats = jax.tree.map(lambda a: a.astype(jnp.float64) + 0.5, v["batch_stats"])
  params = jax.tree.map(lambda a: a + 0.3 * jax.random.normal(KEY(4), a.shape, a.dtype),
                        v["params"])
  return (lambda p, x: _LinenBN().apply({"params": p, "batch_stats": stats}, x)), params, x


def _nnx_bn():
  kw = dict(param_dtype=jnp.float64, rngs=nnx.Rngs(0))
  model = nnx.Sequential(nnx.Linear(3, 4, **kw), nnx.BatchNorm(4, use_running_average=True,
                                                                **kw),
                         nnx.Linear(4, 2, **kw))
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  rest = jax.tree.map(lambda a: a.astype(jnp.float64) + 0.5 if a.dtype.kind == "f" else a, rest)
  params = jax.tree.map(lambda a: a + 0.3 * jax.random.normal(KEY(4), a.shape, a.dtype), params)
  x = jax.random.normal(KEY(1), (5, 3), jnp.float64)
  return (lambda p, x: nnx.merge(graphdef, p, rest)(x)), params, x


@pytest.mark.parametrize("make", [_haiku_bn, _linen_bn, _nnx_bn], ids=["haiku", "linen", "nnx"])
def test_inference_batchnorm_scale_is_structured_and_exact(make):
  """hk/nn/nnx BatchNorm fold the scale into ``rsqrt(var + eps)`` before it meets
  the data: the scale is still a structured ``scale`` group, and the kernel is exact."""
  f, params, x = make()
  routes = _routes_of(f, params, x)
  assert routes and all(r.startswith("structured") for r in routes.values()), routes
  _exact(f, params, x)


W = {"s": jnp.array([1.3, -0.7, 0.4]), "t": jnp.array([0.2, 0.5, -1.0]),
     "W": jax.random.normal(KEY(5), (3, 2), jnp.float64)}
X = jax.random.normal(KEY(2), (5, 3), jnp.float64)
C = jnp.cos(jnp.arange(3.0))

SCALED = {
    # (f, expected route of s: "structured" / "fallback")
    "factor_then_reshape": (lambda p, x: (x * (C * p["s"]).reshape(1, 3)) @ p["W"],
                            "structured"),
    "factor_reads_other_leaf": (
        lambda p, x: ((x * (p["s"] * jnp.exp(p["t"]))[None]) * p["t"][None]) @ p["W"],
        "structured"),
    "factor_reads_same_leaf": (lambda p, x: (x * (p["s"] * jnp.exp(p["s"]))[None]) @ p["W"],
                               "fallback"),
    "scaled_view_used_twice": (
        lambda p, x: (lambda v: (x * v[None]) @ p["W"] + v.sum())(p["s"] * C), "fallback"),
    "factor_from_the_batch": (lambda p, x: (x * (p["s"] * jnp.mean(x, 0))[None]) @ p["W"],
                              "fallback"),
    "two_scaled_uses_of_a_leaf": (lambda p, x: (x * (p["s"] * C)[None]) @ p["W"]
                                  + (jnp.tanh(x) * (C[::-1] * p["s"])[None]) @ p["W"],
                                  "structured"),
}


@pytest.mark.parametrize("name", sorted(SCALED))
def test_scaled_views_are_guarded(name):
  """What a scaled view may be and what sends its leaf to the fallback: a factor
  that reads the leaf itself, a second use of the product, a factor computed
  from the batch (not shared by the examples). The kernel is exact either way."""
  f, expected = SCALED[name]
  routes = _routes_of(f, W, X)
  assert routes["['s']"].startswith(expected), (name, routes)
  _exact(f, W, X)


def test_scaled_view_into_a_matmul_is_not_a_dense_layer():
  """``x @ (W * C)`` is not ``dense`` with the data's primal (the factor varies
  over both axes of ``W``): ``W`` goes to the fallback, exactly."""
  f = lambda p, x: x @ (p["W"] * jnp.arange(6.0).reshape(3, 2))
  assert _routes_of(f, W, X)["['W']"].startswith("fallback")
  _exact(f, W, X)


# ------------------------------------------------------------- route choice ---


def test_inspect_reports_every_route_and_the_one_taken():
  f, params, x = _haiku_bn()
  info = ntklayers.inspect(f, params, x)
  assert set(info.costs) == set(_routes.ROUTES)
  assert info.route == "structured"
  assert all(c.total > 0 for c in info.costs.values())
  text = str(info)
  assert "routes (predicted; * = taken)" in text and "* structured" in text
  # the whole-model routes pay the full passes; ntk_vp is quadratic in N
  assert info.costs["ntk_vp"].total > info.costs["jacobian"].factors


def test_cost_model_formulas():
  """The documented formulas on a hand-made case (N = 4, O = 2, F = 100; backward
  passes from where the data meets all parameters 90, the groups' 80, the
  fallback's 10)."""
  s = _routes.Shapes(n1=4, n2=4, same=True, n_out=2, pairs=64, itemsize=8,
                     forward_flops=100.0, params=1000, fallback_params=10, groups=(500.0,),
                     backward=(90.0, 80.0, 10.0))
  c = _routes.predict(s)
  assert c["jacobian"].factors == 4 * (100 + 2 * 2 * 90)
  assert c["jacobian"].contractions == 2 * 64 * 1000
  assert c["ntk_vp"].total == 4 * 2 * ((2 * 4 + 3 * 4) * 90 + 2 * 1000)
  assert c["structured"].factors == 4 * (100 + 2 * 80) + 4 * (100 + 2 * 2 * 10)
  assert c["structured"].contractions == 500 + 2 * 64 * 10
  assert c["structured+ntk_vp"].total == 4 * (100 + 2 * 80) + 4 * 2 * (20 * 10 + 20) + 500
  assert _routes.choose_route(c) == "structured+ntk_vp"  # 2580 < 2780 FLOPs


def test_backward_passes_start_where_parameters_meet_data():
  """A parameter read only at the end costs a short backward pass, one read at
  the start the whole program (``_cost.flops_from_first_use``)."""
  c = jnp.ones((32, 32)) / 32

  def f(p, x):
    h = x * jnp.sin(p["first"])[None]
    for _ in range(4):
      h = jnp.tanh(h @ c)
    return h * p["last"][None]

  params = {"first": jnp.ones(32), "last": jnp.ones(32)}
  jaxpr = jax.make_jaxpr(f)(params, jnp.ones((2, 32)))
  total = _cost.jaxpr_flops(jaxpr)
  assert _cost.flops_from_first_use(jaxpr, 2, [0]) == total - 2 * 32  # (sin, broadcast: no data)
  assert _cost.flops_from_first_use(jaxpr, 2, [1]) == 2 * 32  # the last product
  assert _cost.flops_from_first_use(jaxpr, 2, [0, 1]) == total - 2 * 32


def test_choice_needs_the_margin_and_a_saving():
  big = 10 * _routes.MIN_SAVING

  def costs(jacobian: float, fits: bool = True):
    return {"structured": _routes.RouteCost("structured", big, 0.0),
            "structured+ntk_vp": _routes.RouteCost("structured+ntk_vp", 2 * big, 0.0),
            "jacobian": _routes.RouteCost("jacobian", jacobian, 0.0, fits),
            "ntk_vp": _routes.RouteCost("ntk_vp", 100 * big, 0.0)}

  assert _routes.choose_route(costs(big / _routes.MARGIN * 1.01)) == "structured"
  assert _routes.choose_route(costs(big / _routes.MARGIN * 0.99)) == "jacobian"
  assert _routes.choose_route(costs(1.0, fits=False)) == "structured"  # over budget
  small = {k: _routes.RouteCost(k, c.factors / 100, 0.0, c.fits)  # saves < MIN_SAVING
           for k, c in costs(1.0).items()}
  assert _routes.choose_route(small) == "structured"


def _mostly_plain():
  """A plain gate and a small dense layer at the input, then a long
  parameter-free computation, one output: the passes dominate, and the
  structured route pays them twice (capture, then the gate's Jacobians)."""
  c = jax.random.normal(KEY(7), (512, 512), jnp.float64) / 24.0

  def f(p, x):
    h = (x * jnp.sin(p["gate"])[None]) @ p["w"]
    for _ in range(8):
      h = jnp.tanh(h @ c)
    return h.sum(-1, keepdims=True)

  params = {"w": jax.random.normal(KEY(8), (3, 512), jnp.float64),
            "gate": jax.random.normal(KEY(9), (3,), jnp.float64)}
  return f, params, jax.random.normal(KEY(10), (16, 3), jnp.float64)


def test_auto_takes_the_whole_jacobian_when_it_is_predicted_cheaper():
  f, params, x = _mostly_plain()
  info = ntklayers.inspect(f, params, x)
  c = info.costs
  assert c["jacobian"].total * _routes.MARGIN < c["structured"].total, _routes.describe(c, "")
  assert info.route == "jacobian"
  assert all(g.route == "fallback (jacobian)" for g in info.groups)
  assert all("runs the whole model by jacobian" in g.reason for g in info.groups)
  kernel_fn = ntklayers.ntk_fn(f)
  with warnings.catch_warnings():
    warnings.simplefilter("error")  # chosen for speed: no slow-route or fallback warning
    k = kernel_fn(params, x)
  assert_rel_close(k, reference_ntk(f, params, x, None), TOL64)
  # asked for explicitly, the structured route is still there, and agrees
  structured = ntklayers.inspect(f, params, x, implementation="structured")
  assert structured.route == "structured" and not structured.costs
  _exact(f, params, x, implementation="structured")


def test_fallback_route_follows_the_jacobian_memory_budget(monkeypatch):
  """Fallback Jacobians over the budget: the fallback goes by NTK-vector products."""
  f, params, x = _mostly_plain()
  monkeypatch.setattr(_routes, "JACOBIAN_BUDGET_BYTES", 1)
  info = ntklayers.inspect(f, params, x)
  assert info.route == "structured+ntk_vp" and info.fallback_method == "ntk_vp"
  _exact(f, params, x)


# ------------------------------------------------------------ fused offsets ---

B = {"W": jax.random.normal(KEY(11), (3, 4), jnp.float64),
     "V": jax.random.normal(KEY(12), (4, 2), jnp.float64),
     "b": jax.random.normal(KEY(13), (4,), jnp.float64),
     "c": jax.random.normal(KEY(14), (5, 4), jnp.float64)}

FUSED = {
    # (f, expected groups as sorted tuples of leaf paths)
    "dense_plus_bias": (lambda p, x: jnp.tanh(x @ p["W"] + p["b"][None]) @ p["V"],
                        [("['V']",), ("['W']", "['b']")]),
    "bias_first": (lambda p, x: jnp.tanh(p["b"][None] + x @ p["W"]) @ p["V"],
                   [("['V']",), ("['W']", "['b']")]),
    "product_used_twice": (lambda p, x: (lambda h: jnp.tanh(h + p["b"][None]) @ p["V"]
                                         + h.sum(-1, keepdims=True))(x @ p["W"]),
                           [("['V']",), ("['W']",), ("['b']",)]),
    "subtracted_bias": (lambda p, x: jnp.tanh(x @ p["W"] - p["b"][None]) @ p["V"],
                        [("['V']",), ("['W']",), ("['b']",)]),
    "shared_bias": (lambda p, x: jnp.tanh(x @ p["W"] + p["b"][None]) @ p["V"]
                    + jnp.tanh(jnp.sin(x) @ p["W"] + p["b"][None]) @ p["V"],
                    [("['V']",), ("['W']", "['b']")]),
    "bias_over_rows": (lambda p, x: jnp.tanh(x @ p["W"] + p["c"]) @ p["V"],
                       [("['V']",), ("['W']",)]),
}


@pytest.mark.parametrize("name", sorted(FUSED))
def test_bias_adds_fuse_into_the_product_they_follow(name):
  """``x @ W + b`` is one group (one cotangent, as a drop-in layer with a bias)
  when ``b`` varies along the output features and the product has no other use;
  otherwise the bias is its own group (or, varying along the rows, the fallback).
  Exact in every case."""
  f, expected = FUSED[name]
  x = jax.random.normal(KEY(15), (5, 3), jnp.float64)
  info = ntklayers.inspect(f, B, x)
  params = {k: B[k] for k in ("W", "V", "b", "c")}
  groups = sorted(tuple(sorted(g.paths)) for g in info.groups
                  if g.route.startswith("structured"))
  assert groups == sorted(expected), str(info)
  _exact(f, params, x)


def test_fused_layers_inside_a_layer_stack():
  """Stock ``hk.Linear`` under ``hk.layer_stack``: weight and bias slices fused per
  step, one group per stacked leaf pair, exact."""
  def fn(x):
    stack = hk.layer_stack(3)(lambda h: jnp.tanh(hk.Linear(6)(h)))
    return hk.Linear(2)(stack(hk.Linear(6)(x)))

  net = hk.without_apply_rng(hk.transform(fn))
  x = jax.random.normal(KEY(16), (4, 5), jnp.float64)
  params = net.init(KEY(17), x)
  info = ntklayers.inspect(net.apply, params, x)
  assert all(g.route.startswith("structured") for g in info.groups), str(info)
  assert len(info.groups) == 3  # (w, b) of each Linear, the stacked one as one group
  _exact(net.apply, params, x)
