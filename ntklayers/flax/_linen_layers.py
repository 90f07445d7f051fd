"""Annotated flax.linen layers: ``Dense``, ``DenseGeneral``, ``Conv``, ``LayerNorm``,
``Embed`` and ``MultiHeadDotProductAttention`` (alias ``MultiHeadAttention``); the
other normalizations are in ``_linen_norms.py``.

Each is a subclass of its linen counterpart with the same class name (so
auto-names stay ``Dense_0``, ``Conv_1``, ... and ``params`` trees are identical),
the stock ``__call__`` and one classmethod, ``_ntk_describe``, which the
interceptor calls during a capture only.
"""

from __future__ import annotations

import flax.linen as nn

from ntklayers.flax import _common
from ntklayers.flax import _compat


class Dense(nn.Dense):
  """Drop-in for :class:`flax.linen.Dense` (inputs ``[N, ..., d_in]``).

  Example:
    >>> import jax, jax.numpy as jnp
    >>> from ntklayers.flax import linen as ntk_nn
    >>> v = ntk_nn.Dense(3).init(jax.random.key(0), jnp.ones((2, 4)))
    >>> jax.tree.map(jnp.shape, v)
    {'params': {'bias': (3,), 'kernel': (4, 3)}}
  """

  _ntk_roles = {"w": "kernel", "b": "bias"}

  @staticmethod
  def _ntk_describe(module, inputs, *args, **kwargs) -> _common.Description:
    return _common.describe_dense_general(inputs, -1, module.features)


class DenseGeneral(nn.DenseGeneral):
  """Drop-in for :class:`flax.linen.DenseGeneral` (trailing ``axis``, no ``batch_dims``)."""

  _ntk_roles = {"w": "kernel", "b": "bias"}

  @staticmethod
  def _ntk_describe(module, inputs, *args, **kwargs) -> _common.Description:
    return _common.describe_dense_general(inputs, module.axis, module.features,
                                          module.batch_dims)


class Conv(nn.Conv):
  """Drop-in for :class:`flax.linen.Conv` (1-3D, strides, all paddings,
  ``input_dilation``, ``kernel_dilation``, ``feature_group_count``)."""

  _ntk_roles = {"w": "kernel", "b": "bias"}

  @staticmethod
  def _ntk_describe(module, inputs, *args, **kwargs) -> _common.Description:
    return _common.describe_conv(
        inputs, module.kernel_size, module.strides, module.padding,
        module.input_dilation, module.kernel_dilation, module.feature_group_count,
        module.mask, _compat.canonicalize_padding)


class LayerNorm(nn.LayerNorm):
  """Drop-in for :class:`flax.linen.LayerNorm` (``use_scale``, ``use_bias``,
  ``reduction_axes``, ``feature_axes``)."""

  _ntk_roles = {"scale": "scale", "offset": "bias"}

  @staticmethod
  def _ntk_describe(module, x, *args, mask=None, **kwargs) -> _common.Description:
    kind, config, primal, unsupported = _common.describe_layer_norm(
        x, module.reduction_axes, module.feature_axes, module.epsilon,
        module.use_fast_variance, mask)
    if module.axis_name is not None:
      unsupported = "it normalizes across devices (`axis_name`)"
    return kind, config, primal, unsupported


class Embed(nn.Embed):
  """Drop-in for :class:`flax.linen.Embed`.

  Its ``__call__`` is a gather of table rows, whose kernel is a count-matching
  Gram of the token ids (no one-hot ``[..., num_embeddings]`` array is formed).
  Ids ``[N, ...]`` lead with the batch axis. ``attend`` (a tied decoder) is a
  different method: a table it reads is counted by the exact fallback.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> from ntklayers.flax import linen as ntk_nn
    >>> ids = jnp.array([[1, 2, 1], [3, 1, 0]])
    >>> v = ntk_nn.Embed(10, 4).init(jax.random.key(0), ids)
    >>> jax.tree.map(jnp.shape, v)
    {'params': {'embedding': (10, 4)}}
  """

  _ntk_roles = {"embeddings": "embedding"}

  @staticmethod
  def _ntk_describe(module, inputs, *args, **kwargs) -> _common.Description:
    return _common.describe_embed(inputs, module.num_embeddings)


class MultiHeadDotProductAttention(nn.MultiHeadDotProductAttention):
  """Drop-in for :class:`flax.linen.MultiHeadDotProductAttention`.

  Its ``query``/``key``/``value``/``out`` projections (and ``query_ln``/``key_ln``
  with ``normalize_qk``) are contracted from factors; masks, cross-attention,
  ``qkv_features`` and ``out_features`` work as in linen.
  """

  _ntk_children = True


MultiHeadAttention = MultiHeadDotProductAttention


# Stock linen modules created *inside* an annotated parent: described like the
# annotated classes above.
CHILD_DESCRIBERS = {
    nn.DenseGeneral: (DenseGeneral._ntk_describe, DenseGeneral._ntk_roles),  # pylint: disable=protected-access
    nn.Dense: (Dense._ntk_describe, Dense._ntk_roles),  # pylint: disable=protected-access
    nn.LayerNorm: (LayerNorm._ntk_describe, LayerNorm._ntk_roles),  # pylint: disable=protected-access
}
