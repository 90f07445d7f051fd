"""The stock-layer models of ``models_stock`` in linen and NNX (no drop-in).

Same architectures and shapes as the Haiku and plain-JAX ones (see
``models_stock``'s docstring), built with ``models_flax``'s builders (random NumPy
parameters, ``param_dtype`` everywhere, Flax norms under a local "standard"
promotion), so each build is a ``models_flax.FlaxBuilt`` whose ``ntk_fn`` goes
through ``ntklayers.flax.ntk_fn`` (linen) or ``ntklayers.flax.nnx.ntk_fn`` (NNX).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp
from flax import nnx

import models_flax
from models_stock import SHAPES, StockDescriptor, stock

# ------------------------------------------------------------------ linen ---


class LinenMLP(nn.Module):
  dtype: Any

  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Dense(16, param_dtype=self.dtype)(x))
    x = nn.relu(nn.Dense(16, param_dtype=self.dtype)(x))
    return nn.Dense(3, param_dtype=self.dtype)(x)


class LinenCNN(nn.Module):
  """[N, 9, 9, 2]: strided SAME, dilated, grouped VALID; a Dense head."""

  dtype: Any

  @nn.compact
  def __call__(self, x):
    pd = self.dtype
    x = nn.relu(nn.Conv(4, (3, 3), strides=2, param_dtype=pd)(x))
    x = nn.relu(nn.Conv(4, (3, 3), kernel_dilation=2, param_dtype=pd)(x))
    x = nn.relu(nn.Conv(4, (3, 3), padding="VALID", feature_group_count=2, param_dtype=pd)(x))
    return nn.Dense(3, param_dtype=pd)(x.reshape(x.shape[0], -1))


class LinenTransformer(nn.Module):
  """Pre-LN block on [N, T=3, d=4] -> [N, T, d]."""

  dtype: Any

  @nn.compact
  def __call__(self, x):
    pd = self.dtype
    h = nn.LayerNorm(param_dtype=pd)(x)
    x = x + nn.MultiHeadDotProductAttention(num_heads=2, qkv_features=4, param_dtype=pd)(h)
    h = nn.LayerNorm(param_dtype=pd)(x)
    return x + nn.Dense(4, param_dtype=pd)(nn.gelu(nn.Dense(8, param_dtype=pd)(h)))


class LinenEmbed(nn.Module):
  dtype: Any

  @nn.compact
  def __call__(self, x):
    pd = self.dtype
    e = nn.Embed(num_embeddings=11, features=8, param_dtype=pd)(x)
    h = nn.relu(nn.Dense(8, param_dtype=pd)(e))
    return nn.Dense(3, param_dtype=pd)(jnp.mean(h, axis=1))


class LinenNorms(nn.Module):
  dtype: Any

  @nn.compact
  def __call__(self, x):
    pd = self.dtype
    x = jnp.tanh(nn.Dense(6, param_dtype=pd)(nn.RMSNorm(param_dtype=pd)(x)))
    x = nn.GroupNorm(num_groups=3, param_dtype=pd)(x)
    return nn.Dense(3, param_dtype=pd)(jnp.mean(x, axis=1))


class LinenBatchNorm(nn.Module):
  dtype: Any

  @nn.compact
  def __call__(self, x, train: bool = False):
    pd = self.dtype
    x = nn.Dense(8, param_dtype=pd)(x)
    x = nn.BatchNorm(use_running_average=not train, momentum=0.9, param_dtype=pd)(x)
    return nn.Dense(3, param_dtype=pd)(nn.relu(x))


# -------------------------------------------------------------------- NNX ---


class NnxMLP(nnx.Module):
  def __init__(self, dtype, rngs: nnx.Rngs):
    kw = dict(param_dtype=dtype, rngs=rngs)
    self.layers = nnx.List([nnx.Linear(5, 16, **kw), nnx.Linear(16, 16, **kw),
                            nnx.Linear(16, 3, **kw)])

  def __call__(self, x):
    for layer in self.layers[:-1]:
      x = nnx.relu(layer(x))
    return self.layers[-1](x)


class NnxCNN(nnx.Module):
  def __init__(self, dtype, rngs: nnx.Rngs):
    kw = dict(param_dtype=dtype, rngs=rngs)
    self.conv1 = nnx.Conv(2, 4, (3, 3), strides=2, **kw)
    self.conv2 = nnx.Conv(4, 4, (3, 3), kernel_dilation=2, **kw)
    self.conv3 = nnx.Conv(4, 4, (3, 3), padding="VALID", feature_group_count=2, **kw)
    self.head = nnx.Linear(36, 3, **kw)

  def __call__(self, x):
    x = nnx.relu(self.conv1(x))
    x = nnx.relu(self.conv2(x))
    x = nnx.relu(self.conv3(x))
    return self.head(x.reshape(x.shape[0], -1))


class NnxTransformer(nnx.Module):
  """As :class:`LinenTransformer`; attention in the input dtype
  (``models_flax.exact_attention``: NNX's default softmax runs in float32)."""

  def __init__(self, dtype, rngs: nnx.Rngs):
    kw = dict(param_dtype=dtype, rngs=rngs)
    self.ln1 = nnx.LayerNorm(4, **kw)
    self.att = nnx.MultiHeadAttention(num_heads=2, in_features=4, qkv_features=4,
                                      decode=False, attention_fn=models_flax.exact_attention,
                                      **kw)
    self.ln2 = nnx.LayerNorm(4, **kw)
    self.mlp_in = nnx.Linear(4, 8, **kw)
    self.mlp_out = nnx.Linear(8, 4, **kw)

  def __call__(self, x):
    x = x + self.att(self.ln1(x))
    return x + self.mlp_out(nnx.gelu(self.mlp_in(self.ln2(x))))


class NnxEmbed(nnx.Module):
  def __init__(self, dtype, rngs: nnx.Rngs):
    kw = dict(param_dtype=dtype, rngs=rngs)
    self.embed = nnx.Embed(11, 8, **kw)
    self.proj = nnx.Linear(8, 8, **kw)
    self.head = nnx.Linear(8, 3, **kw)

  def __call__(self, x):
    return self.head(jnp.mean(nnx.relu(self.proj(self.embed(x))), axis=1))


class NnxNorms(nnx.Module):
  def __init__(self, dtype, rngs: nnx.Rngs):
    kw = dict(param_dtype=dtype, rngs=rngs)
    self.rms = nnx.RMSNorm(6, **kw)
    self.proj = nnx.Linear(6, 6, **kw)
    self.gn = nnx.GroupNorm(6, num_groups=3, **kw)
    self.head = nnx.Linear(6, 3, **kw)

  def __call__(self, x):
    x = self.gn(jnp.tanh(self.proj(self.rms(x))))
    return self.head(jnp.mean(x, axis=1))


class NnxBatchNorm(nnx.Module):
  def __init__(self, dtype, rngs: nnx.Rngs):
    kw = dict(param_dtype=dtype, rngs=rngs)
    self.inp = nnx.Linear(5, 8, **kw)
    self.bn = nnx.BatchNorm(8, momentum=0.9, **kw)
    self.head = nnx.Linear(8, 3, **kw)

  def __call__(self, x):
    return self.head(nnx.relu(self.bn(self.inp(x))))


# --------------------------------------------------------------- registry ---

_ATT = "MultiHeadDotProductAttention_0"
_LINEN = {
    "mlp": (LinenMLP, ("Dense_0", "Dense_1", "Dense_2"), {}),
    "cnn": (LinenCNN, ("Conv_0", "Conv_1", "Conv_2", "Dense_0"), {}),
    "transformer": (LinenTransformer,
                    ("LayerNorm_0", f"{_ATT}/query", f"{_ATT}/key", f"{_ATT}/value",
                     f"{_ATT}/out", "LayerNorm_1", "Dense_0", "Dense_1"), {"standard": True}),
    "embed": (LinenEmbed, ("Embed_0", "Dense_0", "Dense_1"), {}),
    "norms": (LinenNorms, ("RMSNorm_0", "Dense_0", "GroupNorm_0", "Dense_1"),
              {"standard": True}),
    "batchnorm_eval": (LinenBatchNorm, ("Dense_0", "BatchNorm_0", "Dense_1"),
                       {"standard": True, "apply_kwargs": lambda dtype: {"train": False}}),
}
_NNX = {
    "mlp": (NnxMLP, ("layers/0", "layers/1", "layers/2"), {}),
    "cnn": (NnxCNN, ("conv1", "conv2", "conv3", "head"), {}),
    "transformer": (NnxTransformer, ("ln1", "att/query", "att/key", "att/value", "att/out",
                                     "ln2", "mlp_in", "mlp_out"), {"standard": True}),
    "embed": (NnxEmbed, ("embed", "proj", "head"), {}),
    "norms": (NnxNorms, ("rms", "proj", "gn", "head"), {"standard": True}),
    "batchnorm_eval": (NnxBatchNorm, ("inp", "bn", "head"),
                       {"standard": True, "mode": "eval"}),
}


def _descriptors() -> tuple[StockDescriptor, ...]:
  out = []
  for kind, (cls, names, kw) in _LINEN.items():
    x_shape, _, vocab = SHAPES[kind]
    out.append(stock("linen", kind, models_flax._linen_build(
        lambda dtype, cls=cls: cls(dtype), x_shape, names, vocab=vocab, **kw)))
  for kind, (cls, names, kw) in _NNX.items():
    x_shape, _, vocab = SHAPES[kind]
    out.append(stock("nnx", kind, models_flax._nnx_build(cls, x_shape, names, vocab=vocab,
                                                          **kw)))
  return tuple(out)


MODELS: tuple[StockDescriptor, ...] = _descriptors()
