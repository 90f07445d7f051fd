"""Annotated Haiku normalizations: ``RMSNorm``, ``GroupNorm`` and ``BatchNorm``.

Each is an elementwise scale (and offset) of a normalized input ``x_hat``, so all
three use the ``"scale"`` rule (:class:`ntklayers.adapters.ScaleConfig`, as
``LayerNorm`` does): ``_ntk_describe`` recomputes ``x_hat`` exactly as Haiku does
(same ``eps`` placement, same variance formula, same dtypes) and reports it as
the primal. It runs only during a capture, after the stock ``__call__``.
"""

from __future__ import annotations

import haiku as hk
import jax
import jax.numpy as jnp

from ntklayers.adapters import Description, ScaleConfig, normalize_axes


class RMSNorm(hk.RMSNorm):
  """Drop-in for :class:`haiku.RMSNorm` (any ``axis`` and ``param_axis``).

  Its structure is an elementwise scale of ``x_hat = x * rsqrt(mean(x**2) + eps)``.

  Example:
    >>> import haiku as hk, jax, jax.numpy as jnp, ntklayers
    >>> import ntklayers.haiku as nh
    >>> net = hk.without_apply_rng(hk.transform(
    ...     lambda x: ntklayers.Linear(2)(nh.RMSNorm(axis=-1)(x))))
    >>> params = net.init(jax.random.key(0), jnp.ones((3, 4)))
    >>> jax.tree.map(jnp.shape, params["rms_norm"])
    {'scale': (4,)}
    >>> ntklayers.ntk(net.apply, params, jnp.arange(12.0).reshape(3, 4)).shape
    (3, 3, 2, 2)
  """

  _ntk_base = hk.RMSNorm
  _ntk_roles = {"scale": "scale"}

  def _ntk_describe(self, inputs) -> Description:
    inputs = jnp.asarray(inputs)
    nd = inputs.ndim
    axis = normalize_axes(self.axis, nd)
    mean_squared = jnp.mean(jnp.square(inputs), axis=axis, keepdims=True)
    x_hat = inputs * jax.lax.rsqrt(mean_squared + self.eps)
    return "scale", ScaleConfig(normalize_axes(self.param_axis, nd)), x_hat, None


class GroupNorm(hk.GroupNorm):
  """Drop-in for :class:`haiku.GroupNorm` (``groups``, ``axis``, both data formats,
  ``create_scale``, ``create_offset``).

  Its structure is an elementwise scale and offset per channel of the input
  normalized within its groups of channels. A GroupNorm whose ``axis`` includes the
  batch axis (samples interact) is left to the exact fallback.

  Example:
    >>> import haiku as hk, jax, jax.numpy as jnp, ntklayers
    >>> import ntklayers.haiku as nh
    >>> net = hk.without_apply_rng(hk.transform(
    ...     lambda x: nh.GroupNorm(groups=2)(x).mean(axis=1)))
    >>> x = jnp.arange(24.0).reshape(2, 3, 4) ** 2
    >>> params = net.init(jax.random.key(0), x)
    >>> jax.tree.map(jnp.shape, params["group_norm"])
    {'offset': (4,), 'scale': (4,)}
    >>> ntklayers.ntk(net.apply, params, x).shape
    (2, 2, 4, 4)
  """

  _ntk_base = hk.GroupNorm
  _ntk_roles = {"scale": "scale", "offset": "offset"}

  def _ntk_describe(self, x, scale=None, offset=None) -> Description:
    del scale, offset
    # The stock __call__ has run: `axis`, `group_shape` and `first_input_shape` are set.
    x = jnp.asarray(x)
    axis = tuple(self.axis)
    xg = x.reshape(self.group_shape)
    mean = jnp.mean(xg, axis, keepdims=True)
    var = jnp.var(xg, axis, keepdims=True)
    x_hat = ((xg - mean) * jax.lax.rsqrt(var + self.eps)).reshape(self.first_input_shape)
    channel = x.ndim - 1 if self.channel_index == -1 else 1
    unsupported = None
    if 0 in axis:
      unsupported = "it normalizes over the batch axis (samples interact)"
    return "scale", ScaleConfig((channel,)), x_hat, unsupported


class BatchNorm(hk.BatchNorm):
  """Drop-in for :class:`haiku.BatchNorm`.

  In inference mode (``is_training=False``, ``test_local_stats=False``) its
  structure is an elementwise scale and offset of the input normalized with the
  moving averages, and examples stay independent. With batch statistics
  (training or ``test_local_stats``) samples interact: the batch is treated as
  one sample, and its scale and offset are still contracted from factors (the
  input normalized with the batch statistics), exactly.

  Example:
    >>> import haiku as hk, jax, jax.numpy as jnp, ntklayers
    >>> import ntklayers.haiku as nh
    >>> def net(x, is_training):
    ...   return nh.BatchNorm(True, True, decay_rate=0.9)(x, is_training)
    >>> net = hk.without_apply_rng(hk.transform_with_state(net))
    >>> x = jnp.arange(12.0).reshape(3, 4)
    >>> params, state = net.init(jax.random.key(0), x, is_training=True)
    >>> f = lambda p, x: net.apply(p, state, x, is_training=False)[0]
    >>> ntklayers.ntk(f, params, x).shape
    (3, 3, 4, 4)
  """

  _ntk_base = hk.BatchNorm
  _ntk_roles = {"scale": "scale", "offset": "offset"}

  def _ntk_describe(self, inputs, is_training, test_local_stats=False, scale=None,
                    offset=None) -> Description:
    del scale, offset
    inputs = jnp.asarray(inputs)
    nd = inputs.ndim
    channel_index = self.channel_index % nd
    if self.axis is not None:
      axis = normalize_axes(self.axis, nd)
    else:
      axis = tuple(i for i in range(nd) if i != channel_index)
    unsupported = None
    if is_training or test_local_stats:
      mean = jnp.mean(inputs, axis, keepdims=True)
      mean_of_squares = jnp.mean(jnp.square(inputs), axis, keepdims=True)
      var = mean_of_squares - jnp.square(mean)
      if self.cross_replica_axis:
        unsupported = "its batch statistics are averaged across devices (`cross_replica_axis`)"
    else:
      mean = self.mean_ema.average.astype(inputs.dtype)
      var = self.var_ema.average.astype(inputs.dtype)
    eps = jax.lax.convert_element_type(self.eps, var.dtype)
    x_hat = (inputs - mean) * jax.lax.rsqrt(var + eps)
    param_axes = tuple(i for i in range(nd) if i not in axis)
    return "scale", ScaleConfig(param_axes), x_hat, unsupported
