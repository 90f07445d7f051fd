"""Flax (linen and NNX) test models, in the format of the registry in ``models.py``.

Every entry of :data:`FLAX_MODELS` is a :class:`models.ModelDescriptor` (same
fields, same meaning; the subclass :class:`FlaxModelDescriptor` adds
``framework``) whose ``build(dtype)`` returns a :class:`FlaxBuilt`: a
``models.Built(f, params, x1, x2)`` (a 4-tuple, so code written for the Haiku
registry works unchanged: ``f(params, x)`` is a plain function and ``params`` the
tree the kernel differentiates) that additionally carries what is needed to call
the Flax entry points:

* ``framework``: ``"linen"`` or ``"nnx"``;
* ``ntk_fn(**options) -> kernel_fn(x1, x2=None)``: the kernel through
  ``ntklayers.flax.ntk_fn`` (linen: ``(variables, x1, x2, **apply_kwargs)``) or
  ``ntklayers.flax.nnx.ntk_fn`` (NNX: ``(model_or_split, x1, x2)``);
* ``layer_names``: the expected ``layerwise=True`` keys (linen module paths, NNX
  attribute paths), written out by hand.

``f`` and ``params``:

* linen: ``params = variables["params"]`` and ``f(p, x) = module.apply({"params":
  p, **other_collections}, x, **apply_kwargs)`` (``mutable=["batch_stats"]`` in
  BatchNorm training mode, the updates dropped);
* NNX: ``graphdef, params, *rest = nnx.split(model, nnx.Param, ...)`` and
  ``f(p, x) = nnx.merge(graphdef, p, *rest)(x)`` (``rest`` re-created inside the
  trace, see ``_nnx_build``); ``params`` is an ``nnx.State``.

Models with Flax ``LayerNorm``/``BatchNorm`` run under a local
``jax.numpy_dtype_promotion("standard")`` (see :func:`flax_promotion`), both in
``f`` and around the entry point.

Parameters are created with ``param_dtype=dtype`` (linen/NNX default to float32
even with x64) and, as in ``models.py``, filled with NumPy random values of the
shapes the initializers would create (only ``jax.eval_shape`` / ``nnx.eval_shape``
of the initialization runs): weights ``N(0, 1/fan_in)``, scales around 1,
biases/offsets around 0, embeddings ``N(0, 1)``, moving variances positive.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import ntklayers.flax
from ntklayers.flax import linen as fl
from ntklayers.flax import nnx as fx

import models
from models import ModelDescriptor, make_inputs

__all__ = ("FLAX_MODELS", "CLASS_MODELS", "BY_NAME", "FlaxBuilt", "FlaxModelDescriptor",
           "build", "exact_attention", "fill_value", "flax_promotion", "linen_variables",
           "nnx_model")


class FlaxBuilt(models.Built):
  """``models.Built(f, params, x1, x2)`` plus the Flax entry point (see module doc).

  A subclass of the ``Built`` NamedTuple: still a 4-tuple (unpacking and field
  access behave as for Haiku models); the extra attributes live in ``__dict__``.
  """

  def __new__(cls, f, params, x1, x2, *, framework: str,
              ntk_fn: Callable[..., Callable], layer_names: tuple[str, ...],
              extra: dict[str, Any] | None = None):
    self = super().__new__(cls, f, params, x1, x2)
    self.framework = framework
    self.ntk_fn = ntk_fn
    self.layer_names = tuple(layer_names)
    self.extra = dict(extra or {})  # e.g. the linen module / variables, the NNX model
    return self


# ------------------------------------------------------------- parameters ---


def _leaf_name(path) -> str:
  """Last dict key of a tree path (NNX Variables add a trailing ``.value``)."""
  for k in reversed(path):
    if isinstance(k, jax.tree_util.DictKey):
      return str(k.key)
  return str(path[-1])


def fill_value(path, leaf, rng: np.random.Generator, dtype) -> jax.Array:
  """Random value for one parameter/state leaf of abstract shape ``leaf``."""
  shape, leaf_dtype = tuple(leaf.shape), leaf.dtype
  if jnp.issubdtype(leaf_dtype, jax.dtypes.prng_key):
    return jax.random.key(0)  # NNX RngKey state (not differentiated)
  if not jnp.issubdtype(leaf_dtype, jnp.floating):
    return jnp.zeros(shape, leaf_dtype)  # e.g. an NNX RngCount
  name = _leaf_name(path)
  noise = rng.normal(size=shape)
  if name == "kernel":
    value = noise / np.sqrt(max(1, math.prod(shape[:-1])))
  elif name == "scale":
    value = 1.0 + 0.3 * noise
  elif name == "var":
    value = 1.0 + 0.3 * np.abs(noise)  # a positive moving variance
  elif name == "embedding":
    value = noise
  else:  # bias, mean
    value = 0.3 * noise
  return jnp.asarray(value, dtype)


def linen_variables(module: nn.Module, dtype, *args, seed: int = 2, **kwargs):
  """``module.init(key, *args, **kwargs)``'s tree with random NumPy values."""
  rng = np.random.default_rng(seed)
  shapes = jax.eval_shape(lambda k: module.init(k, *args, **kwargs), jax.random.key(0))
  return jax.tree_util.tree_map_with_path(lambda p, l: fill_value(p, l, rng, dtype),
                                          shapes)


