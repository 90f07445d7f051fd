"""The registry's models in stock-layer form (issue #19): no drop-in, no annotation.

Each representative model of the shared registry (an MLP, a CNN, a pre-LN
transformer block with attention and LayerNorm, token embeddings, RMSNorm and
GroupNorm, BatchNorm in inference mode) written with each framework's own layers:

* Haiku (``hk.Linear``, ``hk.Conv2D``, ``hk.MultiHeadAttention``, ``hk.LayerNorm``,
  ``hk.Embed``, ``hk.RMSNorm``, ``hk.GroupNorm``, ``hk.BatchNorm``) and plain
  ``jax.numpy`` (parameter dicts, ``x @ w + b``, ``lax.conv_general_dilated``,
  einsum attention, ``table[ids]``, normalizations by hand): this module;
* linen and NNX (``nn.Dense``, ``nnx.Linear``, ...): ``models_stock_flax``;
* Equinox (``eqx.nn.MLP``, ``eqx.nn.Conv2d``, ``eqx.nn.MultiheadAttention``, ...,
  written per example and applied under ``jax.vmap``): ``models_stock_eqx``.

Names are ``{framework}_stock_{kind}``. Descriptors are ``StockDescriptor`` (a
``ModelDescriptor`` with ``framework``: ``"haiku"``, ``"jax"``, ``"linen"``, ``"nnx"``
or ``"equinox"``); builds are ``models_flax.FlaxBuilt`` (``f``, ``params``, ``x1``,
``x2`` plus ``ntk_fn(**options) -> kernel_fn(x1, x2=None)`` through the framework's
entry point: ``ntklayers.ntk_fn(f)`` for Haiku and plain JAX). :func:`stock_models`
lists them all, :func:`build` builds one (cached); ``models.registry(stock=True)``
joins them to the shared registry, which ``test_registry`` checks against the
``jax.jacrev`` reference in float64.

The core recognizes these layers in the traced program (``structure="auto"``);
``warning="tolerate"``, since which warnings a model gets depends on how much of it
is recognized. ``expect_structured`` (on for every stock model but those in
``PARTLY_RECOGNIZED``) asserts, in ``test_registry``, that no parameter is left on
the fallback, so that a regression to the fallback fails a test.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

import models
import ntklayers
from models import ModelDescriptor, make_inputs
from models_flax import FlaxBuilt

KINDS = ("mlp", "cnn", "transformer", "embed", "norms", "batchnorm_eval")
FRAMEWORKS = ("haiku", "jax", "linen", "nnx", "equinox")


@dataclasses.dataclass(frozen=True)
class StockDescriptor(ModelDescriptor):
  """``models.ModelDescriptor`` plus ``framework`` (see the module docstring)."""

  framework: str = "haiku"
  warning: str | None = "tolerate"


def _plain_ntk_fn(f: Callable, params: Any) -> Callable[..., Callable]:
  """``ntk_fn(**options) -> kernel_fn(x1, x2=None)`` through ``ntklayers.ntk_fn(f)``."""

  def ntk_fn(**options):
    kernel_fn = ntklayers.ntk_fn(f, **options)
    return lambda a, b=None: kernel_fn(params, a, b)

  return ntk_fn


def plain_built(f: Callable, params: Any, x1: Any, x2: Any, framework: str,
                layer_names: tuple[str, ...], **extra) -> FlaxBuilt:
  return FlaxBuilt(f, params, x1, x2, framework=framework, ntk_fn=_plain_ntk_fn(f, params),
                   layer_names=layer_names, extra=extra)


# ------------------------------------------------------------------ Haiku ---

_VS = hk.initializers.VarianceScaling(1.0)


def hk_mlp(x):
  x = jax.nn.relu(hk.Linear(16)(x))
  x = jax.nn.relu(hk.Linear(16)(x))
  return hk.Linear(3)(x)


def hk_cnn(x):
  """[N, 9, 9, 2] (NHWC): strided SAME, dilated, grouped VALID; a Linear head."""
  x = jax.nn.relu(hk.Conv2D(4, 3, stride=2)(x))                                # [5, 5, 4]
  x = jax.nn.relu(hk.Conv2D(4, 3, rate=2)(x))                                  # [5, 5, 4]
  x = jax.nn.relu(hk.Conv2D(4, 3, padding="VALID", feature_group_count=2)(x))  # [3, 3, 4]
  return hk.Linear(3)(x.reshape(x.shape[0], -1))


def hk_transformer(x):
  """Pre-LN block on [N, T=3, d=4] -> [N, T, d]."""
  h = hk.LayerNorm(-1, create_scale=True, create_offset=True)(x)
  x = x + hk.MultiHeadAttention(num_heads=2, key_size=2, model_size=4, w_init=_VS)(h, h, h)
  h = hk.LayerNorm(-1, create_scale=True, create_offset=True)(x)
  return x + hk.Linear(4)(jax.nn.gelu(hk.Linear(8)(h)))


def hk_embed(x):
  """Token ids [N, T=5] from a vocabulary of 11 -> [N, 3]."""
  h = jax.nn.relu(hk.Linear(8)(hk.Embed(vocab_size=11, embed_dim=8)(x)))
  return hk.Linear(3)(jnp.mean(h, axis=1))


def hk_norms(x):
  """[N, T=4, C=6]: RMSNorm, Linear, GroupNorm (3 groups), a pooled Linear head."""
  x = jnp.tanh(hk.Linear(6)(hk.RMSNorm(axis=-1)(x)))
  x = hk.GroupNorm(groups=3)(x)
  return hk.Linear(3)(jnp.mean(x, axis=1))


def _hk_bn(x, is_training: bool):
  x = hk.BatchNorm(create_scale=True, create_offset=True, decay_rate=0.9)(
      hk.Linear(8)(x), is_training)
  return hk.Linear(3)(jax.nn.relu(x))


def _haiku_build(fn: Callable, x_shape, layer_names, *, vocab: int | None = None,
                 batchnorm: bool = False):
  def build(dtype) -> FlaxBuilt:
    if batchnorm:  # models.py's BatchNorm build (random moving averages)
      f, params, x1, x2 = models._batchnorm_build(False, fn)(dtype)
    else:
      net = hk.without_apply_rng(hk.transform(fn))
      x1, x2 = make_inputs(x_shape, dtype, vocab=vocab)
      f, params = net.apply, models.init_params(net.init, dtype, x1)
    return plain_built(f, params, x1, x2, "haiku", layer_names)

  return build


# -------------------------------------------------------------- plain JAX ---


def _dense(p, x):
  return x @ p["w"] + p["b"]


def _conv(p, x, stride=1, dilation=1, padding="SAME", groups=1):
  out = lax.conv_general_dilated(x, p["w"], (stride, stride), padding,
                                 rhs_dilation=(dilation, dilation),
                                 dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                 feature_group_count=groups)
  return out + p["b"]


def _layer_norm(p, x, eps=1e-5):
  mean = jnp.mean(x, axis=-1, keepdims=True)
  var = jnp.mean(jnp.square(x - mean), axis=-1, keepdims=True)
  return (x - mean) * lax.rsqrt(var + eps) * p["scale"] + p["offset"]


def jax_mlp(p, x):
  x = jax.nn.relu(_dense(p["dense_0"], x))
  x = jax.nn.relu(_dense(p["dense_1"], x))
  return _dense(p["dense_2"], x)


def jax_cnn(p, x):
  x = jax.nn.relu(_conv(p["conv_0"], x, stride=2))
  x = jax.nn.relu(_conv(p["conv_1"], x, dilation=2))
  x = jax.nn.relu(_conv(p["conv_2"], x, padding="VALID", groups=2))
  return _dense(p["dense"], x.reshape(x.shape[0], -1))


def jax_transformer(p, x):
  """As :func:`hk_transformer`: einsum attention with ``[d, H, K]`` projections."""
  a = p["attention"]
  h = _layer_norm(p["ln_0"], x)
  q, k, v = (jnp.einsum("ntd,dhk->nthk", h, a[w]) + a[f"b{w[1]}"] for w in ("wq", "wk", "wv"))
  logits = jnp.einsum("nthk,nshk->nhts", q, k) / np.sqrt(2.0)
  o = jnp.einsum("nhts,nshk->nthk", jax.nn.softmax(logits, axis=-1), v)
  x = x + jnp.einsum("nthk,hkd->ntd", o, a["wo"]) + a["bo"]
  h = _layer_norm(p["ln_1"], x)
  return x + _dense(p["mlp_out"], jax.nn.gelu(_dense(p["mlp_in"], h)))


def jax_embed(p, x):
  h = jax.nn.relu(_dense(p["proj"], p["embed"]["table"][x]))
  return _dense(p["head"], jnp.mean(h, axis=1))


def jax_norms(p, x, eps=1e-5):
  x = x * lax.rsqrt(jnp.mean(jnp.square(x), axis=-1, keepdims=True) + eps) * p["rms"]["scale"]
  x = jnp.tanh(_dense(p["proj"], x))
  n, t, c = x.shape
  g = x.reshape(n, t, 3, c // 3)
  mean = jnp.mean(g, axis=(1, 3), keepdims=True)
  var = jnp.mean(jnp.square(g - mean), axis=(1, 3), keepdims=True)
  x = ((g - mean) * lax.rsqrt(var + eps)).reshape(n, t, c)
  x = x * p["group_norm"]["scale"] + p["group_norm"]["offset"]
  return _dense(p["head"], jnp.mean(x, axis=1))


def jax_batchnorm_eval(p, x, stats, eps=1e-5):
  """``stats``: fixed moving averages (bound by the build, not differentiated)."""
  x = _dense(p["dense_0"], x)
  x = (x - stats["mean"]) * lax.rsqrt(stats["var"] + eps) * p["bn"]["scale"] + p["bn"]["offset"]
  return _dense(p["dense_1"], jax.nn.relu(x))


def _rank_promoting(f: Callable) -> Callable:
  """``f`` traced with rank promotion allowed: plain-JAX models add biases as users
  write them (``x @ w + b``), which conftest's ``jax_numpy_rank_promotion="raise"``
  refuses."""

  def promoting(p, x):
    with jax.numpy_rank_promotion("allow"):
      return f(p, x)

  return promoting


# {kind: {layer name: {leaf: shape}}} of the plain-JAX models.
_D = lambda i, o: {"w": (i, o), "b": (o,)}
_C = lambda i, o, g=1: {"w": (3, 3, i // g, o), "b": (o,)}
_SO = lambda d: {"scale": (d,), "offset": (d,)}
JAX_SHAPES: dict[str, dict[str, dict[str, tuple]]] = {
    "mlp": {"dense_0": _D(5, 16), "dense_1": _D(16, 16), "dense_2": _D(16, 3)},
    "cnn": {"conv_0": _C(2, 4), "conv_1": _C(4, 4), "conv_2": _C(4, 4, 2), "dense": _D(36, 3)},
    "transformer": {"ln_0": _SO(4), "ln_1": _SO(4), "mlp_in": _D(4, 8), "mlp_out": _D(8, 4),
                    "attention": {"wq": (4, 2, 2), "wk": (4, 2, 2), "wv": (4, 2, 2),
                                  "bq": (2, 2), "bk": (2, 2), "bv": (2, 2),
                                  "wo": (2, 2, 4), "bo": (4,)}},
    "embed": {"embed": {"table": (11, 8)}, "proj": _D(8, 8), "head": _D(8, 3)},
    "norms": {"rms": {"scale": (6,)}, "proj": _D(6, 6), "group_norm": _SO(6),
              "head": _D(6, 3)},
    "batchnorm_eval": {"dense_0": _D(5, 8), "bn": _SO(8), "dense_1": _D(8, 3)},
}


def random_params(shapes: Any, dtype, seed: int = 2) -> Any:
  """NumPy values for a tree of shapes: weights ``w`` ``N(0, 1 / fan_in)`` (all axes
  but the last), ``scale`` around 1, everything else around 0."""
  rng = np.random.default_rng(seed)

  def fill(path, shape):
    name = str(path[-1].key)
    noise = rng.normal(size=shape)
    if name.startswith("w"):
      value = noise / np.sqrt(np.prod(shape[:-1]) if name == "w" else shape[0])
    elif name == "scale":
      value = 1.0 + 0.3 * noise
    elif name == "table":
      value = noise
    else:
      value = 0.3 * noise
    return jnp.asarray(value, dtype)

  return jax.tree_util.tree_map_with_path(fill, shapes,
                                          is_leaf=lambda s: isinstance(s, tuple))


_JAX_FNS = {"mlp": jax_mlp, "cnn": jax_cnn, "transformer": jax_transformer,
            "embed": jax_embed, "norms": jax_norms}


def _jax_build(kind: str, x_shape, *, vocab: int | None = None):
  def build(dtype) -> FlaxBuilt:
    params = random_params(JAX_SHAPES[kind], dtype)
    x1, x2 = make_inputs(x_shape, dtype, vocab=vocab)
    if kind == "batchnorm_eval":
      rng = np.random.default_rng(3)
      stats = {"mean": jnp.asarray(0.3 * rng.normal(size=8), dtype),
               "var": jnp.asarray(1.0 + 0.3 * np.abs(rng.normal(size=8)), dtype)}
      f = functools.partial(jax_batchnorm_eval, stats=stats)
    else:
      f = _JAX_FNS[kind]
    return plain_built(_rank_promoting(f), params, x1, x2, "jax",
                       tuple(sorted(JAX_SHAPES[kind])))

  return build


# --------------------------------------------------------------- registry ---

# {kind: (example shape, output rank, vocabulary)}; Equinox's CNN takes NCHW.
SHAPES = {"mlp": ((5,), 2, None), "cnn": ((9, 9, 2), 2, None),
          "transformer": ((3, 4), 3, None), "embed": ((5,), 2, 11),
          "norms": ((4, 6), 2, None), "batchnorm_eval": ((5,), 2, None)}

_HK_FNS = {"mlp": hk_mlp, "cnn": hk_cnn, "transformer": hk_transformer,
           "embed": hk_embed, "norms": hk_norms, "batchnorm_eval": _hk_bn}
_HK_NAMES = {
    "mlp": ("linear", "linear_1", "linear_2"),
    "cnn": ("conv2_d", "conv2_d_1", "conv2_d_2", "linear"),
    "transformer": ("layer_norm", "multi_head_attention/query", "multi_head_attention/key",
                    "multi_head_attention/value", "multi_head_attention/linear",
                    "layer_norm_1", "linear", "linear_1"),
    "embed": ("embed", "linear", "linear_1"),
    "norms": ("rms_norm", "linear", "group_norm", "linear_1"),
    "batchnorm_eval": ("linear", "batch_norm", "linear_1"),
}


def stock(framework: str, kind: str, build: Callable, **kw) -> StockDescriptor:
  x_shape, out_rank, vocab = SHAPES[kind]
  if framework == "equinox" and kind == "cnn":
    x_shape = (2, 9, 9)
  kw.setdefault("expect_structured", (framework, kind) not in PARTLY_RECOGNIZED)
  return StockDescriptor(f"{framework}_stock_{kind}", build, x_shape, out_rank=out_rank,
                         int_inputs=vocab is not None, framework=framework, **kw)


# Stock models with a parameter the recognizer leaves to the fallback:
# eqx.nn.Embedding under vmap gathers ``weight[i, 0:D]`` with a computed column
# start (not a table gather the recognizer can prove).
PARTLY_RECOGNIZED = frozenset({("equinox", "embed")})


HAIKU_JAX_MODELS: tuple[StockDescriptor, ...] = tuple(
    stock("haiku", kind, _haiku_build(_HK_FNS[kind], SHAPES[kind][0], _HK_NAMES[kind],
                                      vocab=SHAPES[kind][2],
                                      batchnorm=kind == "batchnorm_eval"))
    for kind in KINDS) + tuple(
    stock("jax", kind, _jax_build(kind, SHAPES[kind][0], vocab=SHAPES[kind][2]))
    for kind in KINDS)


@functools.lru_cache(maxsize=None)
def stock_models() -> tuple[StockDescriptor, ...]:
  """Every stock model, all frameworks (imports the linen/NNX and Equinox modules)."""
  import models_stock_eqx  # pylint: disable=g-import-not-at-top  (they import this module)
  import models_stock_flax  # pylint: disable=g-import-not-at-top
  out = HAIKU_JAX_MODELS + models_stock_flax.MODELS + models_stock_eqx.MODELS
  assert len({m.name for m in out}) == len(out), "stock model names must be unique"
  assert {(m.framework, m.name.split("_stock_")[1]) for m in out} == {
      (f, k) for f in FRAMEWORKS for k in KINDS}, "one model per framework and kind"
  return out


def by_name() -> dict[str, StockDescriptor]:
  return {m.name: m for m in stock_models()}


@functools.lru_cache(maxsize=None)
def build(name: str, dtype: Any = jnp.float64) -> FlaxBuilt:
  """Cached ``by_name()[name].build(dtype)``."""
  return by_name()[name].build(jnp.dtype(dtype))
