"""The built-in structure rules ``dense``, ``conv`` and ``scale`` (``embed``: ``_rules_embed.py``).

Each rule turns one layer call's cached primal ``x`` (the layer's input, ``[M, ...]``)
and output cotangents ``g`` (``[B, M, ...]``, one slice per model output) into the
canonical factors of ``_ops.py``:

* ``affine``: ``x -> [M, T, G, I]``, ``g -> [B, M, T, G, J]``, roles ``("w", "b")``;
* ``scale``: ``x -> [M, T, C]``, ``g -> [B, M, T, C]``, roles ``("scale", "offset")``.

Each registers itself (``_rule.register_rule``) when the core is imported.
"""

from __future__ import annotations

import dataclasses
import math

import jax.numpy as jnp
from jax import lax

from ntklayers._core._ops import AFFINE, SCALE
from ntklayers._core._rule import Rule, register_rule

# ----------------------------------------------------------------- dense ---


@dataclasses.dataclass(frozen=True)
class DenseConfig:
  """``y = x @ w (+ b)`` contracting the trailing ``in_axes`` axes of ``x`` into
  the trailing ``out_axes`` axes of ``y``; the axes between the batch and the
  features share ``w`` (sequence positions, heads of a ``DenseGeneral``, ...).

  With ``group_axes``, the ``group_axes`` axes just before the features index
  independent weights: ``x [M, *T, *G, *I]``, ``w [*G, *I, *J]``,
  ``y [M, *T, *G, *J]`` (a batched ``dot_general``, e.g. per-head projections).
  """

  in_axes: int = 1
  out_axes: int = 1
  group_axes: int = 0


def _dense_canonicalize(cfg: DenseConfig, x, g):
  m = x.shape[0]
  i = math.prod(x.shape[x.ndim - cfg.in_axes:])
  j = math.prod(g.shape[g.ndim - cfg.out_axes:])
  gs = math.prod(x.shape[x.ndim - cfg.in_axes - cfg.group_axes:x.ndim - cfg.in_axes])
  return x.reshape(m, -1, gs, i), g.reshape(g.shape[0], m, -1, gs, j)


def _dense_unsupported(cfg: DenseConfig, x_shape) -> str | None:
  if len(x_shape) < cfg.in_axes + cfg.group_axes + 1:
    return f"its input of shape {x_shape} has no batch axis"
  return None


def _dense_flops(cfg, x_shape, y_shape) -> float:
  return 2.0 * math.prod(x_shape[1:]) * math.prod(y_shape[len(y_shape) - cfg.out_axes:])


register_rule("dense", Rule(AFFINE, _dense_canonicalize, _dense_unsupported, _dense_flops,
                            vmappable=True))


# ------------------------------------------------------------------ conv ---


@dataclasses.dataclass(frozen=True)
class ConvConfig:
  """An N-d ``lax.conv_general_dilated`` with weights ``[*kernel, C_in / G, C_out]``.

  Attributes:
    kernel_shape: spatial kernel shape.
    strides: window strides.
    padding: ``"SAME"``, ``"VALID"`` (or another lax string) or ``((lo, hi), ...)``.
    lhs_dilation: input dilation.
    rhs_dilation: kernel dilation (``rate``).
    feature_group_count: number of groups ``G``.
    channels_last: ``True`` for ``N...C``, ``False`` for ``NC...``.
    batched: whether the layer input has a batch axis.
  """

  kernel_shape: tuple[int, ...]
  strides: tuple[int, ...]
  padding: str | tuple[tuple[int, int], ...]
  lhs_dilation: tuple[int, ...]
  rhs_dilation: tuple[int, ...]
  feature_group_count: int
  channels_last: bool
  batched: bool = True


def _spatial_letters(nd: int) -> str:
  return "DHW"[3 - nd:] if nd <= 3 else "".join(chr(ord("a") + k) for k in range(nd))


def conv_patches(cfg: ConvConfig, x: jnp.ndarray) -> jnp.ndarray:
  """Channels-last input ``[M, *S, C]`` -> patches ``[M, *S_out, C * prod(kernel)]``.

  Patch features are ordered with ``C`` slowest, so a ``G``-group split is a
  reshape to ``[..., G, C / G * prod(kernel)]``.
  """
  nd = len(cfg.kernel_shape)
  sp = _spatial_letters(nd)
  return lax.conv_general_dilated_patches(
      x, filter_shape=cfg.kernel_shape, window_strides=cfg.strides,
      padding=cfg.padding, lhs_dilation=cfg.lhs_dilation,
      rhs_dilation=cfg.rhs_dilation,
      dimension_numbers=(f"N{sp}C", f"{sp}IO", f"N{sp}C"),
      precision=lax.Precision.HIGHEST)