def nnx_model(make: Callable[[nnx.Rngs], nnx.Module], dtype, *, seed: int = 2):
  """``make(nnx.Rngs(0))`` with random NumPy values (initializers never run)."""
  rng = np.random.default_rng(seed)
  abstract = nnx.eval_shape(lambda: make(nnx.Rngs(0)))
  graphdef, state = nnx.split(abstract)
  state = jax.tree_util.tree_map_with_path(lambda p, l: fill_value(p, l, rng, dtype),
                                           state)
  return nnx.merge(graphdef, state)


# ------------------------------------------------------------ builders ---


def flax_promotion(standard: bool):
  """Flax's ``LayerNorm``/``BatchNorm`` compute statistics in
  ``jnp.promote_types(dtype, jnp.float32)``, which ``jax_numpy_dtype_promotion=
  "strict"`` (conftest) rejects for float64: such models run (and are traced)
  under a local ``"standard"`` promotion, like Haiku's BatchNorm in models.py."""
  return jax.numpy_dtype_promotion("standard") if standard else contextlib.nullcontext()


def _promoting(fn: Callable, standard: bool) -> Callable:
  if not standard:
    return fn

  def wrapped(*args, **kwargs):
    with flax_promotion(True):
      return fn(*args, **kwargs)

  return wrapped


def _linen_build(module_fn: Callable[[Any], nn.Module], x_shape, layer_names, *,
                 vocab: int | None = None, apply_kwargs: Callable[[Any], dict] | None = None,
                 init_kwargs: dict | None = None, mutable=False, standard: bool = False):
  """``build`` of a linen model: ``module_fn(dtype)`` is the (configured) module;
  ``standard``: the model needs ``flax_promotion``."""

  def build(dtype) -> FlaxBuilt:
    module = module_fn(dtype)
    x1, x2 = make_inputs(x_shape, dtype, vocab=vocab)
    kw = apply_kwargs(dtype) if apply_kwargs else {}
    with flax_promotion(standard):
      variables = linen_variables(module, dtype, x1, **(init_kwargs or kw))
    params = variables["params"]
    rest = {k: v for k, v in variables.items() if k != "params"}

    @functools.partial(_promoting, standard=standard)
    def f(p, x):
      out = module.apply({"params": p, **rest}, x, mutable=mutable, **kw)
      return out[0] if mutable else out

    def ntk_fn(**options):
      kernel_fn = ntklayers.flax.ntk_fn(module, mutable=mutable, **options)
      return _promoting(lambda a, b=None: kernel_fn(variables, a, b, **kw), standard)

    return FlaxBuilt(f, params, x1, x2, framework="linen", ntk_fn=ntk_fn,
                     layer_names=layer_names,
                     extra=dict(module=module, variables=variables, apply_kwargs=kw,
                                mutable=mutable, standard=standard))

  return build


