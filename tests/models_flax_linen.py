"""The linen models of the Flax test registry (``models_flax.FLAX_MODELS``).

``nn.Module`` classes with a ``dtype`` field (the ``param_dtype`` of their
layers), built by ``models_flax_build._linen_build``: an MLP, ``DenseGeneral``,
convolutions, a pre-LN transformer (with :func:`causal_mask`), blocks under
``nn.scan(nn.remat(...))``, plain ``nn.Dense`` / ``nn.LayerNorm`` between
annotated layers, BatchNorm, ``nn.Embed`` and the Embed / RMSNorm / GroupNorm /
BatchNorm drop-ins. ``models_flax`` re-exports them. Sizes are tiny (widths <= 16).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ntklayers.flax import linen as fl


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
