"""The drop-ins ``Embed``, ``RMSNorm``, ``GroupNorm`` and ``BatchNorm`` (Haiku, linen, NNX):
parity with the originals and exactness of the registry models built from them.

* parity: each drop-in has the original's parameters (init with the same rng) and
  bitwise equal outputs (float32, as ``test_haiku_parity``/``test_flax_parity``);
* exactness: the kernels of the registry models built from them
  (``models.py``/``models_flax.py``) match the ``jax.jacrev`` reference to
  ``rel_err <= 1e-10`` in float64 with every new layer structured (none of its
  parameters in the fallback); BatchNorm in training mode makes samples interact
  (the batch is one sample: ``"coupled"`` mode) and is still exact.

Embed's kernel routes, BatchNorm's call-time training flag and the configurations
that go to the exact fallback are in ``test_new_layers_kernels.py``.
"""

from __future__ import annotations

import flax.linen as nn
import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import models
import models_flax
import ntklayers
import ntklayers.flax
import ntklayers.haiku as nh
from ntklayers.flax import linen as fl
from ntklayers.flax import nnx as fx
from reference import assert_rel_close, reference_ntk

TOL64 = 1e-10
F32, F64 = jnp.float32, jnp.float64


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