def _nnx_build(make: Callable[[Any, nnx.Rngs], nnx.Module], x_shape, layer_names, *,
               vocab: int | None = None, mode: str | None = None,
               pass_split: bool = False, standard: bool = False):
  """``build`` of an NNX model ``make(dtype, rngs)``; ``mode`` is ``"train"``/``"eval"``;
  ``pass_split`` passes ``(graphdef, params, *states)`` instead of the module."""

  def build(dtype) -> FlaxBuilt:
    with flax_promotion(standard):
      model = nnx_model(lambda rngs: make(dtype, rngs), dtype)
    if mode == "eval":
      model.eval()
    elif mode == "train":
      model.train()
    x1, x2 = make_inputs(x_shape, dtype, vocab=vocab)
    graphdef, params, *rest = nnx.split(model, nnx.Param, ...)

    @functools.partial(_promoting, standard=standard)
    def f(p, x):
      # Fresh Variables created inside the trace (BatchNorm in training mode
      # writes its batch statistics, which NNX allows only at their own trace level).
      return nnx.merge(graphdef, p, *jax.tree.map(lambda a: a, rest))(x)

    target = (graphdef, params, *rest) if pass_split else model

    def ntk_fn(**options):
      kernel_fn = fx.ntk_fn(**options)
      return _promoting(lambda a, b=None: kernel_fn(target, a, b), standard)

    return FlaxBuilt(f, params, x1, x2, framework="nnx", ntk_fn=ntk_fn,
                     layer_names=layer_names, extra=dict(model=model, standard=standard))

  return build


# ----------------------------------------------------------- linen models ---


class LinenMLP(nn.Module):
  dtype: Any

  @nn.compact
  def __call__(self, x):
    x = nn.relu(fl.Dense(16, param_dtype=self.dtype)(x))
    x = nn.relu(fl.Dense(16, param_dtype=self.dtype)(x))
    return fl.Dense(3, param_dtype=self.dtype)(x)


class LinenGeneral(nn.Module):
  """[N, 5] -> DenseGeneral to [N, 2, 3] -> DenseGeneral over both axes -> [N, 3]."""

  dtype: Any

  @nn.compact
  def __call__(self, x):
    x = jnp.tanh(fl.DenseGeneral((2, 3), param_dtype=self.dtype)(x))
    return fl.DenseGeneral(3, axis=(-2, -1), param_dtype=self.dtype)(x)


class LinenCNN(nn.Module):
  """[N, 9, 9, 2]: strided SAME, dilated, grouped VALID, CIRCULAR; then a Dense."""

  dtype: Any

  @nn.compact
  def __call__(self, x):
    pd = self.dtype
    x = nn.relu(fl.Conv(4, (3, 3), strides=2, param_dtype=pd)(x))            # [5, 5, 4]
    x = nn.relu(fl.Conv(4, (3, 3), kernel_dilation=2, param_dtype=pd)(x))    # [5, 5, 4]
    x = nn.relu(fl.Conv(4, (3, 3), padding="VALID", feature_group_count=2,
                        param_dtype=pd)(x))                                  # [3, 3, 4]
    x = jnp.tanh(fl.Conv(4, (2, 3), padding="CIRCULAR", param_dtype=pd)(x))  # [3, 3, 4]
    return fl.Dense(3, param_dtype=pd)(x.reshape(x.shape[0], -1))


def causal_mask(t: int) -> jax.Array:
  return jnp.asarray(np.tril(np.ones((t, t), bool)))[None, None]  # [1, 1, T, T]


