"""Structure descriptions shared by the linen and NNX adapters.

Flax's ``Conv``, ``Dense``/``DenseGeneral``/``LinearGeneral`` and ``LayerNorm``
have the same semantics in linen and NNX; these helpers turn a layer's settings
and its call inputs into ``(kind, config, primal, unsupported)`` for
:func:`ntklayers.tap`.
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
