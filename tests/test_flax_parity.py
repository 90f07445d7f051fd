"""Each ``ntklayers.flax`` drop-in against its Flax original (linen and NNX).

For every configuration, with the same rng and inputs:

* linen: ``init`` gives the same ``variables`` tree (collections, module and
  parameter names, shapes, dtypes, values) and ``apply`` with the original's
  variables gives exactly equal outputs (bitwise);
* NNX: construction with the same ``nnx.Rngs`` seed gives the same ``nnx.state``
  (paths, Variable types, shapes, dtypes, values, RNG state included), and the
  drop-in's graph merged with the original's state gives bitwise equal outputs.

Everything runs in float32 (Flax's default ``param_dtype``); both inits and both
forward passes of all cases of one class are one compiled program and one test
(attention: one per case); a failing batch lists every failing case.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ntklayers.flax import linen as fl
from ntklayers.flax import nnx as fx


@dataclasses.dataclass(frozen=True)
class Case:
  """``make(ns)`` (linen) / ``make(ns, rngs)`` (NNX) builds the layer from either
  namespace (``flax.linen``/``flax.nnx`` or their ``ntklayers.flax`` drop-ins);
  ``x_shapes`` are the positional inputs; ``kwargs()`` extra call arguments."""

  name: str
  make: Callable[..., Any]
  x_shapes: tuple[tuple[int, ...], ...]
  kwargs: Callable[[], dict] = dict


def _inputs(shapes, seed=0):
  rng = np.random.default_rng(seed)
  return tuple(jnp.asarray(rng.normal(size=s), jnp.float32) for s in shapes)


_normal = jax.nn.initializers.normal(0.5)  # non-zero biases / non-unit scales


def _mask(q_len: int, kv_len: int, batch: int = 1) -> jax.Array:
  m = np.tril(np.ones((q_len, kv_len), bool), k=1)
  return jnp.asarray(np.broadcast_to(m, (batch, 1, q_len, kv_len)))


# ------------------------------------------------------------------ linen ---

LINEN_DENSE = [
    Case("default", lambda ns: ns.Dense(7), ((3, 4),)),
    Case("no_bias", lambda ns: ns.Dense(7, use_bias=False), ((3, 4),)),
    Case("leading_dims_inits", lambda ns: ns.Dense(5, kernel_init=_normal, bias_init=_normal,
                                                   name="proj"), ((3, 2, 6, 4),)),
]

LINEN_DENSE_GENERAL = [
    Case("features_tuple", lambda ns: ns.DenseGeneral((2, 3)), ((3, 4),)),
    Case("axis_pair", lambda ns: ns.DenseGeneral(5, axis=(-2, -1)), ((3, 2, 4),)),
    Case("axis_pair_features_tuple", lambda ns: ns.DenseGeneral(
        (2, 3), axis=(-2, -1), bias_init=_normal), ((3, 5, 2, 4),)),
    Case("no_bias", lambda ns: ns.DenseGeneral(6, use_bias=False), ((3, 4),)),
]

LINEN_CONV = [
    Case("1d_stride2_same", lambda ns: ns.Conv(3, (3,), strides=2), ((2, 9, 4),)),
    Case("1d_causal_dilated", lambda ns: ns.Conv(3, (3,), padding="CAUSAL",
                                                 kernel_dilation=2), ((2, 9, 4),)),
    Case("2d_same", lambda ns: ns.Conv(3, (3, 3)), ((2, 7, 7, 4),)),
    Case("2d_valid_strides", lambda ns: ns.Conv(3, (3, 2), strides=(2, 1),
                                                padding="VALID"), ((2, 7, 7, 4),)),
    Case("2d_circular", lambda ns: ns.Conv(3, (3, 2), padding="CIRCULAR",
                                           bias_init=_normal), ((2, 6, 5, 4),)),
    Case("2d_reflect", lambda ns: ns.Conv(3, (3, 3), padding="REFLECT"), ((2, 6, 5, 4),)),
    Case("2d_explicit", lambda ns: ns.Conv(3, (2, 3), padding=((1, 0), (0, 2))),
         ((2, 6, 5, 4),)),
    Case("2d_int_padding", lambda ns: ns.Conv(3, (3, 3), padding=1), ((2, 6, 5, 4),)),
    Case("2d_kernel_dilation", lambda ns: ns.Conv(3, (3, 3), kernel_dilation=2),
         ((2, 7, 7, 4),)),
    Case("2d_input_dilation", lambda ns: ns.Conv(3, (2, 2), input_dilation=2,
                                                 padding=((1, 1), (0, 1))),
         ((2, 4, 4, 4),)),
    Case("2d_groups", lambda ns: ns.Conv(6, (3, 3), feature_group_count=2), ((2, 7, 7, 4),)),
    Case("2d_no_bias", lambda ns: ns.Conv(3, (3, 3), use_bias=False), ((2, 7, 7, 4),)),
    Case("2d_unbatched", lambda ns: ns.Conv(3, (3, 3)), ((7, 7, 4),)),
    Case("3d_strides_valid", lambda ns: ns.Conv(3, (2, 2, 2), strides=(1, 2, 1),
                                                padding="VALID"), ((2, 5, 5, 5, 2),)),
    Case("3d_circular_groups", lambda ns: ns.Conv(4, (3, 3, 3), padding="CIRCULAR",
                                                  feature_group_count=2),
         ((2, 4, 4, 4, 2),)),
]

LINEN_LAYER_NORM = [
    Case("default", lambda ns: ns.LayerNorm(), ((3, 4, 6),)),
    Case("no_scale", lambda ns: ns.LayerNorm(use_scale=False), ((3, 6),)),
    Case("no_bias", lambda ns: ns.LayerNorm(use_bias=False, scale_init=_normal), ((3, 6),)),
    Case("reduction_axes_pair", lambda ns: ns.LayerNorm(reduction_axes=(-2, -1)),
         ((3, 4, 6),)),
    Case("feature_axes_pair", lambda ns: ns.LayerNorm(
        reduction_axes=(-2, -1), feature_axes=(-2, -1), bias_init=_normal,
        scale_init=_normal), ((3, 4, 6),)),
    Case("eps_exact_variance", lambda ns: ns.LayerNorm(epsilon=1e-3, use_fast_variance=False),
         ((3, 6),)),
]

LINEN_ATTENTION = [
    Case("self", lambda ns: ns.MultiHeadDotProductAttention(num_heads=2, qkv_features=8),
         ((2, 5, 8),)),
    Case("cross_mask", lambda ns: ns.MultiHeadDotProductAttention(
        num_heads=2, qkv_features=6, out_features=5), ((2, 3, 8), (2, 5, 6)),
         lambda: {"mask": _mask(3, 5, batch=2)}),
    Case("self_mask_normalize_qk_no_bias", lambda ns: ns.MultiHeadDotProductAttention(
        num_heads=2, qkv_features=4, normalize_qk=True, use_bias=False, name="attn"),
         ((2, 4, 6),), lambda: {"mask": _mask(4, 4)}),
]


LINEN_GROUPS = {"Dense": LINEN_DENSE, "DenseGeneral": LINEN_DENSE_GENERAL,
                "Conv": LINEN_CONV, "LayerNorm": LINEN_LAYER_NORM,
                "MultiHeadDotProductAttention": LINEN_ATTENTION}


def _batches(groups):
  """Test parameters ``(class name, cases compiled together)``: all cases of a
  class in one program (ids ``Conv[15 cases]``), but attention one case at a
  time (there one large program compiles slower than several small ones).
  Compilation dominates: batching halves the cost of this file, and a batch is
  one test so that pytest-xdist never compiles it twice."""
  out = []
  for name, cases in groups.items():
    if "Attention" in name:
      out += [pytest.param(name, (c,), id=f"{name}-{c.name}") for c in cases]
    else:
      out.append(pytest.param(name, tuple(cases), id=f"{name}[{len(cases)} cases]"))
  return out


def _check_each(cases, check) -> None:
  """Runs ``check(case)`` for every case; fails listing every failing case."""
  failures = []
  for c in cases:
    try:
      check(c)
    except AssertionError as e:
      failures.append(f"case {c.name!r}: {e}")
  assert not failures, "\n".join(failures)


LINEN_BATCHES = _batches(LINEN_GROUPS)


def _tree_equal(a, b):
  """Same structure (paths), shapes, dtypes and bitwise values."""
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for (pa, la), (pb, lb) in zip(jax.tree_util.tree_flatten_with_path(a)[0],
                                jax.tree_util.tree_flatten_with_path(b)[0]):
    assert pa == pb
    if jnp.issubdtype(la.dtype, jax.dtypes.prng_key):
      la, lb = jax.random.key_data(la), jax.random.key_data(lb)
    assert la.shape == lb.shape and la.dtype == lb.dtype, (pa, la.shape, lb.shape)
    np.testing.assert_array_equal(la, lb, err_msg=jax.tree_util.keystr(pa))


class _Wrap(nn.Module):
  """Puts the layer inside a parent, as in a model (auto-names like ``Dense_0``)."""

  make: Callable[[Any], nn.Module]
  ns: Any

  @nn.compact
  def __call__(self, *xs, **kwargs):
    return self.make(self.ns)(*xs, **kwargs)


def _linen_results(cases: tuple[Case, ...]) -> dict[str, tuple]:
  """``{case name: (v_orig, v_new, y_orig, y_new)}``, one compiled program."""
  wraps = [(_Wrap(c.make, nn), _Wrap(c.make, fl), c.kwargs()) for c in cases]

  def run(key, xs_all):
    out = []
    for (orig, new, kw), xs in zip(wraps, xs_all):
      v_orig, v_new = orig.init(key, *xs, **kw), new.init(key, *xs, **kw)
      out.append((v_orig, v_new, orig.apply(v_orig, *xs, **kw),
                  new.apply(v_orig, *xs, **kw)))
    return out

  results = jax.jit(run)(jax.random.key(42), [_inputs(c.x_shapes) for c in cases])
  return {c.name: r for c, r in zip(cases, results)}


@pytest.mark.parametrize("cls_name, cases", LINEN_BATCHES)
def test_linen_init_and_forward_parity(cls_name, cases):
  orig_cls, new_cls = getattr(nn, cls_name), getattr(fl, cls_name)
  assert issubclass(new_cls, orig_cls) and new_cls.__name__ == orig_cls.__name__
  results = _linen_results(cases)

  def check(case):
    v_orig, v_new, y_orig, y_new = results[case.name]
    assert set(v_new) == set(v_orig) == {"params"}
    _tree_equal(v_new, v_orig)
    assert y_new.shape == y_orig.shape and y_new.dtype == y_orig.dtype == jnp.float32
    np.testing.assert_array_equal(y_new, y_orig)

  _check_each(cases, check)


@pytest.mark.parametrize("name", ["Dense", "DenseGeneral", "Conv", "LayerNorm",
                                  "MultiHeadDotProductAttention"])
def test_linen_auto_names_match(name):
  """Auto-names (``Dense_0``, ...) come from the class name: a drop-in and an
  original of the same kind share one counter, exactly as two originals would."""
  assert getattr(fl, name).__name__ == name

  class Two(nn.Module):
    @nn.compact
    def __call__(self, x):
      return fl.Dense(4)(x) + nn.Dense(4)(x) + fl.Dense(4)(x)

  shapes = jax.eval_shape(Two().init, jax.random.key(0), jnp.ones((1, 3), jnp.float32))
  assert sorted(shapes["params"]) == ["Dense_0", "Dense_1", "Dense_2"]


def test_linen_attention_alias():
  assert fl.MultiHeadAttention is fl.MultiHeadDotProductAttention


# -------------------------------------------------------------------- NNX ---

NNX_LINEAR = [
    Case("default", lambda ns, r: ns.Linear(4, 7, rngs=r), ((3, 4),)),
    Case("no_bias", lambda ns, r: ns.Linear(4, 7, use_bias=False, rngs=r), ((3, 4),)),
    Case("leading_dims_inits", lambda ns, r: ns.Linear(4, 5, kernel_init=_normal,
                                                       bias_init=_normal, rngs=r),
         ((3, 2, 6, 4),)),
]

NNX_LINEAR_GENERAL = [
    Case("features_tuple", lambda ns, r: ns.LinearGeneral(4, (2, 3), rngs=r), ((3, 4),)),
    Case("axis_pair", lambda ns, r: ns.LinearGeneral((2, 4), 5, axis=(-2, -1), rngs=r),
         ((3, 2, 4),)),
    Case("axis_pair_features_tuple", lambda ns, r: ns.LinearGeneral(
        (2, 4), (2, 3), axis=(-2, -1), bias_init=_normal, rngs=r), ((3, 5, 2, 4),)),
    Case("no_bias", lambda ns, r: ns.LinearGeneral(4, 6, use_bias=False, rngs=r), ((3, 4),)),
]

NNX_CONV = [
    Case("1d_stride2_same", lambda ns, r: ns.Conv(4, 3, (3,), strides=2, rngs=r),
         ((2, 9, 4),)),
    Case("1d_causal_dilated", lambda ns, r: ns.Conv(4, 3, (3,), padding="CAUSAL",
                                                    kernel_dilation=2, rngs=r),
         ((2, 9, 4),)),
    Case("2d_valid_strides", lambda ns, r: ns.Conv(4, 3, (3, 2), strides=(2, 1),
                                                   padding="VALID", rngs=r),
         ((2, 7, 7, 4),)),
    Case("2d_circular", lambda ns, r: ns.Conv(4, 3, (3, 2), padding="CIRCULAR",
                                              bias_init=_normal, rngs=r), ((2, 6, 5, 4),)),
    Case("2d_explicit", lambda ns, r: ns.Conv(4, 3, (2, 3), padding=((1, 0), (0, 2)),
                                              rngs=r), ((2, 6, 5, 4),)),
    Case("2d_kernel_dilation", lambda ns, r: ns.Conv(4, 3, (3, 3), kernel_dilation=2,
                                                     rngs=r), ((2, 7, 7, 4),)),
    Case("2d_input_dilation", lambda ns, r: ns.Conv(4, 3, (2, 2), input_dilation=2,
                                                    padding=((1, 1), (0, 1)), rngs=r),
         ((2, 4, 4, 4),)),
    Case("2d_groups", lambda ns, r: ns.Conv(4, 6, (3, 3), feature_group_count=2, rngs=r),
         ((2, 7, 7, 4),)),
    Case("2d_no_bias", lambda ns, r: ns.Conv(4, 3, (3, 3), use_bias=False, rngs=r),
         ((2, 7, 7, 4),)),
    Case("3d_strides_valid", lambda ns, r: ns.Conv(2, 3, (2, 2, 2), strides=(1, 2, 1),
                                                   padding="VALID", rngs=r),
         ((2, 5, 5, 5, 2),)),
]

NNX_LAYER_NORM = [
    Case("default", lambda ns, r: ns.LayerNorm(6, rngs=r), ((3, 4, 6),)),
    Case("no_scale", lambda ns, r: ns.LayerNorm(6, use_scale=False, rngs=r), ((3, 6),)),
    Case("no_bias", lambda ns, r: ns.LayerNorm(6, use_bias=False, scale_init=_normal,
                                               rngs=r), ((3, 6),)),
    Case("reduction_axes_pair", lambda ns, r: ns.LayerNorm(6, reduction_axes=(-2, -1),
                                                           rngs=r), ((3, 4, 6),)),
    # NNX keeps the scale/bias of several feature axes flat: [4 * 6].
    Case("feature_axes_pair", lambda ns, r: ns.LayerNorm(
        24, reduction_axes=(-2, -1), feature_axes=(-2, -1), bias_init=_normal,
        scale_init=_normal, rngs=r), ((3, 4, 6),)),
]

NNX_ATTENTION = [
    Case("self", lambda ns, r: ns.MultiHeadAttention(2, 8, decode=False, rngs=r),
         ((2, 5, 8),)),
    Case("cross_mask", lambda ns, r: ns.MultiHeadAttention(
        2, 8, qkv_features=6, out_features=5, in_kv_features=6, bias_init=_normal,
        decode=False, rngs=r), ((2, 3, 8), (2, 5, 6)),
         lambda: {"mask": _mask(3, 5, batch=2)}),
    Case("self_mask_normalize_qk_no_bias_no_rngs", lambda ns, r: ns.MultiHeadAttention(
        2, 6, qkv_features=4, normalize_qk=True, use_bias=False, keep_rngs=False,
        decode=False, rngs=r), ((2, 4, 6),), lambda: {"mask": _mask(4, 4)}),
]


NNX_GROUPS = {"Linear": NNX_LINEAR, "LinearGeneral": NNX_LINEAR_GENERAL,
              "Conv": NNX_CONV, "LayerNorm": NNX_LAYER_NORM,
              "MultiHeadAttention": NNX_ATTENTION}
NNX_BATCHES = _batches(NNX_GROUPS)


def _variable_types(state):
  return [type(v) for v in jax.tree.leaves(state, is_leaf=lambda v: isinstance(v, nnx.Variable))]


def _nnx_results(cls_name: str, cases: tuple[Case, ...]) -> dict[str, tuple]:
  """``{case name: (s_orig, s_new, y_orig, y_new)}``, one compiled program; the
  modules are built inside it with ``nnx.Rngs(7)``."""
  new_cls = getattr(fx, cls_name)
  # The graphs (static) of the originals, from abstract construction.
  g_orig = [nnx.graphdef(nnx.eval_shape(lambda c=c: c.make(nnx, nnx.Rngs(0))))
            for c in cases]
  g_new = [nnx.graphdef(nnx.eval_shape(lambda c=c: c.make(fx, nnx.Rngs(0))))
           for c in cases]

  def run(xs_all):
    out = []
    for c, go, gn, xs in zip(cases, g_orig, g_new, xs_all):
      kw = c.kwargs()
      orig, new = c.make(nnx, nnx.Rngs(7)), c.make(fx, nnx.Rngs(7))
      assert type(new) is new_cls and type(orig) is new_cls.__bases__[-1]
      s_orig, s_new = nnx.state(orig), nnx.state(new)
      # The drop-in's graph with the original's state.
      out.append((s_orig, s_new, nnx.merge(go, s_orig)(*xs, **kw),
                  nnx.merge(gn, s_orig)(*xs, **kw)))
    return out

  results = jax.jit(run)([_inputs(c.x_shapes) for c in cases])
  return {c.name: r for c, r in zip(cases, results)}


@pytest.mark.parametrize("cls_name, cases", NNX_BATCHES)
def test_nnx_state_and_forward_parity(cls_name, cases):
  orig_cls, new_cls = getattr(nnx, cls_name), getattr(fx, cls_name)
  assert issubclass(new_cls, orig_cls) and new_cls.__name__ == orig_cls.__name__
  assert new_cls.__bases__[-1] is orig_cls
  results = _nnx_results(cls_name, cases)

  def check(case):
    s_orig, s_new, y_orig, y_new = results[case.name]
    _tree_equal(s_new, s_orig)
    assert _variable_types(s_new) == _variable_types(s_orig)
    assert y_new.shape == y_orig.shape and y_new.dtype == y_orig.dtype == jnp.float32
    np.testing.assert_array_equal(y_new, y_orig)

  _check_each(cases, check)


def test_nnx_attention_children_are_left_untouched():
  """The projections of ``ntklayers.flax.nnx.MultiHeadAttention`` stay stock NNX
  modules (no re-classing); they are reported by the NNX interceptor, which
  patches the stock ``__call__`` only while an NTK is captured."""
  stock_call = nnx.LinearGeneral.__dict__["__call__"]
  mha = nnx.eval_shape(lambda: fx.MultiHeadAttention(2, 6, normalize_qk=True,
                                                     rngs=nnx.Rngs(0)))
  for attr in ("query", "key", "value", "out"):
    assert type(getattr(mha, attr)) is nnx.LinearGeneral
  assert type(mha.query_ln) is nnx.LayerNorm and type(mha.key_ln) is nnx.LayerNorm
  x = jnp.ones((2, 3, 6), jnp.float32)
  model = fx.MultiHeadAttention(2, 6, decode=False, rngs=nnx.Rngs(0))
  blocks = fx.ntk_fn(layerwise=True, trace_axes=(1, 2))(model, x)
  assert sorted(blocks) == ["key", "out", "query", "value"], sorted(blocks)
  assert nnx.LinearGeneral.__dict__["__call__"] is stock_call  # restored after capture
