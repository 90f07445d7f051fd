"""Each ``ntklayers.haiku`` drop-in against its Haiku original.

For every configuration: ``init`` with the same rng and input gives the same
parameter tree (module names, parameter names, shapes, dtypes and values), and
``apply`` with the same parameters gives exactly equal outputs (bitwise). Both
run in float32, Haiku's default.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ntklayers
import ntklayers.haiku as nh


@dataclasses.dataclass(frozen=True)
class Case:
  """``make(module_cls)`` builds the Haiku function for either implementation."""

  name: str
  make: Callable[[Any], Callable[..., jax.Array]]
  x_shapes: tuple[tuple[int, ...], ...]


def _inputs(shapes, seed=0):
  rng = np.random.default_rng(seed)
  return tuple(jnp.asarray(rng.normal(size=s), jnp.float32) for s in shapes)


def _rand_init():
  return hk.initializers.RandomNormal(0.5)


def _call(cls, *args, **kwargs):
  return lambda x: cls(*args, **kwargs)(x)


# --------------------------------------------------------------- Linear ---

LINEAR = [
    Case("default", lambda L: _call(L, 7), ((3, 4),)),
    Case("no_bias", lambda L: _call(L, 7, with_bias=False), ((3, 4),)),
    Case("inits_leading_axes", lambda L: _call(L, 5, w_init=_rand_init(),
                                               b_init=_rand_init(), name="proj"),
         ((3, 2, 6, 4),)),
    Case("unbatched", lambda L: _call(L, 3), ((4,),)),
]

# ----------------------------------------------------------------- Conv ---


def _conv_cases(dims: int):
  sp = (7,) * dims
  last = ((2, *sp, 4),)
  first = ((2, 4, *sp),)
  data_first = {1: "NCW", 2: "NCHW", 3: "NCDHW"}[dims]
  cls_name = {1: "Conv1D", 2: "Conv2D", 3: "Conv3D"}[dims]
  cases = [
      Case("default", lambda C: _call(C, 3, 3), last),
      Case("stride2_same", lambda C: _call(C, 3, 3, stride=2), last),
      Case("valid", lambda C: _call(C, 3, 2, padding="VALID"), last),
      Case("stride2_valid", lambda C: _call(C, 3, 3, stride=2, padding="VALID"), last),
      Case("rate2", lambda C: _call(C, 3, 3, rate=2), last),
      Case("groups2", lambda C: _call(C, 6, 3, feature_group_count=2), last),
      Case("no_bias", lambda C: _call(C, 3, 3, with_bias=False), last),
      Case("channels_first", lambda C: _call(C, 3, 3, stride=2, data_format=data_first),
           first),
      Case("explicit_padding", lambda C: _call(C, 3, 2, padding=((1, 0),) * dims), last),
      Case("padfn_causal", lambda C: _call(C, 3, 3, padding=hk.pad.causal), last),
      Case("kernel_tuple_inits", lambda C: _call(C, 2, (2,) + (3,) * (dims - 1),
                                                 w_init=_rand_init(), b_init=_rand_init()),
           last),
  ]
  return [(cls_name, c) for c in cases]


CONV = _conv_cases(1) + _conv_cases(2) + _conv_cases(3)

CONVND = [
    Case("nd2", lambda C: _call(C, 2, 3, (2, 3), stride=(2, 1)), ((2, 6, 5, 2),)),
    Case("nd1_valid_groups", lambda C: _call(C, 1, 4, 3, padding="VALID",
                                             feature_group_count=2), ((2, 8, 4),)),
]

# ------------------------------------------------------------ LayerNorm ---

LAYER_NORM = [
    Case("scale_offset_last", lambda N: _call(N, -1, True, True), ((3, 4, 6),)),
    Case("scale_only", lambda N: _call(N, -1, True, False), ((3, 6),)),
    Case("offset_only", lambda N: _call(N, -1, False, True), ((3, 6),)),
    Case("neither", lambda N: _call(N, -1, False, False), ((3, 6),)),
    Case("axes_12_param_last", lambda N: _call(N, (1, 2), True, True, param_axis=-1),
         ((3, 4, 6),)),
    Case("slice_axis", lambda N: _call(N, slice(1, None), True, True, param_axis=-1),
         ((3, 4, 6),)),
    Case("param_axis_1", lambda N: _call(N, -1, True, True, param_axis=1), ((3, 4, 6),)),
    Case("param_axes_12", lambda N: _call(N, -1, True, True, param_axis=(1, 2)),
         ((3, 4, 6),)),
    Case("fast_variance_eps_inits", lambda N: _call(
        N, -1, True, True, eps=1e-3, use_fast_variance=True, scale_init=_rand_init(),
        offset_init=_rand_init()), ((3, 6),)),
]

# ------------------------------------------------------------ Attention ---


def _mha(cls, mask=None, **kw):
  # Uniform VarianceScaling compiles much faster than the (default) truncated
  # normal; the "self" case keeps the truncated normal.
  kw.setdefault("w_init", hk.initializers.VarianceScaling(1.0, distribution="uniform"))

  def fn(q, kv=None):
    kv = q if kv is None else kv
    return cls(**kw)(q, kv, kv, mask=mask)

  return fn


_MASK = jnp.asarray(np.tril(np.ones((3, 5), bool), k=1))[None, None]

ATTENTION = [
    Case("self", lambda A: _mha(A, num_heads=2, key_size=4,
                                w_init=hk.initializers.VarianceScaling(1.0)),
         ((2, 5, 8),)),
    Case("cross", lambda A: _mha(A, num_heads=2, key_size=3), ((2, 3, 8), (2, 5, 6))),
    Case("cross_mask", lambda A: _mha(A, mask=_MASK, num_heads=2, key_size=3),
         ((2, 3, 8), (2, 5, 6))),
    Case("value_model_size", lambda A: _mha(A, num_heads=3, key_size=2,
                                            value_size=5, model_size=7),
         ((2, 4, 6),)),
    Case("no_bias_b_init", lambda A: _mha(A, num_heads=2, key_size=2,
                                          with_bias=False, name="attn"), ((2, 4, 6),)),
    Case("b_init", lambda A: _mha(A, num_heads=2, key_size=2,
                                  b_init=_rand_init()), ((2, 4, 6),)),
    Case("unbatched", lambda A: _mha(A, num_heads=2, key_size=2), ((4, 6),)),
    Case("extra_leading_dims", lambda A: _mha(A, num_heads=2, key_size=2),
         ((2, 3, 4, 6),)),
]


def _params(cases, hk_cls, nh_cls):
  return [pytest.param(hk_cls, nh_cls, c, id=f"{hk_cls.__name__}-{c.name}") for c in cases]


ALL_CASES = (
    _params(LINEAR, hk.Linear, ntklayers.Linear)
    + [pytest.param(getattr(hk, n), getattr(nh, n), c, id=f"{n}-{c.name}") for n, c in CONV]
    + _params(CONVND, hk.ConvND, nh.ConvND)
    + _params(LAYER_NORM, hk.LayerNorm, nh.LayerNorm)
    + _params(ATTENTION, hk.MultiHeadAttention, nh.MultiHeadAttention)
)


def _shapes_dtypes(tree):
  return jax.tree.map(lambda a: (a.shape, a.dtype), tree)


@pytest.mark.parametrize("hk_cls, nh_cls, case", ALL_CASES)
def test_init_and_forward_parity(hk_cls, nh_cls, case):
  assert issubclass(nh_cls, hk_cls)
  xs = _inputs(case.x_shapes)
  orig = hk.without_apply_rng(hk.transform(case.make(hk_cls)))
  drop_in = hk.without_apply_rng(hk.transform(case.make(nh_cls)))
  key = jax.random.key(42)

  # One program for both inits (compiling Haiku's initializers dominates).
  p_orig, p_new = jax.jit(lambda k, *x: (orig.init(k, *x), drop_in.init(k, *x)))(key, *xs)
  # Same module and parameter names, shapes and dtypes ...
  assert jax.tree.structure(p_new) == jax.tree.structure(p_orig)
  assert _shapes_dtypes(p_new) == _shapes_dtypes(p_orig)
  assert {m: sorted(v) for m, v in p_new.items()} == {m: sorted(v) for m, v in p_orig.items()}
  # ... and the same initial values from the same rng.
  jax.tree.map(np.testing.assert_array_equal, p_new, p_orig)

  y_orig = jax.jit(orig.apply)(p_orig, *xs)
  y_new = jax.jit(drop_in.apply)(p_orig, *xs)
  assert y_new.shape == y_orig.shape and y_new.dtype == y_orig.dtype
  np.testing.assert_array_equal(y_new, y_orig)


def test_linear_alias():
  assert ntklayers.Linear is nh.Linear


@pytest.mark.parametrize("name", ["Linear", "Conv1D", "Conv2D", "Conv3D", "ConvND",
                                  "LayerNorm", "MultiHeadAttention"])
def test_drop_in_keeps_haiku_class_name(name):
  """Auto-generated module names (``linear``, ``conv2_d``, ...) come from the class name."""
  assert getattr(nh, name).__name__ == getattr(hk, name).__name__
  assert issubclass(getattr(nh, name), getattr(hk, name))