class LinenTransformer(nn.Module):
  """Pre-LN block on [N, T=4, d=8] -> [N, T, d]; the attention ``mask`` is an apply kwarg."""

  dtype: Any

  @nn.compact
  def __call__(self, x, mask=None):
    pd = self.dtype
    h = fl.LayerNorm(param_dtype=pd)(x)
    h = fl.MultiHeadDotProductAttention(num_heads=2, qkv_features=8, param_dtype=pd)(
        h, mask=mask)
    x = x + h
    h = fl.LayerNorm(param_dtype=pd)(x)
    return x + fl.Dense(8, param_dtype=pd)(nn.gelu(fl.Dense(16, param_dtype=pd)(h)))


class LinenBlock(nn.Module):
  """One pre-LN transformer block, ``(carry, _) -> (carry, None)`` for ``nn.scan``."""

  dtype: Any

  @nn.compact
  def __call__(self, x, _):
    pd = self.dtype
    h = fl.LayerNorm(param_dtype=pd)(x)
    x = x + fl.MultiHeadDotProductAttention(num_heads=2, qkv_features=8,
                                            param_dtype=pd)(h)
    h = fl.LayerNorm(param_dtype=pd)(x)
    return x + fl.Dense(8, param_dtype=pd)(nn.gelu(fl.Dense(12, param_dtype=pd)(h))), None


class LinenScannedBlocks(nn.Module):
  """[N, T=3, d=8]: Dense, 2 blocks as ``nn.scan(nn.remat(LinenBlock))`` with stacked
  params, a pooled Dense head."""

  dtype: Any

  @nn.compact
  def __call__(self, x):
    pd = self.dtype
    x = fl.Dense(8, param_dtype=pd)(x)
    stack = nn.scan(nn.remat(LinenBlock), variable_axes={"params": 0},
                    split_rngs={"params": True}, length=2)
    x, _ = stack(pd)(x, None)
    return fl.Dense(3, param_dtype=pd)(x.mean(axis=1))


class LinenMixed(nn.Module):
  """Annotated Dense layers around a plain ``nn.Dense`` and a plain ``nn.LayerNorm``."""

  dtype: Any

  @nn.compact
  def __call__(self, x):
    pd = self.dtype
    x = nn.relu(fl.Dense(8, param_dtype=pd)(x))      # Dense_0
    x = jnp.tanh(nn.Dense(8, param_dtype=pd)(x))     # Dense_1 (plain)
    x = nn.LayerNorm(param_dtype=pd)(x)              # LayerNorm_0 (plain)
    return fl.Dense(3, param_dtype=pd)(x)            # Dense_2


class LinenBatchNorm(nn.Module):
  """Dense -> BatchNorm (``train`` flag) -> relu -> Dense."""

  dtype: Any

  @nn.compact
  def __call__(self, x, train: bool = False):
    pd = self.dtype
    x = fl.Dense(8, param_dtype=pd)(x)
    x = nn.BatchNorm(use_running_average=not train, momentum=0.9, param_dtype=pd)(x)
    return fl.Dense(3, param_dtype=pd)(nn.relu(x))


class LinenEmbed(nn.Module):
  """Integer token ids [N, T=5] -> [N, 3]."""

  dtype: Any

  @nn.compact
  def __call__(self, x):
    pd = self.dtype
    e = nn.Embed(num_embeddings=11, features=8, param_dtype=pd)(x)
    h = nn.relu(fl.Dense(8, param_dtype=pd)(e))
    return fl.Dense(3, param_dtype=pd)(jnp.mean(h, axis=1))


# ------------------------------------------------------------- NNX models ---


def exact_attention(query, key, value, bias=None, mask=None, **unused):
  """``softmax(q k^T / sqrt(d)) v`` in the input dtype.

  ``nnx.MultiHeadAttention``'s default ``attention_fn`` takes a fast path through
  ``jax.nn.dot_product_attention``, whose softmax runs in float32 even for float64
  inputs (the model's kernel is then only float32-exact). Signature as
  ``nnx.dot_product_attention``; dropout is not supported (rate 0 here).
  """
  assert bias is None
  depth = query.shape[-1]
  query = query / jnp.sqrt(jnp.asarray(depth, query.dtype))
  logits = jnp.einsum("...qhd,...khd->...hqk", query, key)
  if mask is not None:
    logits = jnp.where(mask, logits, jnp.asarray(jnp.finfo(logits.dtype).min, logits.dtype))
  weights = jax.nn.softmax(logits, axis=-1)
  return jnp.einsum("...hqk,...khd->...qhd", weights, value)


