"""The drop-ins ``Embed``, ``RMSNorm``, ``GroupNorm`` and ``BatchNorm`` (Haiku, linen, NNX).

* parity: each drop-in has the original's parameters (init with the same rng) and
  bitwise equal outputs (float32, as ``test_haiku_parity``/``test_flax_parity``);
* exactness: the kernels of the registry models built from them
  (``models.py``/``models_flax.py``) match the ``jax.jacrev`` reference to
  ``rel_err <= 1e-10`` in float64 with every new layer structured (none of its
  parameters in the fallback); BatchNorm in training mode makes samples interact
  (the batch is one sample: ``"coupled"`` mode) and is still exact;
* Embed: its kernel is a count-matching Gram of token ids. The activation route
  never forms anything vocabulary-sized (checked on the jaxpr of the whole
  capture and contraction with a vocabulary of 100000, and against a closed
  form); the Jacobian route is taken when the cost model says it is cheaper
  (long sequences, tiny vocabulary), and both routes agree;
* configurations without an exact description go to the exact fallback.
"""

from __future__ import annotations

import flax.linen as nn
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
import ntklayers.flax
import ntklayers.haiku as nh
from ntklayers._core import _rules_embed
from ntklayers._core._axes import OutputSpec
from ntklayers._core._ops import jacobian_kernel
from ntklayers.flax import linen as fl
from ntklayers.flax import nnx as fx
from reference import assert_rel_close, reference_ntk

TOL64 = 1e-10
F32, F64 = jnp.float32, jnp.float64
FALLBACK = r"handled by the exact generic fallback"


def _standard():
  return jax.numpy_dtype_promotion("standard")


