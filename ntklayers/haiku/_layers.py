"""Annotated Haiku layers: ``Linear``, ``ConvND`` (1-3D), ``LayerNorm`` and ``Embed``
(the other normalizations are in ``_norms.py``).

Each subclass keeps its Haiku class name (so auto-names stay ``linear``,
``conv2_d``, ``layer_norm``, ``embed`` and checkpoints stay compatible), inherits the stock
``__call__`` unchanged, and only adds ``_ntk_describe``: the structure record
(rule kind and static config) and the primal that the rule needs. It is called
by the interceptor during a capture, never in a normal forward pass.
"""

from __future__ import annotations

from typing import Any

import haiku as hk
import jax
import jax.numpy as jnp

from ntklayers.adapters import (ConvConfig, DenseConfig, Description, ScaleConfig,
                                normalize_axes)


class Linear(hk.Linear):
  """Drop-in for :class:`haiku.Linear` whose NTK is contracted from factors.

  Inputs ``[N, ..., d_in]``: weights are shared over the axes between the batch
  and the features (e.g. sequence positions), cross terms included.

  Example:
    >>> import haiku as hk, jax, jax.numpy as jnp, ntklayers
    >>> net = hk.without_apply_rng(hk.transform(lambda x: ntklayers.Linear(3)(x)))
    >>> params = net.init(jax.random.key(0), jnp.ones((2, 4)))
    >>> jax.tree.map(jnp.shape, params)
    {'linear': {'b': (3,), 'w': (4, 3)}}
  """

  _ntk_base = hk.Linear
  _ntk_roles = {"w": "w", "b": "b"}

  def _ntk_describe(self, inputs, *args, **kwargs) -> Description:
    del args, kwargs
    return "dense", DenseConfig(), inputs, None


def _padding_key(padding: Any) -> Any:
  if isinstance(padding, str):
    return padding
  return tuple((int(lo), int(hi)) for lo, hi in padding)


class _ConvMixin:
  """Structure of ``hk.ConvND``: ``lax.conv_general_dilated`` plus bias."""

  # Set by hk.ConvND.__init__ (declared for type checkers).
  kernel_shape: Any
  stride: Any
  padding: Any
  lhs_dilation: Any
  kernel_dilation: Any
  feature_group_count: int
  channel_index: int
  num_spatial_dims: int
  mask: Any

  _ntk_base = hk.ConvND
  _ntk_roles = {"w": "w", "b": "b"}

  def _ntk_describe(self, inputs, *args, **kwargs) -> Description:
    del args, kwargs
    inputs = jnp.asarray(inputs)
    config = ConvConfig(
        kernel_shape=tuple(self.kernel_shape), strides=tuple(self.stride),
        padding=_padding_key(self.padding), lhs_dilation=tuple(self.lhs_dilation),
        rhs_dilation=tuple(self.kernel_dilation),
        feature_group_count=self.feature_group_count,
        channels_last=self.channel_index == -1,
        batched=inputs.ndim == self.num_spatial_dims + 2)
    unsupported = None
    if self.mask is not None:
      unsupported = "its weights are masked (`mask=`), which has no structure rule"
    return "conv", config, inputs, unsupported


class ConvND(_ConvMixin, hk.ConvND):
  """Drop-in for :class:`haiku.ConvND` (strides, padding, rate, groups, NC.../N...C)."""


class Conv1D(_ConvMixin, hk.Conv1D):
  """Drop-in for :class:`haiku.Conv1D`."""


class Conv2D(_ConvMixin, hk.Conv2D):
  """Drop-in for :class:`haiku.Conv2D`.

  Example:
    >>> import haiku as hk, jax, jax.numpy as jnp, ntklayers.haiku as nh
    >>> net = hk.without_apply_rng(hk.transform(lambda x: nh.Conv2D(4, 3, stride=2)(x)))
    >>> params = net.init(jax.random.key(0), jnp.ones((1, 8, 8, 2)))
    >>> jax.tree.map(jnp.shape, params)
    {'conv2_d': {'b': (4,), 'w': (3, 3, 2, 4)}}
  """


class Conv3D(_ConvMixin, hk.Conv3D):
  """Drop-in for :class:`haiku.Conv3D`."""


class LayerNorm(hk.LayerNorm):
  """Drop-in for :class:`haiku.LayerNorm` (``create_scale``, ``create_offset``,
  any ``axis`` and ``param_axis``).

  Its structure is an elementwise scale and offset of the normalized input
  ``x_hat = (x - mean) * rsqrt(var + eps)``, which is the cached primal.
  """

  _ntk_base = hk.LayerNorm
  _ntk_roles = {"scale": "scale", "offset": "offset"}

  def _ntk_describe(self, inputs, scale=None, offset=None) -> Description:
    del scale, offset
    inputs = jnp.asarray(inputs)
    nd = inputs.ndim
    axis = normalize_axes(self.axis, nd)
    mean = jnp.mean(inputs, axis=axis, keepdims=True)
    if self.use_fast_variance:
      variance = jnp.mean(jnp.square(inputs), axis=axis, keepdims=True) - jnp.square(mean)
    else:
      variance = jnp.var(inputs, axis=axis, keepdims=True)
    eps = jax.lax.convert_element_type(self.eps, variance.dtype)
    x_hat = jax.lax.rsqrt(variance + eps) * (inputs - mean)
    return "scale", ScaleConfig(normalize_axes(self.param_axis, nd)), x_hat, None


class Embed(hk.Embed):
  """Drop-in for :class:`haiku.Embed` (every ``lookup_style``, ``embedding_matrix``).

  Its structure is a gather of table rows: the kernel of the table is a
  count-matching Gram of the token ids (``ids1[n, t] == ids2[m, s]``), contracted
  without any one-hot ``[..., V]`` array. Ids ``[N, ...]`` lead with the batch
  axis; every other axis is a position that reads the shared table. The cached
  primal is the ids. Out-of-range ids count as JAX differentiates Haiku's lookup:
  ids in ``[-vocab_size, 0)`` wrap around with ``ARRAY_INDEX``; other ids outside
  ``[0, vocab_size)`` read no row.

  Example:
    >>> import haiku as hk, jax, jax.numpy as jnp, ntklayers
    >>> import ntklayers.haiku as nh
    >>> net = hk.without_apply_rng(hk.transform(
    ...     lambda ids: ntklayers.Linear(2)(nh.Embed(10, 4)(ids).mean(axis=1))))
    >>> ids = jnp.array([[1, 2, 1], [3, 1, 0]])
    >>> params = net.init(jax.random.key(0), ids)
    >>> jax.tree.map(jnp.shape, params["embed"])
    {'embeddings': (10, 4)}
    >>> ntklayers.ntk(net.apply, params, ids).shape
    (2, 2, 2, 2)
  """

  _ntk_base = hk.Embed
  _ntk_roles = {"embeddings": "embeddings"}

  def _ntk_describe(self, ids, lookup_style=None, precision=None) -> Description:
    del precision
    style = lookup_style or self.lookup_style
    if isinstance(style, str):
      style = getattr(hk.EmbedLookupStyle, style.upper())
    mode = "one_hot" if style == hk.EmbedLookupStyle.ONE_HOT else "wrap"
    # (vocab_size, out_of_range): the "embed" rule's config as a plain tuple.
    return "embed", (int(self.vocab_size), mode), jnp.asarray(ids), None
