"""Structure descriptions shared by the linen and NNX adapters.

Flax's ``Conv``, ``Dense``/``DenseGeneral``/``LinearGeneral``, ``Embed`` and the
normalizations (``LayerNorm``, ``RMSNorm``, ``GroupNorm``, ``BatchNorm``) have the
same semantics in linen and NNX; these helpers turn a layer's settings and its
call inputs into ``(kind, config, primal, unsupported)`` for :func:`ntklayers.tap`.
The normalizations are elementwise scales of a normalized input ``x_hat``, which
:func:`flax_stats` and :func:`normalized` recompute as Flax's ``_compute_stats``
and ``_normalize`` do (without the scale and bias).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp

from ntklayers.adapters import (ConvConfig, DenseConfig, Description, ScaleConfig,
                                normalize_axes)


def _tuple(x: Any) -> tuple:
  return tuple(x) if isinstance(x, Sequence) else (x,)


def describe_dense_general(inputs: jax.Array, axis: Any, features: Any,
                           batch_dims: Any = ()) -> Description:
  """``DenseGeneral``/``LinearGeneral``: contracted ``axis`` moved to the end."""
  axis = normalize_axes(_tuple(axis), inputs.ndim)
  n_out = len(_tuple(features))
  config = DenseConfig(in_axes=len(axis), out_axes=n_out)
  if _tuple(batch_dims) != () or 0 in axis:
    return "dense", config, inputs, "it has `batch_dims` or contracts the batch axis"
  primal = jnp.moveaxis(inputs, axis, tuple(range(inputs.ndim - len(axis), inputs.ndim)))
  return "dense", config, primal, None


def describe_conv(inputs: jax.Array, kernel_size: Any, strides: Any, padding: Any,
                  input_dilation: Any, kernel_dilation: Any, feature_group_count: int,
                  mask: Any, canonicalize_padding) -> Description:
  """Flax ``Conv`` (channels last; CIRCULAR/REFLECT/CAUSAL paddings pre-applied)."""
  kernel_size = _tuple(kernel_size)
  nd = len(kernel_size)

  def bcast(v):
    v = 1 if v is None else v
    return (v,) * nd if isinstance(v, int) else tuple(v)

  strides, lhs, rhs = bcast(strides), bcast(input_dilation), bcast(kernel_dilation)
  pad = canonicalize_padding(padding, nd)
  primal = inputs
  if pad in ("CIRCULAR", "REFLECT"):
    dilated = [(k - 1) * d + 1 for k, d in zip(kernel_size, rhs)]
    pads = [(0, 0)] + [((k - 1) // 2, k // 2) for k in dilated] + [(0, 0)]
    primal = jnp.pad(inputs, pads, mode={"CIRCULAR": "wrap", "REFLECT": "reflect"}[pad])
    pad = "VALID"
  elif pad == "CAUSAL":
    primal = jnp.pad(inputs, [(0, 0), (rhs[0] * (kernel_size[0] - 1), 0), (0, 0)])
    pad = "VALID"
  if not isinstance(pad, str):
    pad = tuple((int(lo), int(hi)) for lo, hi in pad)
  config = ConvConfig(kernel_shape=kernel_size, strides=strides, padding=pad,
                      lhs_dilation=lhs, rhs_dilation=rhs,
                      feature_group_count=feature_group_count, channels_last=True,
                      batched=inputs.ndim == nd + 2)
  unsupported = None
  if mask is not None:
    unsupported = "its kernel is masked (`mask=`), which has no structure rule"
  return "conv", config, primal, unsupported


def describe_layer_norm(x: jax.Array, reduction_axes: Any, feature_axes: Any,
                        epsilon: float, use_fast_variance: bool,
                        mask: Any = None) -> Description:
  """Flax ``LayerNorm``: elementwise scale/offset of ``(x - mean) * rsqrt(var + eps)``."""
  nd = x.ndim
  axes = normalize_axes(_tuple(reduction_axes), nd)
  xf = jnp.asarray(x, jnp.promote_types(jnp.float32, x.dtype))
  mean = jnp.mean(xf, axis=axes, keepdims=True)
  if use_fast_variance:
    var = jnp.maximum(jnp.mean(jnp.square(xf), axis=axes, keepdims=True) - jnp.square(mean), 0)
  else:
    var = jnp.mean(jnp.square(xf - mean), axis=axes, keepdims=True)
  x_hat = ((xf - mean) * jax.lax.rsqrt(var + epsilon)).astype(x.dtype)
  unsupported = None if mask is None else "it is called with a `mask`"
  return "scale", ScaleConfig(normalize_axes(_tuple(feature_axes), nd)), x_hat, unsupported


def describe_embed(inputs: jax.Array, num_embeddings: int) -> Description:
  """Flax ``Embed.__call__``: ``jnp.take(embedding, ids, axis=0)`` (ids in
  ``[-V, 0)`` wrap around, others read no row), or with one row the row
  broadcast to every position."""
  mode = "clip" if num_embeddings == 1 else "wrap"
  # (vocab_size, out_of_range): the "embed" rule's config as a plain tuple.
  return "embed", (int(num_embeddings), mode), jnp.asarray(inputs), None


def flax_axes(rank: int, axes: Any) -> tuple[int, ...]:
  """Flax's ``_canonicalize_axes`` (non-negative, deduplicated, in set order)."""
  return tuple({rank + a if a < 0 else a for a in _tuple(axes)})


def _abs_sq(x: jax.Array) -> jax.Array:
  if jnp.iscomplexobj(x):
    return jax.lax.square(jax.lax.real(x)) + jax.lax.square(jax.lax.imag(x))
  return jax.lax.square(x)


