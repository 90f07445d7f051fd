"""Kernels of the drop-ins ``Embed`` and ``BatchNorm`` beyond the registry models, and
drop-in configurations without an exact description (Haiku, linen, NNX).

* Embed: its kernel is a count-matching Gram of token ids. The activation route
  never forms anything vocabulary-sized (checked on the jaxpr of the whole
  capture and contraction with a vocabulary of 100000, and against a closed
  form); the Jacobian route is taken when the cost model says it is cheaper
  (long sequences, tiny vocabulary), and both routes agree;
* BatchNorm: ``use_running_average=False`` passed at call time declares that
  samples interact;
* configurations without an exact description go to the exact fallback.

Parity with the original layers and the registry models: ``test_new_layers.py``.
"""

from __future__ import annotations

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.extend.core import jaxprs_in_params

import models
import models_flax
import ntklayers
import ntklayers.haiku as nh
from ntklayers._core import _rules_embed
from ntklayers._core._axes import OutputSpec
from ntklayers._core._ops import jacobian_kernel
from ntklayers.flax import linen as fl
from ntklayers.flax import nnx as fx
from reference import assert_rel_close, reference_ntk
from test_new_layers import F64, TOL64, _ids, _normal, _standard

FALLBACK = r"handled by the exact generic fallback"


# ------------------------------------------------------------ (c) Embed ---

VOCAB = 100_000


def _outputs(jaxpr):
  """``(primitive, shape)`` of every value computed in ``jaxpr`` and its sub-jaxprs."""
  for eqn in jaxpr.eqns:
    for v in eqn.outvars:
      yield eqn.primitive.name, tuple(getattr(v.aval, "shape", ()))
    for sub in jaxprs_in_params(eqn.params):
      yield from _outputs(getattr(sub, "jaxpr", sub))


def _capture_contract(f):
  return lambda p, a, b: ntklayers.contract(ntklayers.capture(f, p, a),
                                            ntklayers.capture(f, p, b))


def _vocab_sized(jaxpr, table_shape):
  """Computed values with a vocabulary-sized axis (one-hot ids, Jacobians), except
  the table itself (e.g. a cast of it)."""
  return [(prim, shape) for prim, shape in _outputs(jaxpr.jaxpr)
          if shape != table_shape and any(d >= VOCAB for d in shape)]


def test_embed_large_vocab_haiku_closed_form_and_no_vocab_sized_arrays():
  """``f(ids) = sum_t E[ids[t]]``: ``K[n, m, d, e] = delta_de * #{(t, s): ids1[n, t] ==
  ids2[m, s]}``. A one-hot ``[N, T, V]`` or a Jacobian ``[N, O, V * D]`` would have a
  vocabulary-sized axis; none is computed."""
  d = 4
  net = hk.without_apply_rng(hk.transform(lambda ids: nh.Embed(VOCAB, d)(ids).sum(axis=1)))
  x1 = _ids((3, 6), 4, seed=1) * 33_333  # a few ids over the whole vocabulary, repeated
  x2 = jnp.concatenate([x1[:1, ::-1], _ids((1, 6), VOCAB, seed=2)])
  params = {"embed": {"embeddings": _normal((VOCAB, d), dtype=F64)}}
  jaxpr = jax.make_jaxpr(_capture_contract(net.apply))(params, x1, x2)
  assert _vocab_sized(jaxpr, (VOCAB, d)) == []
  k = ntklayers.ntk(net.apply, params, x1, x2)
  counts = (np.asarray(x1)[:, None, :, None] == np.asarray(x2)[None, :, None, :]).sum((2, 3))
  expected = counts[:, :, None, None] * np.eye(d)[None, None]
  assert counts.max() >= 2  # repeated ids do count
  np.testing.assert_array_equal(np.asarray(k), expected)