def _tree_equal(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    assert x.shape == y.shape and x.dtype == y.dtype
    np.testing.assert_array_equal(x, y)


def _ids(shape, vocab, seed=0, low=0):
  return jnp.asarray(np.random.default_rng(seed).integers(low, vocab, shape), jnp.int32)


def _normal(shape, seed=0, dtype=F32):
  return jnp.asarray(np.random.default_rng(seed).normal(size=shape), dtype)


# ------------------------------------------------------------ (a) parity ---

# name -> (make(module namespace) -> fn(x, is_training), input)
HAIKU_CASES = {
    "embed_array_index": (lambda m: lambda x, t: m.Embed(7, 4)(x), _ids((3, 5), 7)),
    "embed_one_hot": (lambda m: lambda x, t: m.Embed(7, 4, lookup_style="ONE_HOT")(x),
                      _ids((3, 5), 7)),
    "embed_matrix": (lambda m: lambda x, t: m.Embed(
        embedding_matrix=np.arange(12.0, dtype=np.float32).reshape(6, 2))(x),
                     _ids((2, 3), 6)),
    "rms_norm": (lambda m: lambda x, t: m.RMSNorm(axis=-1)(x), _normal((3, 4, 6))),
    "rms_norm_param_axes": (lambda m: lambda x, t: m.RMSNorm(
        axis=(1, 2), param_axis=(1, 2), eps=1e-3, name="rms")(x), _normal((3, 4, 6))),
    "group_norm": (lambda m: lambda x, t: m.GroupNorm(groups=3)(x), _normal((3, 4, 6))),
    "group_norm_nchw": (lambda m: lambda x, t: m.GroupNorm(
        groups=2, create_offset=False, data_format="channels_first")(x),
                        _normal((3, 4, 5))),
    "batch_norm": (lambda m: lambda x, t: m.BatchNorm(True, True, 0.9)(x, t),
                   _normal((4, 3, 5))),
}


@pytest.mark.parametrize("case", sorted(HAIKU_CASES))
def test_haiku_parity(case):
  make, x = HAIKU_CASES[case]
  orig = hk.transform_with_state(make(hk))
  new = hk.transform_with_state(make(nh))

  @jax.jit
  def run(key, x):
    with _standard():  # hk.BatchNorm's EMA and ONE_HOT's float64 one_hot (x64)
      p_orig, s_orig = orig.init(key, x, True)
      p_new, s_new = new.init(key, x, True)
      outs = [(orig.apply(p_orig, s_orig, key, x, t), new.apply(p_orig, s_orig, key, x, t))
              for t in (True, False)]
    return p_orig, p_new, s_orig, s_new, outs

  p_orig, p_new, s_orig, s_new, outs = run(jax.random.key(0), x)
  _tree_equal(p_new, p_orig)
  _tree_equal(s_new, s_orig)
  for (y_orig, st_orig), (y_new, st_new) in outs:
    np.testing.assert_array_equal(y_new, y_orig)
    _tree_equal(st_new, st_orig)


def test_haiku_classes_keep_names():
  for name in ("Embed", "RMSNorm", "GroupNorm", "BatchNorm"):
    cls = getattr(nh, name)
    assert cls.__name__ == name and cls.__mro__[1] is getattr(hk, name)
    assert name in nh.__all__


# name -> (make(linen namespace) -> module, input, apply kwargs)
LINEN_CASES = {
    "embed": (lambda m: m.Embed(7, 4), _ids((3, 5), 7), {}),
    "embed_one_row": (lambda m: m.Embed(1, 3), _ids((2, 3), 4), {}),
    "rms_norm": (lambda m: m.RMSNorm(epsilon=1e-3), _normal((3, 4, 6)), {}),
    "rms_norm_axes": (lambda m: m.RMSNorm(reduction_axes=(1, 2), feature_axes=(1, 2)),
                      _normal((3, 4, 6)), {}),
    "group_norm": (lambda m: m.GroupNorm(num_groups=3), _normal((3, 4, 6)), {}),
    "group_norm_size": (lambda m: m.GroupNorm(num_groups=None, group_size=2,
                                              use_fast_variance=False),
                        _normal((3, 4, 6)), {}),
    "batch_norm_eval": (lambda m: m.BatchNorm(use_running_average=True),
                        _normal((4, 3, 5)), {}),
    "batch_norm_train": (lambda m: m.BatchNorm(use_running_average=False, momentum=0.5),
                         _normal((4, 3, 5)), {"mutable": ["batch_stats"]}),
}


@pytest.mark.parametrize("case", sorted(LINEN_CASES))
def test_linen_parity(case):
  make, x, kw = LINEN_CASES[case]
  orig, new = make(nn), make(fl)
  assert type(new).__name__ == type(orig).__name__ and type(new).__bases__[-1] is type(orig)

  @jax.jit
  def run(key, x):
    v_orig, v_new = orig.init(key, x), new.init(key, x)
    return v_orig, v_new, orig.apply(v_orig, x, **kw), new.apply(v_orig, x, **kw)

  v_orig, v_new, y_orig, y_new = run(jax.random.key(0), x)
  _tree_equal(v_new, v_orig)
  _tree_equal(y_new, y_orig)


@pytest.mark.parametrize("name", ["Embed", "RMSNorm", "GroupNorm", "BatchNorm"])
def test_linen_auto_names_match(name):
  assert name in fl.__all__

  class Two(nn.Module):
    @nn.compact
    def __call__(self, x):
      kw = dict(use_running_average=True) if name == "BatchNorm" else {}
      if name == "Embed":
        return fl.Embed(5, 2)(x) + nn.Embed(5, 2)(x)
      if name == "GroupNorm":
        kw = dict(num_groups=2)
      return getattr(fl, name)(**kw)(x) + getattr(nn, name)(**kw)(x)

  x = _ids((2, 4), 5) if name == "Embed" else jnp.ones((2, 4), F32)
  shapes = jax.eval_shape(Two().init, jax.random.key(0), x)
  assert sorted(shapes["params"]) == [f"{name}_0", f"{name}_1"]


# name -> (make(nnx namespace, rngs) -> module, input, mode)
NNX_CASES = {
    "embed": (lambda m, r: m.Embed(7, 4, rngs=r), _ids((3, 5), 7), None),
    "rms_norm": (lambda m, r: m.RMSNorm(6, epsilon=1e-3, rngs=r), _normal((3, 4, 6)), None),
    "group_norm": (lambda m, r: m.GroupNorm(6, num_groups=3, rngs=r), _normal((3, 4, 6)),
                   None),
    "group_norm_size": (lambda m, r: m.GroupNorm(6, num_groups=None, group_size=2,
                                                 use_bias=False, rngs=r),
                        _normal((3, 4, 6)), None),
    "batch_norm_eval": (lambda m, r: m.BatchNorm(5, rngs=r), _normal((4, 3, 5)), "eval"),
    "batch_norm_train": (lambda m, r: m.BatchNorm(5, momentum=0.5, rngs=r),
                         _normal((4, 3, 5)), "train"),
}


@pytest.mark.parametrize("case", sorted(NNX_CASES))
def test_nnx_parity(case):
  make, x, mode = NNX_CASES[case]
  orig, new = make(nnx, nnx.Rngs(7)), make(fx, nnx.Rngs(7))
  assert type(new).__name__ == type(orig).__name__ and type(new).__bases__[-1] is type(orig)
  assert type(new).__name__ in fx.__all__
  for model in (orig, new):
    if mode is not None:
      getattr(model, mode)()
  _tree_equal(nnx.state(new), nnx.state(orig))
  g_new, _ = nnx.split(new)
  g_orig, s_orig = nnx.split(orig)

  @jax.jit
  def run(s, x):
    a, b = nnx.merge(g_orig, s), nnx.merge(g_new, s)
    return a(x), b(x), nnx.state(a), nnx.state(b)

  y_orig, y_new, st_orig, st_new = run(s_orig, x)
  np.testing.assert_array_equal(y_new, y_orig)
  _tree_equal(st_new, st_orig)  # BatchNorm in training: the same statistics updates


# -------------------------------------------------------- (b) exactness ---

# Registry models built from the new drop-ins: {name: (framework, new layers)}.
NEW_MODELS = {
    "embed_shared_ids": ("haiku", {"embed"}),
    "rmsnorm_groupnorm": ("haiku", {"rms_norm", "group_norm", "group_norm_1", "rms_norm_1"}),
    "batchnorm_infer_dropin": ("haiku", {"batch_norm"}),
    "batchnorm_train_dropin": ("haiku", {"batch_norm"}),
    "linen_embed_dropin": ("flax", {"Embed_0"}),
    "linen_norms_dropin": ("flax", {"RMSNorm_0", "GroupNorm_0", "GroupNorm_1",
                                    "BatchNorm_0"}),
    "linen_norms_dropin_train": ("flax", {"RMSNorm_0", "GroupNorm_0", "GroupNorm_1",
                                          "BatchNorm_0"}),
    "nnx_embed_dropin": ("flax", {"embed"}),
    "nnx_norms_dropin": ("flax", {"rms", "gn", "gn_size", "bn"}),
    "nnx_norms_dropin_train": ("flax", {"rms", "gn", "gn_size", "bn"}),
}


def _built(name):
  framework, _ = NEW_MODELS[name]
  if framework == "haiku":
    return models.BY_NAME[name], models.build(name)
  return models_flax.BY_NAME[name], models_flax.build(name)


def _promotion(built):
  return models_flax.flax_promotion(getattr(built, "extra", {}).get("standard", False))


@pytest.mark.parametrize("name", sorted(NEW_MODELS))
def test_new_layers_structured_and_exact(name):
  _, new_layers = NEW_MODELS[name]
  model, built = _built(name)
  with _promotion(built):
    cache = jax.eval_shape(lambda p, x: ntklayers.capture(built.f, p, x), built.params,
                           built.x1)
  plan = cache.meta.plan
  assert plan.fallback == (), [g.name for g in plan.fallback]
  assert new_layers <= set(cache.layer_names)
  if model.coupled:  # BatchNorm with batch statistics: the batch is one sample
    assert cache.meta.mode == "coupled"
  if hasattr(built, "ntk_fn"):
    k = built.ntk_fn(implementation="structured")(built.x1, built.x2)
  else:
    k = ntklayers.ntk_fn(built.f, implementation="structured")(built.params, built.x1,
                                                               built.x2)
  ref = reference_ntk(built.f, built.params, built.x1, built.x2)
  assert k.shape == ref.shape and k.dtype == F64
  assert_rel_close(k, ref, TOL64)


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
