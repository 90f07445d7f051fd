"""The NNX models of the Flax test registry (``models_flax.FLAX_MODELS``).

``nnx.Module`` classes ``Model(dtype, rngs)``, built by
``models_flax_build._nnx_build``: the NNX counterparts of the linen models of
``models_flax_linen`` (attention computed in the input dtype by
:func:`exact_attention`), plain ``nnx.Linear`` / ``nnx.LayerNorm`` between
annotated layers, BatchNorm, ``nnx.Embed`` and the Embed / RMSNorm / GroupNorm /
BatchNorm drop-ins. ``models_flax`` re-exports them. Sizes are tiny (widths <= 16).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from ntklayers.flax import nnx as fx


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
