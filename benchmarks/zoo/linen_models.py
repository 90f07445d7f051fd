"""The zoo in flax.linen: every architecture of ``plain.py``, drop-in or stock layers.

``Model(cfg, form)`` is one ``nn.Module`` whose layers come from
``ntklayers.flax.linen`` (``form="dropin"``) or ``flax.linen`` (``"stock"``), with
the module names of ``plain.py`` (attention's output projection is linen's
``out``; ``weights.to_linen`` maps it). Norms use ``epsilon=1e-5`` and the exact
variance, as Haiku does, so every form computes the same function.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from ntklayers.flax import linen as ntk_nn

from .plain import BN_DECAY, CNN, GPT, LN_EPS, MLP, Block, Mixer, ResNet, ViT, causal_mask


class PosEmbed(nn.Module):
  """A learned position embedding ``pos [T, D]`` added to ``[N, T, D]``."""

  @nn.compact
  def __call__(self, x):
    pos = self.param("pos", nn.initializers.normal(1.0), x.shape[1:], x.dtype)
    return x + jnp.broadcast_to(pos, x.shape)


def _ln(L, name):
  return L.LayerNorm(epsilon=LN_EPS, use_fast_variance=False, name=name)


def _block(L, x, heads, prefix="", mask=None, rms=False):
  d = x.shape[-1]
  norm = ((lambda n: L.RMSNorm(epsilon=LN_EPS, name=n)) if rms else (lambda n: _ln(L, n)))
  attn = L.MultiHeadDotProductAttention(num_heads=heads, qkv_features=d, out_features=d,
                                        name=prefix + "attn")
  x = x + attn(norm(prefix + "norm0")(x), mask=mask)
  h = jax.nn.gelu(L.Dense(4 * d, name=prefix + "mlp0")(norm(prefix + "norm1")(x)))
  return x + L.Dense(d, name=prefix + "mlp1")(h)


def _resnet(L, cfg: ResNet, x):
  conv = lambda c, s, n, k=3: L.Conv(c, (k, k), strides=s, use_bias=False, name=n)
  bn = lambda n, h: L.BatchNorm(use_running_average=True, momentum=BN_DECAY, epsilon=LN_EPS,
                                name=n)(h)
  x = conv(cfg.stem, 1, "stem_conv")(x)
  if not cfg.preact:
    x = jax.nn.relu(bn("stem_bn", x))
  c = cfg.stem
  for s, (width, n) in enumerate(zip(cfg.widths, cfg.blocks)):
    for b in range(n):
      p, stride = f"s{s}b{b}_", 2 if (s > 0 and b == 0) else 1
      project = stride != 1 or c != width
      if cfg.preact:
        o = jax.nn.relu(bn(p + "bn0", x))
        h = conv(width, stride, p + "conv0")(o)
        h = conv(width, 1, p + "conv1")(jax.nn.relu(bn(p + "bn1", h)))
        x = h + (conv(width, stride, p + "proj", 1)(o) if project else x)
      else:
        h = jax.nn.relu(bn(p + "bn0", conv(width, stride, p + "conv0")(x)))
        h = bn(p + "bn1", conv(width, 1, p + "conv1")(h))
        sc = bn(p + "proj_bn", conv(width, stride, p + "proj", 1)(x)) if project else x
        x = jax.nn.relu(h + sc)
      c = width
  if cfg.preact:
    x = jax.nn.relu(bn("final_bn", x))
  return L.Dense(cfg.n_out, name="head")(x.mean(axis=(1, 2)))


def _patches(L, cfg, x):
  y = L.Conv(cfg.d, (cfg.patch, cfg.patch), strides=cfg.patch, padding="VALID",
             name="patch")(x)
  return y.reshape(y.shape[0], -1, y.shape[-1])


class Model(nn.Module):
  """A zoo architecture (``cfg``, a ``plain.py`` config) in linen; ``form`` is
  ``"dropin"`` (``ntklayers.flax.linen`` layers) or ``"stock"``."""

  cfg: Any
  form: str = "stock"

  @nn.compact
  def __call__(self, x):
    L = ntk_nn if self.form == "dropin" else nn
    cfg = self.cfg
    if isinstance(cfg, MLP):
      for i in range(cfg.depth - 1):
        x = jax.nn.relu(L.Dense(cfg.width, name=f"fc{i}")(x))
      return L.Dense(cfg.n_out, name="head")(x)
    if isinstance(cfg, CNN):
      for i, width in enumerate(cfg.widths):
        x = jax.nn.relu(L.Conv(width, (3, 3), strides=2 if i == 1 else 1, name=f"conv{i}")(x))
      return L.Dense(cfg.n_out, name="head")(x.reshape(x.shape[0], -1))
    if isinstance(cfg, Block):
      return L.Dense(cfg.n_out, name="head")(_block(L, x, cfg.heads).mean(axis=1))
    if isinstance(cfg, ResNet):
      return _resnet(L, cfg, x)
    if isinstance(cfg, ViT):
      x = PosEmbed(name="pos_embed")(_patches(L, cfg, x))
      for i in range(cfg.depth):
        x = _block(L, x, cfg.heads, prefix=f"b{i}_")
      x = _ln(L, "norm_f")(x).mean(axis=1)
      return L.Dense(cfg.n_out, name="head1")(jnp.tanh(L.Dense(cfg.d, name="head0")(x)))
    if isinstance(cfg, Mixer):
      x = _patches(L, cfg, x)
      t = x.shape[1]
      for i in range(cfg.depth):
        p = f"b{i}_"
        y = jnp.swapaxes(_ln(L, p + "norm0")(x), 1, 2)
        y = L.Dense(t, name=p + "tok1")(jax.nn.gelu(L.Dense(cfg.tokens_mlp, name=p + "tok0")(y)))
        x = x + jnp.swapaxes(y, 1, 2)
        y = jax.nn.gelu(L.Dense(cfg.channels_mlp, name=p + "ch0")(_ln(L, p + "norm1")(x)))
        x = x + L.Dense(cfg.d, name=p + "ch1")(y)
      return L.Dense(cfg.n_out, name="head")(_ln(L, "norm_f")(x).mean(axis=1))
    if isinstance(cfg, GPT):
      embed = L.Embed(cfg.vocab, cfg.d, name="embed")
      x = PosEmbed(name="pos_embed")(embed(x))
      mask = causal_mask(x.shape[1])[None, None]
      for i in range(cfg.depth):
        x = _block(L, x, cfg.heads, prefix=f"b{i}_", mask=mask, rms=True)
      h = L.RMSNorm(epsilon=LN_EPS, name="norm_f")(x)[:, -1]
      return embed.attend(h)  # the decoder tied to the embedding
    raise TypeError(f"no linen form of {type(cfg).__name__}")