class NnxMLP(nnx.Module):
  def __init__(self, dtype, rngs: nnx.Rngs):
    kw = dict(param_dtype=dtype, rngs=rngs)
    self.layers = nnx.List([fx.Linear(5, 16, **kw), fx.Linear(16, 16, **kw),
                            fx.Linear(16, 3, **kw)])

  def __call__(self, x):
    for layer in self.layers[:-1]:
      x = nnx.relu(layer(x))
    return self.layers[-1](x)


class NnxGeneral(nnx.Module):
  """[N, 5] -> LinearGeneral to [N, 2, 3] -> LinearGeneral over both axes -> [N, 3]."""

  def __init__(self, dtype, rngs: nnx.Rngs):
    kw = dict(param_dtype=dtype, rngs=rngs)
    self.split = fx.LinearGeneral(5, (2, 3), **kw)
    self.merge = fx.LinearGeneral((2, 3), 3, axis=(-2, -1), **kw)

  def __call__(self, x):
    return self.merge(jnp.tanh(self.split(x)))


class NnxCNN(nnx.Module):
  """As :class:`LinenCNN`."""

  def __init__(self, dtype, rngs: nnx.Rngs):
    kw = dict(param_dtype=dtype, rngs=rngs)
    self.conv1 = fx.Conv(2, 4, (3, 3), strides=2, **kw)
    self.conv2 = fx.Conv(4, 4, (3, 3), kernel_dilation=2, **kw)
    self.conv3 = fx.Conv(4, 4, (3, 3), padding="VALID", feature_group_count=2, **kw)
    self.conv4 = fx.Conv(4, 4, (2, 3), padding="CIRCULAR", **kw)
    self.head = fx.Linear(36, 3, **kw)

  def __call__(self, x):
    x = nnx.relu(self.conv1(x))
    x = nnx.relu(self.conv2(x))
    x = nnx.relu(self.conv3(x))
    x = jnp.tanh(self.conv4(x))
    return self.head(x.reshape(x.shape[0], -1))


class NnxTransformer(nnx.Module):
  """As :class:`LinenTransformer` (no mask), attention computed in the input dtype."""

  def __init__(self, dtype, rngs: nnx.Rngs):
    kw = dict(param_dtype=dtype, rngs=rngs)
    self.ln1 = fx.LayerNorm(8, **kw)
    self.att = fx.MultiHeadAttention(num_heads=2, in_features=8, qkv_features=8,
                                     decode=False, attention_fn=exact_attention, **kw)
    self.ln2 = fx.LayerNorm(8, **kw)
    self.mlp_in = fx.Linear(8, 16, **kw)
    self.mlp_out = fx.Linear(16, 8, **kw)

  def __call__(self, x):
    x = x + self.att(self.ln1(x))
    return x + self.mlp_out(nnx.gelu(self.mlp_in(self.ln2(x))))


class NnxMixed(nnx.Module):
  def __init__(self, dtype, rngs: nnx.Rngs):
    kw = dict(param_dtype=dtype, rngs=rngs)
    self.inp = fx.Linear(5, 8, **kw)
    self.plain = nnx.Linear(8, 8, **kw)
    self.plain_ln = nnx.LayerNorm(8, **kw)
    self.head = fx.Linear(8, 3, **kw)

  def __call__(self, x):
    x = nnx.relu(self.inp(x))
    x = jnp.tanh(self.plain(x))
    return self.head(self.plain_ln(x))