def _conv_canonicalize(cfg: ConvConfig, x, g):
  if not cfg.channels_last:
    x = jnp.moveaxis(x, 1, -1)
    g = jnp.moveaxis(g, 2, -1)
  patches = conv_patches(cfg, x)
  m, groups = x.shape[0], cfg.feature_group_count
  xc = patches.reshape(m, -1, groups, patches.shape[-1] // groups)
  gc = g.reshape(g.shape[0], m, -1, groups, g.shape[-1] // groups)
  return xc, gc


def _conv_unsupported(cfg: ConvConfig, x_shape) -> str | None:
  if not cfg.batched:
    return f"its input of shape {x_shape} is unbatched"
  return None


def _conv_flops(cfg: ConvConfig, x_shape, y_shape) -> float:
  c_in = x_shape[-1] if cfg.channels_last else x_shape[1]
  positions = math.prod(y_shape[1:]) if y_shape else 1
  return 2.0 * positions * math.prod(cfg.kernel_shape) * c_in / cfg.feature_group_count


def _conv_on_vmap(cfg: ConvConfig) -> ConvConfig | None:
  # A convolution written per example (unbatched input) becomes a batched one.
  return None if cfg.batched else dataclasses.replace(cfg, batched=True)


register_rule("conv", Rule(AFFINE, _conv_canonicalize, _conv_unsupported, _conv_flops,
                           on_vmap=_conv_on_vmap))


# ------------------------------------------------------------ layer norm ---


@dataclasses.dataclass(frozen=True)
class ScaleConfig:
  """``y = x_hat * scale + offset`` with parameters over ``param_axes`` of ``x_hat``.

  The primal cached for this kind is ``x_hat`` (for LayerNorm: the normalized
  input), not the layer input. ``param_axes`` are absolute axes of ``x_hat``.
  """

  param_axes: tuple[int, ...]


def _scale_canonicalize(cfg: ScaleConfig, x, g):
  nd = x.ndim
  rest = [a for a in range(1, nd) if a not in cfg.param_axes]
  perm = [0, *rest, *cfg.param_axes]
  c = math.prod(x.shape[a] for a in cfg.param_axes)
  xc = jnp.transpose(x, perm).reshape(x.shape[0], -1, c)
  gc = jnp.transpose(g, [0] + [a + 1 for a in perm]).reshape(g.shape[0], x.shape[0], -1, c)
  return xc, gc


def _scale_unsupported(cfg: ScaleConfig, x_shape) -> str | None:
  if 0 in cfg.param_axes:
    return "its parameters span the batch axis"
  return None


def _scale_flops(cfg, x_shape, y_shape) -> float:
  return 4.0 * math.prod(x_shape[1:])


def _bias_canonicalize(cfg: ScaleConfig, x, g):
  """A shared offset reads only the cotangents (``x`` is a token ``[M]``):
  ``g [B, M, ...] -> [B, M, T, C]``, and zeros ``x [M, T, C]`` in the scale
  layout (never read: the op's Jacobian of the offset alone ignores ``x``)."""
  del x
  nd = g.ndim - 1
  rest = [a for a in range(1, nd) if a not in cfg.param_axes]
  perm = [0, *rest, *cfg.param_axes]
  m = g.shape[1]
  c = math.prod(g.shape[1 + a] for a in cfg.param_axes)
  gc = jnp.transpose(g, [0] + [a + 1 for a in perm]).reshape(g.shape[0], m, -1, c)
  return jnp.broadcast_to(jnp.zeros((), g.dtype), gc.shape[1:]), gc


def _bias_flops(cfg, x_shape, y_shape) -> float:
  return float(math.prod(y_shape[1:]))


def _scale_on_vmap(cfg: ScaleConfig) -> ScaleConfig:
  return ScaleConfig(tuple(a + 1 for a in cfg.param_axes))  # absolute axes shift


register_rule("scale", Rule(SCALE, _scale_canonicalize, _scale_unsupported, _scale_flops,
                            on_vmap=_scale_on_vmap))
# A recognized ``y = a + b`` with ``b`` a broadcast leaf: the scale op's offset alone.
register_rule("bias", Rule(SCALE, _bias_canonicalize, _scale_unsupported, _bias_flops))

