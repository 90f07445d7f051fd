"""Annotated flax.linen normalizations: ``RMSNorm``, ``GroupNorm`` and ``BatchNorm``.

Like ``LayerNorm`` (``_linen_layers.py``), each is an elementwise scale (and
bias) of a normalized input, described with the ``"scale"`` rule; the normalized
input is recomputed as linen computes it (``_common.flax_stats``/``normalized``:
same ``epsilon`` placement, variance formula and float32 promotion). The
interceptor calls ``_ntk_describe`` during a capture only.
"""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from ntklayers.flax import _common


class RMSNorm(nn.RMSNorm):
  """Drop-in for :class:`flax.linen.RMSNorm` (``use_scale``, ``reduction_axes``,
  ``feature_axes``).

  Example:
    >>> import jax, jax.numpy as jnp, ntklayers.flax
    >>> from ntklayers.flax import linen as ntk_nn
    >>> x = jnp.arange(12.0).reshape(3, 4)
    >>> layer = ntk_nn.RMSNorm()
    >>> v = layer.init(jax.random.key(0), x)
    >>> jax.tree.map(jnp.shape, v)
    {'params': {'scale': (4,)}}
    >>> ntklayers.flax.ntk_fn(layer)(v, x).shape
    (3, 3, 4, 4)
  """

  _ntk_roles = {"scale": "scale"}

  @staticmethod
  def _ntk_describe(module, x, *args, mask=None, **kwargs) -> _common.Description:
    return _common.describe_rms_norm(
        x, module.reduction_axes, module.feature_axes, module.epsilon, module.dtype,
        module.use_fast_variance, module.force_float32_reductions, mask, module.axis_name)


class GroupNorm(nn.GroupNorm):
  """Drop-in for :class:`flax.linen.GroupNorm` (``num_groups`` or ``group_size``,
  ``use_scale``, ``use_bias``, ``reduction_axes`` without the batch axis).

  Example:
    >>> import jax, jax.numpy as jnp, ntklayers.flax
    >>> from ntklayers.flax import linen as ntk_nn
    >>> x = jnp.arange(24.0).reshape(2, 3, 4) ** 2
    >>> layer = ntk_nn.GroupNorm(num_groups=2)
    >>> v = layer.init(jax.random.key(0), x)
    >>> jax.tree.map(jnp.shape, v)
    {'params': {'bias': (4,), 'scale': (4,)}}
    >>> ntklayers.flax.ntk_fn(layer, trace_axes=(1, 2))(v, x).shape
    (2, 2)
  """

  _ntk_roles = {"scale": "scale", "offset": "bias"}

  @staticmethod
  def _ntk_describe(module, x, *args, mask=None, **kwargs) -> _common.Description:
    groups = module.num_groups
    if module.group_size is not None:
      groups = x.shape[-1] // module.group_size
    return _common.describe_group_norm(
        x, groups, module.reduction_axes, module.epsilon, module.dtype,
        module.use_fast_variance, module.force_float32_reductions, mask, module.axis_name)


class BatchNorm(nn.BatchNorm):
  """Drop-in for :class:`flax.linen.BatchNorm`.

  With ``use_running_average=True`` (inference) its scale and bias act on the
  input normalized with the running statistics, and examples stay independent.
  With batch statistics (training) samples interact: the batch is treated as one
  sample, and the scale and bias are still contracted from factors, exactly.

  Example:
    >>> import jax, jax.numpy as jnp, ntklayers.flax
    >>> from ntklayers.flax import linen as ntk_nn
    >>> x = jnp.arange(12.0).reshape(3, 4)
    >>> layer = ntk_nn.BatchNorm(use_running_average=True)
    >>> v = layer.init(jax.random.key(0), x)
    >>> sorted(v)
    ['batch_stats', 'params']
    >>> ntklayers.flax.ntk_fn(layer)(v, x).shape
    (3, 3, 4, 4)
  """

  _ntk_roles = {"scale": "scale", "offset": "bias"}

  @staticmethod
  def _ntk_describe(module, x, use_running_average=None, *args, mask=None,
                    **kwargs) -> _common.Description:
    del args, kwargs
    use_running = (module.use_running_average if use_running_average is None
                   else use_running_average)
    running = None
    if use_running:
      mean = module.get_variable("batch_stats", "mean")
      var = module.get_variable("batch_stats", "var")
      if not module.force_float32_reductions:
        mean, var = jnp.asarray(mean, module.param_dtype), jnp.asarray(var, module.param_dtype)
      running = (mean, var)
    return _common.describe_batch_norm(
        x, running, module.axis, module.epsilon, module.dtype, module.use_fast_variance,
        module.force_float32_reductions, mask, module.axis_name)