class NnxBatchNorm(nnx.Module):
  def __init__(self, dtype, rngs: nnx.Rngs):
    kw = dict(param_dtype=dtype, rngs=rngs)
    self.inp = fx.Linear(5, 8, **kw)
    self.bn = nnx.BatchNorm(8, momentum=0.9, **kw)
    self.head = fx.Linear(8, 3, **kw)

  def __call__(self, x):
    return self.head(nnx.relu(self.bn(self.inp(x))))


class NnxEmbed(nnx.Module):
  def __init__(self, dtype, rngs: nnx.Rngs):
    kw = dict(param_dtype=dtype, rngs=rngs)
    self.embed = nnx.Embed(11, 8, **kw)
    self.proj = fx.Linear(8, 8, **kw)
    self.head = fx.Linear(8, 3, **kw)

  def __call__(self, x):
    h = nnx.relu(self.proj(self.embed(x)))
    return self.head(jnp.mean(h, axis=1))


# ------------------------------ Embed, RMSNorm, GroupNorm, BatchNorm drop-ins ---


class LinenEmbedDropIn(nn.Module):
  """Ids [N, T=6] from a vocabulary of 5 (repeated ids); one ``Embed`` called twice."""

  dtype: Any

  @nn.compact
  def __call__(self, x):
    pd = self.dtype
    emb = fl.Embed(num_embeddings=5, features=6, param_dtype=pd)
    e = emb(x) + 0.5 * emb(x[:, ::-1])
    h = jnp.tanh(fl.Dense(8, param_dtype=pd)(e))
    return fl.Dense(3, param_dtype=pd)(jnp.mean(h, axis=1))


class LinenNormsDropIn(nn.Module):
  """[N, T=4, C=6]: RMSNorm, GroupNorm (``num_groups``; ``group_size`` without bias),
  BatchNorm (``train`` flag), Dense layers."""

  dtype: Any

  @nn.compact
  def __call__(self, x, train: bool = False):
    pd = self.dtype
    x = fl.RMSNorm(param_dtype=pd)(x)
    x = jnp.tanh(fl.Dense(6, param_dtype=pd)(x))
    x = fl.GroupNorm(num_groups=3, param_dtype=pd)(x)
    x = fl.GroupNorm(num_groups=None, group_size=3, reduction_axes=(-1,), use_bias=False,
                     param_dtype=pd)(x)
    x = fl.BatchNorm(use_running_average=not train, momentum=0.9, param_dtype=pd)(x)
    return fl.Dense(3, param_dtype=pd)(jnp.mean(x, axis=1))


class NnxEmbedDropIn(nnx.Module):
  """As :class:`LinenEmbedDropIn`."""

  def __init__(self, dtype, rngs: nnx.Rngs):
    kw = dict(param_dtype=dtype, rngs=rngs)
    self.embed = fx.Embed(5, 6, **kw)
    self.proj = fx.Linear(6, 8, **kw)
    self.head = fx.Linear(8, 3, **kw)

  def __call__(self, x):
    e = self.embed(x) + 0.5 * self.embed(x[:, ::-1])
    return self.head(jnp.mean(jnp.tanh(self.proj(e)), axis=1))


class NnxNormsDropIn(nnx.Module):
  """As :class:`LinenNormsDropIn` (train/eval mode set on the model)."""

  def __init__(self, dtype, rngs: nnx.Rngs):
    kw = dict(param_dtype=dtype, rngs=rngs)
    self.rms = fx.RMSNorm(6, **kw)
    self.proj = fx.Linear(6, 6, **kw)
    self.gn = fx.GroupNorm(6, num_groups=3, **kw)
    self.gn_size = fx.GroupNorm(6, num_groups=None, group_size=3, use_bias=False, **kw)
    self.bn = fx.BatchNorm(6, momentum=0.9, **kw)
    self.head = fx.Linear(6, 3, **kw)

  def __call__(self, x):
    x = jnp.tanh(self.proj(self.rms(x)))
    x = self.bn(self.gn_size(self.gn(x)))
    return self.head(jnp.mean(x, axis=1))


