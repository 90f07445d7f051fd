"""Every public drop-in computes what the stock layer computes, under ``jax.jit`` and
``jax.vmap`` (after Haiku's ``integration/jax_transforms_test.py``).

``CASES`` holds one configuration per public drop-in class (``dropins.py``): how
to construct it, an input and call arguments. The stock class is the framework
class the drop-in subclasses. Both get the same parameters (and state), and their
outputs (with the updated state, for BatchNorm in training mode) must agree

* under ``jax.jit``, on one batch ``[N, ...]``;
* under ``jax.vmap`` over a leading axis ``[V, N, ...]`` (parameters not mapped).

Inputs and parameters are float32 (the Flax default ``param_dtype``); the
outputs should be bitwise equal, ``rtol`` is ``RTOL`` unless a case says
otherwise. ``test_every_public_class_has_a_case`` fails for a public class without
a case, so a new drop-in comes with one.

The tiny ``test_two_cpu_devices`` checks conftest's ``jax_num_cpu_devices=2``.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable
from typing import Any

import dropins
import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

N, V = 3, 2  # batch size, size of the vmapped leading axis
RTOL = 1e-6


@dataclasses.dataclass(frozen=True)
class Case:
  """How to run one drop-in class ``cls`` (and its stock base).

  Attributes:
    make: Haiku: ``make(cls) -> fn(x)`` (run inside ``hk.transform_with_state``);
      linen: ``make(cls) -> module``; NNX: ``make(cls, rngs) -> module``.
    x_shape: one batch ``[N, *x_shape]``.
    vocab: integer ids in ``[0, vocab)`` instead of float inputs.
    call_kwargs: linen: keyword arguments of ``module.apply``.
    mutable: linen: ``mutable`` collections of ``module.apply``.
    standard: run under ``jax.numpy_dtype_promotion("standard")`` (Haiku's
      ``BatchNorm`` raises ``int32`` counters to float powers).
    rtol: relative tolerance of the comparison.
  """

  make: Callable[..., Any]
  x_shape: tuple[int, ...]
  vocab: int | None = None
  call_kwargs: dict[str, Any] = dataclasses.field(default_factory=dict)
  mutable: Any = False
  standard: bool = False
  rtol: float = RTOL


def _causal(t: int) -> jax.Array:
  return jnp.asarray(np.tril(np.ones((t, t), bool)))[None, None]


def _haiku_mha(cls):
  def fn(x):
    mha = cls(num_heads=2, key_size=4, w_init=hk.initializers.VarianceScaling(1.0))
    return mha(x, x, x, mask=_causal(x.shape[-2]))
  return fn


CASES: dict[str, Case] = {
    # ---------------------------------------------------------------- Haiku
    "ntklayers.haiku.Linear": Case(lambda cls: lambda x: cls(4)(x), (5,)),
    "ntklayers.haiku.Conv1D": Case(lambda cls: lambda x: cls(4, 3, rate=2)(x), (6, 2)),
    "ntklayers.haiku.Conv2D": Case(lambda cls: lambda x: cls(4, 3, stride=2)(x), (5, 5, 2)),
    "ntklayers.haiku.Conv3D": Case(lambda cls: lambda x: cls(3, 2)(x), (3, 3, 3, 2)),
    "ntklayers.haiku.ConvND": Case(
        lambda cls: lambda x: cls(2, 4, 2, feature_group_count=2, padding="VALID")(x),
        (4, 4, 2)),
    "ntklayers.haiku.LayerNorm": Case(
        lambda cls: lambda x: cls(-1, create_scale=True, create_offset=True)(x), (4, 6)),
    "ntklayers.haiku.MultiHeadAttention": Case(_haiku_mha, (4, 8)),
    "ntklayers.haiku.Embed": Case(lambda cls: lambda x: cls(vocab_size=11, embed_dim=4)(x),
                                  (5,), vocab=11),
    "ntklayers.haiku.RMSNorm": Case(lambda cls: lambda x: cls(axis=-1)(x), (4, 6)),
    "ntklayers.haiku.GroupNorm": Case(lambda cls: lambda x: cls(groups=2)(x), (4, 6)),
    "ntklayers.haiku.BatchNorm": Case(
        lambda cls: lambda x: cls(True, True, 0.9)(x, is_training=True), (6,),
        standard=True),
    # ---------------------------------------------------------------- linen
    "ntklayers.flax.linen.Dense": Case(lambda cls: cls(4), (5,)),
    "ntklayers.flax.linen.DenseGeneral": Case(lambda cls: cls((2, 3), axis=(-2, -1)),
                                              (4, 5)),
    "ntklayers.flax.linen.Conv": Case(lambda cls: cls(4, (3, 3), strides=2), (5, 5, 2)),
    "ntklayers.flax.linen.LayerNorm": Case(lambda cls: cls(), (4, 6)),
    "ntklayers.flax.linen.MultiHeadDotProductAttention": Case(
        lambda cls: cls(num_heads=2, qkv_features=8), (4, 8),
        call_kwargs={"mask": _causal(4)}),
    "ntklayers.flax.linen.Embed": Case(lambda cls: cls(11, 4), (5,), vocab=11),
    "ntklayers.flax.linen.RMSNorm": Case(lambda cls: cls(), (4, 6)),
    "ntklayers.flax.linen.GroupNorm": Case(lambda cls: cls(num_groups=2), (4, 6)),
    "ntklayers.flax.linen.BatchNorm": Case(
        lambda cls: cls(use_running_average=False, momentum=0.9), (6,),
        mutable=["batch_stats"]),
    # ------------------------------------------------------------------ NNX
    "ntklayers.flax.nnx.Linear": Case(lambda cls, rngs: cls(5, 4, rngs=rngs), (5,)),
    "ntklayers.flax.nnx.LinearGeneral": Case(
        lambda cls, rngs: cls((4, 5), (2, 3), axis=(-2, -1), rngs=rngs), (4, 5)),
    "ntklayers.flax.nnx.Conv": Case(lambda cls, rngs: cls(2, 4, (3, 3), strides=2, rngs=rngs),
                                    (5, 5, 2)),
    "ntklayers.flax.nnx.LayerNorm": Case(lambda cls, rngs: cls(6, rngs=rngs), (4, 6)),
    "ntklayers.flax.nnx.MultiHeadAttention": Case(
        lambda cls, rngs: cls(num_heads=2, in_features=8, qkv_features=8, decode=False,
                              rngs=rngs), (4, 8)),
    "ntklayers.flax.nnx.Embed": Case(lambda cls, rngs: cls(11, 4, rngs=rngs), (5,), vocab=11),
    "ntklayers.flax.nnx.RMSNorm": Case(lambda cls, rngs: cls(6, rngs=rngs), (4, 6)),
    "ntklayers.flax.nnx.GroupNorm": Case(lambda cls, rngs: cls(6, num_groups=2, rngs=rngs),
                                         (4, 6)),
    "ntklayers.flax.nnx.BatchNorm": Case(lambda cls, rngs: cls(6, momentum=0.9, rngs=rngs),
                                         (6,)),
}


# ------------------------------------------------------------- helpers ---


def _inputs(case: Case, lead: tuple[int, ...], seed: int = 0) -> jax.Array:
  rng = np.random.default_rng(seed)
  shape = (*lead, N, *case.x_shape)
  if case.vocab is not None:
    return jnp.asarray(rng.integers(0, case.vocab, shape), jnp.int32)
  return jnp.asarray(rng.normal(size=shape), jnp.float32)


def _fill(tree: Any, seed: int = 1) -> Any:
  """Concrete values for an abstract parameter/state tree: floats uniform in
  [0.5, 1.5) (positive, so moving variances are valid), integers 1."""
  rng = np.random.default_rng(seed)

  def leaf(a):
    if jnp.issubdtype(a.dtype, jnp.floating):
      return jnp.asarray(rng.uniform(0.5, 1.5, a.shape), a.dtype)
    return jnp.ones(a.shape, a.dtype)

  return jax.tree.map(leaf, tree)


def _promotion(case: Case):
  return jax.numpy_dtype_promotion("standard") if case.standard else contextlib.nullcontext()


def _same_structure(a: Any, b: Any) -> None:
  sa, sb = jax.tree.structure(a), jax.tree.structure(b)
  assert sa == sb, f"drop-in and stock parameters differ:\n{sa}\n{sb}"
  shapes = [(x.shape, x.dtype) for x in jax.tree.leaves(a)]
  assert shapes == [(x.shape, x.dtype) for x in jax.tree.leaves(b)]


def pure_applies(qualified: str, case: Case, x: jax.Array):
  """``(apply_dropin, apply_stock, params)`` with ``apply(params, x) -> outputs``."""
  cls = dropins.canonical_classes()[qualified]
  stock = dropins.stock_class(cls)
  fw = dropins.framework(qualified)
  if fw == "haiku":
    nets = [hk.without_apply_rng(hk.transform_with_state(case.make(c))) for c in (cls, stock)]
    with _promotion(case):
      shapes = [jax.eval_shape(net.init, jax.random.key(0), x) for net in nets]
    _same_structure(*shapes)
    params, state = _fill(shapes[0])
    applies = [lambda p, x, net=net: net.apply(p, state, x) for net in nets]
  elif fw == "linen":
    modules = [case.make(c) for c in (cls, stock)]
    with _promotion(case):
      shapes = [jax.eval_shape(m.init, jax.random.key(0), x, **case.call_kwargs)
                for m in modules]
    _same_structure(*shapes)
    params = _fill(shapes[0])
    applies = [lambda p, x, m=m: m.apply(p, x, mutable=case.mutable, **case.call_kwargs)
               for m in modules]
  else:
    built = [case.make(c, nnx.Rngs(0)) for c in (cls, stock)]
    assert type(built[1]) is stock
    splits = [nnx.split(m) for m in built]
    _same_structure(splits[0][1], splits[1][1])
    params = splits[0][1]

    def nnx_apply(p, x, graphdef):
      module = nnx.merge(graphdef, p)
      return module(x), nnx.state(module)

    applies = [lambda p, x, g=g: nnx_apply(p, x, g) for g, _ in splits]

  def promoted(f):
    def g(*args):
      with _promotion(case):
        return f(*args)
    return g

  return promoted(applies[0]), promoted(applies[1]), params


def assert_trees_close(actual: Any, expected: Any, rtol: float) -> None:
  assert jax.tree.structure(actual) == jax.tree.structure(expected)
  for a, b in zip(jax.tree.leaves(actual), jax.tree.leaves(expected)):
    a, b = np.asarray(a), np.asarray(b)
    assert a.shape == b.shape and a.dtype == b.dtype, (a.shape, b.shape, a.dtype, b.dtype)
    scale = float(np.max(np.abs(b))) if b.size else 0.0
    np.testing.assert_allclose(a, b, rtol=rtol, atol=rtol * scale)


def _case_params():
  return [pytest.param(q, CASES[q], id=q) for q in sorted(dropins.canonical_classes())
          if q in CASES]


# --------------------------------------------------------------- tests ---


def test_every_public_class_has_a_case():
  public = dropins.canonical_classes()
  missing = sorted(set(public) - set(CASES))
  assert not missing, f"public drop-ins without a case in tests/test_transforms.py: {missing}"
  stale = sorted(set(CASES) - set(public))
  assert not stale, f"CASES of names that are not public drop-in classes: {stale}"


@pytest.mark.parametrize("qualified, case", _case_params())
def test_jit_matches_stock(qualified, case):
  x = _inputs(case, ())
  apply_d, apply_s, params = pure_applies(qualified, case, x)
  out_d = jax.jit(apply_d)(params, x)
  out_s = jax.jit(apply_s)(params, x)
  assert jax.tree.leaves(out_d)[0].shape[0] == N
  assert_trees_close(out_d, out_s, case.rtol)


@pytest.mark.parametrize("qualified, case", _case_params())
def test_vmap_matches_stock(qualified, case):
  xs = _inputs(case, (V,))
  apply_d, apply_s, params = pure_applies(qualified, case, xs[0])
  out_d = jax.vmap(apply_d, in_axes=(None, 0))(params, xs)
  out_s = jax.vmap(apply_s, in_axes=(None, 0))(params, xs)
  assert jax.tree.leaves(out_d)[0].shape[:2] == (V, N)
  assert_trees_close(out_d, out_s, case.rtol)


def test_two_cpu_devices():
  """conftest sets ``jax_num_cpu_devices=2`` before the backend initializes."""
  assert len(jax.devices()) == 2
  assert jax.devices()[0].platform == "cpu"