def test_embed_large_vocab_flax_no_vocab_sized_arrays():
  d = 3
  x1, x2 = _ids((3, 5), VOCAB, seed=3), _ids((2, 5), VOCAB, seed=4)
  table = _normal((VOCAB, d), dtype=F64)

  module = fl.Embed(VOCAB, d, param_dtype=F64)
  f_linen = lambda p, x: module.apply({"params": p}, x).sum(axis=1)
  jaxpr = jax.make_jaxpr(_capture_contract(f_linen))({"embedding": table}, x1, x2)
  assert _vocab_sized(jaxpr, (VOCAB, d)) == []

  layer = nnx.eval_shape(lambda: fx.Embed(VOCAB, d, param_dtype=F64, rngs=nnx.Rngs(0)))
  graphdef, state = nnx.split(layer)
  state = jax.tree.map(lambda _: table, state)
  f_nnx = lambda p, x: nnx.merge(graphdef, p)(x).sum(axis=1)
  jaxpr = jax.make_jaxpr(_capture_contract(f_nnx))(state, x1, x2)
  assert _vocab_sized(jaxpr, (VOCAB, d)) == []


def test_embed_jacobian_route_when_cheaper():
  """Long sequences over a vocabulary of 3: the cost model prefers the Jacobian
  (a scatter into ``[N, O, 4 * D]``), which is exact too."""
  t = 48
  net = hk.without_apply_rng(hk.transform(
      lambda ids: ntklayers.Linear(2)(jnp.tanh(nh.Embed(3, 4)(ids)).mean(axis=1))))
  x1, x2 = _ids((3, t), 3, seed=5), _ids((2, t), 3, seed=6)
  params = models.init_params(net.init, F64, x1)
  cache = ntklayers.capture(net.apply, params, x1)
  index = cache.layer_names.index("embed")
  group = cache.meta.plan.groups[index]
  spec = OutputSpec.create((3, 2), (2, 2))
  (x, g), = cache.layers[index]
  act, jac = group.op.costs(spec, [(x.shape[1:], g.shape[1:])],
                            [((2,) + x.shape[2:], (2,) + g.shape[2:])], False)
  assert jac < act
  jaxpr = jax.make_jaxpr(_capture_contract(net.apply))(params, x1, x2)
  assert any(prim.startswith("scatter") for prim, _ in _outputs(jaxpr.jaxpr))
  k = ntklayers.ntk(net.apply, params, x1, x2)
  assert_rel_close(k, reference_ntk(net.apply, params, x1, x2), TOL64)


@pytest.mark.parametrize("case", [dict(), dict(trace_axes=(-1,)), dict(diagonal_axes=(0,)),
                                  dict(trace_axes=(0,), diagonal_axes=(-1,))],
                         ids=["plain", "trace-1", "diag0", "trace0-diag-1"])
@pytest.mark.parametrize("shared", [False, True], ids=["per_example", "coupled"])
def test_gather_routes_agree(case, shared):
  """The activation kernel (ids compared) equals ``J1 . J2`` of the scatter Jacobians,
  for per-example ids ``[N, T]`` and for one shared primal (samples that interact)."""
  op = _rules_embed.GATHER
  n, o, t, d, vocab = 3, 2, 5, 4, 6
  k_bits = _rules_embed.id_bits(vocab)
  rows = _ids((1 if shared else n, t), vocab, seed=7)
  rows2 = rows if (shared or 0 in case.get("trace_axes", ()) + case.get(
      "diagonal_axes", ())) else _ids((n, t), vocab, seed=8)
  x1, x2 = _rules_embed.encode_ids(rows, k_bits), _rules_embed.encode_ids(rows2, k_bits)
  g1, g2 = _normal((n, o, t, d), seed=9, dtype=F64), _normal((n, o, t, d), seed=10, dtype=F64)
  if 0 in case.get("trace_axes", ()) + case.get("diagonal_axes", ()):
    g2 = g1
  spec = OutputSpec.create((n, o), (n, o), **case)
  act = op.activation_kernel(spec, x1, g1, x2, g2, True, False)
  jac = jacobian_kernel(spec, op.jacobian(x1, g1, True, False), op.jacobian(x2, g2, True, False))
  assert_rel_close(act, jac, 1e-13)