_NORMS = ("RMSNorm_0", "Dense_0", "GroupNorm_0", "GroupNorm_1", "BatchNorm_0", "Dense_1")
_NNX_NORMS = ("rms", "proj", "gn", "gn_size", "bn", "head")


# --------------------------------------------------------------- registry ---

@dataclasses.dataclass(frozen=True)
class FlaxModelDescriptor(ModelDescriptor):
  """``models.ModelDescriptor`` plus ``framework`` (``"linen"`` or ``"nnx"``).

  The one field the shared registry lacks: with ``framework: str = "haiku"`` added
  to ``models.ModelDescriptor``, these become plain ``ModelDescriptor``s and tests
  written for Haiku parameter trees can select ``m.framework == "haiku"``.
  """

  framework: str = "linen"


def _linen(name, module_fn, x_shape, layer_names, *, out_rank=2, coupled=False,
           vocab=None, warning=None, **build_kw) -> FlaxModelDescriptor:
  return FlaxModelDescriptor(
      name, _linen_build(module_fn, x_shape, layer_names, vocab=vocab, **build_kw),
      x_shape, out_rank=out_rank, coupled=coupled, int_inputs=vocab is not None,
      warning=warning, framework="linen")


def _nnx(name, make, x_shape, layer_names, *, out_rank=2, coupled=False, vocab=None,
         warning=None, **build_kw) -> FlaxModelDescriptor:
  return FlaxModelDescriptor(
      name, _nnx_build(make, x_shape, layer_names, vocab=vocab, **build_kw),
      x_shape, out_rank=out_rank, coupled=coupled, int_inputs=vocab is not None,
      warning=warning, framework="nnx")


_ATT = "MultiHeadDotProductAttention_0"