def flax_stats(x: jax.Array, axes: Any, dtype: Any, *, use_mean: bool = True,
               use_fast_variance: bool = True, force_float32: bool = True):
  """``(mean, var)`` as Flax's ``_compute_stats`` (no mask, no ``axis_name``)."""
  if dtype is None:
    dtype = jnp.result_type(x)
  if force_float32:
    dtype = jnp.promote_types(dtype, jnp.float32)
  x = jnp.asarray(x, dtype)
  axes = flax_axes(x.ndim, axes)
  if not use_mean:
    var = _abs_sq(x).mean(axes)
    return jnp.zeros_like(var), var
  if use_fast_variance:
    mu, mu2 = x.mean(axes), _abs_sq(x).mean(axes)
    return mu, jnp.maximum(0.0, mu2 - _abs_sq(mu))
  mu = x.mean(axes)
  return mu, _abs_sq(x - jnp.expand_dims(mu, axes)).mean(axes)


def normalized(x: jax.Array, mean: jax.Array, var: jax.Array, reduction_axes: Any,
               epsilon: float) -> jax.Array:
  """``x_hat = (x - mean) * rsqrt(var + epsilon)``, the statistics broadcast over
  ``reduction_axes`` (Flax's ``_normalize`` without scale and bias)."""
  reduced = flax_axes(x.ndim, reduction_axes)
  stats_shape = [1 if a in reduced else n for a, n in enumerate(x.shape)]
  return (x - mean.reshape(stats_shape)) * jax.lax.rsqrt(var.reshape(stats_shape) + epsilon)


def _unsupported_stats(x: jax.Array, reduction_axes: Any, mask: Any,
                       axis_name: Any) -> str | None:
  if mask is not None:
    return "it is called with a `mask`"
  if axis_name is not None:
    return "it normalizes across devices (`axis_name`)"
  if 0 in flax_axes(x.ndim, reduction_axes):
    return "it normalizes over the batch axis (samples interact)"
  return None


def describe_rms_norm(x: jax.Array, reduction_axes: Any, feature_axes: Any,
                      epsilon: float, dtype: Any, use_fast_variance: bool,
                      force_float32: bool = True, mask: Any = None,
                      axis_name: Any = None) -> Description:
  """Flax ``RMSNorm``: elementwise scale of ``x * rsqrt(mean(|x|**2) + eps)``."""
  nd = x.ndim
  mean, var = flax_stats(x, reduction_axes, dtype, use_mean=False,
                         use_fast_variance=use_fast_variance, force_float32=force_float32)
  x_hat = normalized(x, mean, var, reduction_axes, epsilon)
  config = ScaleConfig(normalize_axes(_tuple(feature_axes), nd))
  return "scale", config, x_hat, _unsupported_stats(x, reduction_axes, mask, axis_name)


def describe_group_norm(x: jax.Array, num_groups: int, reduction_axes: Any,
                        epsilon: float, dtype: Any, use_fast_variance: bool,
                        force_float32: bool = True, mask: Any = None,
                        axis_name: Any = None, repeat_axis: int = -1) -> Description:
  """Flax ``GroupNorm`` (channels last, ``num_groups`` resolved by the caller):
  statistics over ``reduction_axes`` within each group of channels, repeated over
  the group (``repeat_axis``: linen repeats along ``-1``, NNX along ``1``)."""
  nd = x.ndim
  if reduction_axes is None:
    reduction_axes = list(range(1, nd - 1)) + [-1]
  red = flax_axes(nd, reduction_axes)
  config = ScaleConfig((nd - 1,))
  unsupported = _unsupported_stats(x, red, mask, axis_name)
  if unsupported is None and repeat_axis != -1 and red[:-1] != tuple(range(1, nd - 1)):
    unsupported = (f"its reduction axes {tuple(red)} are not every non-batch axis "
                   f"(flax.nnx repeats group statistics along axis {repeat_axis})")
  if unsupported is not None:
    return "scale", config, x, unsupported
  size = x.shape[-1] // num_groups
  mean, var = flax_stats(x.reshape(x.shape[:-1] + (num_groups, size)),
                         list(red[:-1]) + [-1], dtype, use_fast_variance=use_fast_variance,
                         force_float32=force_float32)
  mean = jnp.repeat(mean, size, axis=repeat_axis)
  var = jnp.repeat(var, size, axis=repeat_axis)
  return "scale", config, normalized(x, mean, var, red[:-1], epsilon), None


def describe_batch_norm(x: jax.Array, running: Any, axis: Any, epsilon: float,
                        dtype: Any, use_fast_variance: bool, force_float32: bool = True,
                        mask: Any = None, axis_name: Any = None) -> Description:
  """Flax ``BatchNorm``: scale and offset over the feature ``axis`` of the input
  normalized with ``running = (mean, var)`` (inference), or with the batch
  statistics when ``running`` is ``None`` (training: samples interact, which the
  caller declares)."""
  nd = x.ndim
  features = flax_axes(nd, axis)
  reduction = tuple(i for i in range(nd) if i not in features)
  config = ScaleConfig(tuple(sorted(features)))
  unsupported = None
  if running is None:
    unsupported = _unsupported_stats(x, (), mask, axis_name)
    mean, var = flax_stats(x, reduction, dtype, use_fast_variance=use_fast_variance,
                           force_float32=force_float32)
  else:
    mean, var = running
  return "scale", config, normalized(x, mean, var, reduction, epsilon), unsupported