def test_embed_out_of_range_ids_count_as_jax_differentiates():
  """Haiku ``ARRAY_INDEX`` (ids in ``[-V, 0)`` wrap, the rest clamp in the forward
  pass but have no gradient) and ``ONE_HOT``; linen ``jnp.take`` with negative ids."""
  x1, x2 = _ids((3, 5), 9, seed=11, low=-9), _ids((2, 5), 9, seed=12, low=-9)
  for style in ("ARRAY_INDEX", "ONE_HOT"):
    net = hk.without_apply_rng(hk.transform(
        lambda ids, style=style: nh.Embed(5, 2, lookup_style=style)(ids).reshape(
            ids.shape[0], -1)))
    params = {"embed": {"embeddings": _normal((5, 2), dtype=F64)}}
    k = ntklayers.ntk(net.apply, params, x1, x2)
    assert_rel_close(k, reference_ntk(net.apply, params, x1, x2), TOL64)
  module = fl.Embed(9, 2, param_dtype=F64)
  f = lambda p, x: module.apply({"params": p}, x).reshape(x.shape[0], -1)
  params = {"embedding": _normal((9, 2), dtype=F64)}
  k = ntklayers.ntk(f, params, x1, x2)
  assert_rel_close(k, reference_ntk(f, params, x1, x2), TOL64)


# ------------------------------------------------- (d) BatchNorm training ---


def test_nnx_batchnorm_call_time_training_declares_coupling():
  """``use_running_average=False`` passed at call time (the attribute says True):
  the drop-in declares that samples interact itself."""

  class Net(nnx.Module):
    def __init__(self, rngs):
      self.bn = fx.BatchNorm(4, use_running_average=True, param_dtype=F64, rngs=rngs)
      self.head = fx.Linear(4, 2, param_dtype=F64, rngs=rngs)

    def __call__(self, x):
      return self.head(self.bn(x, use_running_average=False))

  with _standard():
    model = models_flax.nnx_model(Net, F64)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    f = lambda p, x: nnx.merge(graphdef, p, jax.tree.map(lambda a: a, rest))(x)
    x1, x2 = _normal((3, 4), seed=13, dtype=F64), _normal((2, 4), seed=14, dtype=F64)
    cache = jax.eval_shape(lambda p, x: ntklayers.capture(f, p, x), params, x1)
    assert cache.meta.mode == "coupled" and cache.meta.plan.fallback == ()
    k = fx.ntk_fn()(model, x1, x2)
    assert_rel_close(k, reference_ntk(f, params, x1, x2), TOL64)


# ------------------------------------------------------------- fallback ---


def _fallback_case(f, params, x1, x2, layer):
  with pytest.warns(UserWarning, match=FALLBACK):
    cache = jax.eval_shape(lambda p, x: ntklayers.capture(f, p, x), params, x1)
    k = ntklayers.ntk(f, params, x1, x2)
  assert layer not in [g.name for g in cache.meta.plan.groups]
  assert layer in [g.name for g in cache.meta.plan.fallback]
  assert_rel_close(k, reference_ntk(f, params, x1, x2), TOL64)


def test_haiku_group_norm_over_the_batch_axis_falls_back():
  net = hk.without_apply_rng(hk.transform(
      lambda x: ntklayers.Linear(2)(nh.GroupNorm(groups=2, axis=slice(0, None))(x))))
  x1, x2 = _normal((3, 4), seed=15, dtype=F64), _normal((2, 4), seed=16, dtype=F64)
  params = models.init_params(net.init, F64, x1)
  _fallback_case(net.apply, params, x1, x2, "group_norm")


def test_linen_rms_norm_with_mask_falls_back():
  mask = jnp.asarray([True, True, False, True])
  module = fl.RMSNorm(param_dtype=F64)
  f = lambda p, x: module.apply({"params": p}, x, mask=mask)
  x1, x2 = _normal((3, 4), seed=17, dtype=F64), _normal((2, 4), seed=18, dtype=F64)
  with _standard():
    _fallback_case(f, {"scale": _normal((4,), seed=19, dtype=F64)}, x1, x2, "params")


def test_nnx_group_norm_unusual_reduction_axes_fall_back():
  """NNX repeats group statistics along axis 1, which is only right when every
  non-batch axis is reduced: statistics per position go to the fallback."""
  layer = models_flax.nnx_model(lambda rngs: fx.GroupNorm(
      4, num_groups=2, reduction_axes=(2,), param_dtype=F64, rngs=rngs), F64)
  graphdef, params = nnx.split(layer)
  f = lambda p, x: nnx.merge(graphdef, p)(x).sum(axis=1)
  x1, x2 = _normal((3, 2, 4), seed=20, dtype=F64), _normal((2, 2, 4), seed=21, dtype=F64)
  with _standard():
    _fallback_case(f, params, x1, x2, "params")