FLAX_MODELS: tuple[FlaxModelDescriptor, ...] = (
    # ----------------------------------------------------------- linen
    _linen("linen_mlp", LinenMLP, (5,), ("Dense_0", "Dense_1", "Dense_2")),
    _linen("linen_dense_general", LinenGeneral, (5,), ("DenseGeneral_0", "DenseGeneral_1")),
    _linen("linen_cnn", LinenCNN, (9, 9, 2),
           ("Conv_0", "Conv_1", "Conv_2", "Conv_3", "Dense_0")),
    _linen("linen_transformer", LinenTransformer, (4, 8),
           ("LayerNorm_0", f"{_ATT}/query", f"{_ATT}/key", f"{_ATT}/value",
            f"{_ATT}/out", "LayerNorm_1", "Dense_0", "Dense_1"),
           out_rank=3, apply_kwargs=lambda dtype: {"mask": causal_mask(4)},
           standard=True),
    _linen("linen_scanned_blocks", LinenScannedBlocks, (3, 8),
           ("Dense_0", "ScanCheckpointLinenBlock_0/LayerNorm_0",
            f"ScanCheckpointLinenBlock_0/{_ATT}/query",
            f"ScanCheckpointLinenBlock_0/{_ATT}/key",
            f"ScanCheckpointLinenBlock_0/{_ATT}/value",
            f"ScanCheckpointLinenBlock_0/{_ATT}/out",
            "ScanCheckpointLinenBlock_0/LayerNorm_1", "ScanCheckpointLinenBlock_0/Dense_0",
            "ScanCheckpointLinenBlock_0/Dense_1", "Dense_1"), standard=True),
    _linen("linen_mixed_plain", LinenMixed, (5,),
           ("Dense_0", "Dense_1", "LayerNorm_0", "Dense_2"), standard=True),
    _linen("linen_batchnorm_eval", LinenBatchNorm, (5,),
           ("Dense_0", "BatchNorm_0", "Dense_1"),
           apply_kwargs=lambda dtype: {"train": False}, standard=True),
    _linen("linen_batchnorm_train", LinenBatchNorm, (5,),
           ("Dense_0", "BatchNorm_0", "Dense_1"), coupled=True,
           apply_kwargs=lambda dtype: {"train": True}, mutable=["batch_stats"],
           standard=True),
    _linen("linen_embed", LinenEmbed, (5,), ("Embed_0", "Dense_0", "Dense_1"), vocab=11),
    # ------------------------------------------------------------- NNX
    _nnx("nnx_mlp", NnxMLP, (5,), ("layers/0", "layers/1", "layers/2")),
    _nnx("nnx_linear_general", NnxGeneral, (5,), ("split", "merge")),
    _nnx("nnx_cnn", NnxCNN, (9, 9, 2), ("conv1", "conv2", "conv3", "conv4", "head")),
    _nnx("nnx_transformer", NnxTransformer, (4, 8),
         ("ln1", "att/query", "att/key", "att/value", "att/out", "ln2", "mlp_in",
          "mlp_out"), out_rank=3, standard=True),
    _nnx("nnx_mixed_plain", NnxMixed, (5,), ("inp", "plain", "plain_ln", "head"),
         standard=True),
    _nnx("nnx_batchnorm_eval", NnxBatchNorm, (5,), ("inp", "bn", "head"), mode="eval",
         pass_split=True, standard=True),
    _nnx("nnx_batchnorm_train", NnxBatchNorm, (5,), ("inp", "bn", "head"), coupled=True,
         mode="train", pass_split=True, standard=True),
    _nnx("nnx_embed", NnxEmbed, (5,), ("embed", "proj", "head"), vocab=11),
    # ------------------ Embed, RMSNorm, GroupNorm, BatchNorm drop-ins (both)
    _linen("linen_embed_dropin", LinenEmbedDropIn, (6,), ("Embed_0", "Dense_0", "Dense_1"),
           vocab=5),
    _linen("linen_norms_dropin", LinenNormsDropIn, (4, 6), _NORMS,
           apply_kwargs=lambda dtype: {"train": False}, standard=True),
    _linen("linen_norms_dropin_train", LinenNormsDropIn, (4, 6), _NORMS, coupled=True,
           apply_kwargs=lambda dtype: {"train": True}, mutable=["batch_stats"],
           standard=True),
    _nnx("nnx_embed_dropin", NnxEmbedDropIn, (6,), ("embed", "proj", "head"), vocab=5),
    _nnx("nnx_norms_dropin", NnxNormsDropIn, (4, 6), _NNX_NORMS, mode="eval",
         standard=True),
    _nnx("nnx_norms_dropin_train", NnxNormsDropIn, (4, 6), _NNX_NORMS, coupled=True,
         mode="train", pass_split=True, standard=True),
)

# The linen/NNX models of the classes of issue #6 (tests/models_classes.py). Kept
# out of FLAX_MODELS, whose tests of the structured/fallback split (test_flax_api)
# do not apply to them; test_flax_exactness runs both.
import models_classes  # pylint: disable=g-import-not-at-top,wrong-import-position

CLASS_MODELS: tuple[FlaxModelDescriptor, ...] = models_classes.flax_models()

BY_NAME = {m.name: m for m in FLAX_MODELS + CLASS_MODELS}
assert len(BY_NAME) == len(FLAX_MODELS) + len(CLASS_MODELS), "names must be unique"
assert not set(BY_NAME) & set(models.BY_NAME), "Flax model names must be new"


_CACHE: dict = {}


def build(name: str, dtype: Any = jnp.float64) -> FlaxBuilt:
  """Cached ``BY_NAME[name].build(dtype)`` (params and inputs are immutable;
  callers must not mutate the NNX model in ``extra``)."""
  key = (name, jnp.dtype(dtype))
  if key not in _CACHE:
    _CACHE[key] = BY_NAME[name].build(jnp.dtype(dtype))
  return _CACHE[key]


def model_params(descriptors=FLAX_MODELS):
  """``pytest.param``s over descriptors, slow ones marked."""
  return models.model_params(descriptors)
