"""The zoo in Equinox, written the Equinox way: stock ``eqx.nn`` layers applied to
one example (``jax.vmap`` over positions inside, over the batch outside).

``Model(cfg, key)`` holds its layers in a dict named like ``plain.py``'s modules
(attention's projections are Equinox's ``query_proj`` ... ``output_proj``;
weights are ``[out, in]``, convs ``[O, I, H, W]`` on channels-first examples;
``weights.eqx_value`` maps canonical weights onto them). Architectures without
BatchNorm only (MLP, transformer block, ViT, MLP-Mixer, GPT): Equinox's BatchNorm
keeps its statistics in a separate ``State``, which is not natural here.
"""

from __future__ import annotations

from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp

from .plain import GPT, LN_EPS, MLP, Block, Mixer, ViT, causal_mask


class PosEmbed(eqx.Module):
  """A learned position embedding ``pos [T, D]``."""

  pos: jax.Array


def _linear(i, o, key):
  return eqx.nn.Linear(i, o, key=key)


def _per_position(layer, x):
  return jax.vmap(layer)(x)


class Model(eqx.Module):
  """A zoo architecture on one example (``cfg``: a ``plain.py`` config)."""

  layers: dict
  cfg: Any = eqx.field(static=True)

  def __init__(self, cfg: Any, key: jax.Array):
    self.cfg = cfg
    keys = iter(jax.random.split(key, 256))
    layers: dict[str, Any] = {}

    def lin(name, i, o):
      layers[name] = _linear(i, o, next(keys))

    def block(prefix, d, heads, rms=False):
      norm = ((lambda: eqx.nn.RMSNorm(d, eps=LN_EPS, use_bias=False)) if rms else
              (lambda: eqx.nn.LayerNorm(d, eps=LN_EPS)))
      layers[prefix + "norm0"] = norm()
      layers[prefix + "attn"] = eqx.nn.MultiheadAttention(
          heads, d, use_query_bias=True, use_key_bias=True, use_value_bias=True,
          use_output_bias=True, key=next(keys))
      layers[prefix + "norm1"] = norm()
      lin(prefix + "mlp0", d, 4 * d)
      lin(prefix + "mlp1", 4 * d, d)

    if isinstance(cfg, MLP):
      dims = [cfg.d_in] + [cfg.width] * (cfg.depth - 1)
      for i in range(cfg.depth - 1):
        lin(f"fc{i}", dims[i], dims[i + 1])
      lin("head", dims[-1], cfg.n_out)
    elif isinstance(cfg, Block):
      block("", cfg.d, cfg.heads)
      lin("head", cfg.d, cfg.n_out)
    elif isinstance(cfg, (ViT, Mixer)):
      t = (cfg.size // cfg.patch) ** 2
      layers["patch"] = eqx.nn.Conv2d(cfg.c_in, cfg.d, cfg.patch, stride=cfg.patch,
                                      key=next(keys))
      if isinstance(cfg, ViT):
        layers["pos_embed"] = PosEmbed(jnp.zeros((t, cfg.d)))
        for i in range(cfg.depth):
          block(f"b{i}_", cfg.d, cfg.heads)
        layers["norm_f"] = eqx.nn.LayerNorm(cfg.d, eps=LN_EPS)
        lin("head0", cfg.d, cfg.d)
        lin("head1", cfg.d, cfg.n_out)
      else:
        for i in range(cfg.depth):
          p = f"b{i}_"
          layers[p + "norm0"] = eqx.nn.LayerNorm(cfg.d, eps=LN_EPS)
          lin(p + "tok0", t, cfg.tokens_mlp)
          lin(p + "tok1", cfg.tokens_mlp, t)
          layers[p + "norm1"] = eqx.nn.LayerNorm(cfg.d, eps=LN_EPS)
          lin(p + "ch0", cfg.d, cfg.channels_mlp)
          lin(p + "ch1", cfg.channels_mlp, cfg.d)
        layers["norm_f"] = eqx.nn.LayerNorm(cfg.d, eps=LN_EPS)
        lin("head", cfg.d, cfg.n_out)
    elif isinstance(cfg, GPT):
      layers["embed"] = eqx.nn.Embedding(cfg.vocab, cfg.d, key=next(keys))
      layers["pos_embed"] = PosEmbed(jnp.zeros((cfg.t, cfg.d)))
      for i in range(cfg.depth):
        block(f"b{i}_", cfg.d, cfg.heads, rms=True)
      layers["norm_f"] = eqx.nn.RMSNorm(cfg.d, eps=LN_EPS, use_bias=False)
    else:
      raise TypeError(f"no Equinox form of {type(cfg).__name__}")
    self.layers = layers

  def _block(self, prefix: str, x: jax.Array, mask: jax.Array | None = None) -> jax.Array:
    L = self.layers
    h = _per_position(L[prefix + "norm0"], x)
    x = x + L[prefix + "attn"](h, h, h, mask=mask)
    h = _per_position(L[prefix + "norm1"], x)
    h = jax.nn.gelu(_per_position(L[prefix + "mlp0"], h))
    return x + _per_position(L[prefix + "mlp1"], h)

  def _patches(self, x: jax.Array) -> jax.Array:
    y = self.layers["patch"](jnp.transpose(x, (2, 0, 1)))  # [H, W, C] -> [D, h, w]
    return y.reshape(y.shape[0], -1).T  # [T, D]

  def __call__(self, x: jax.Array) -> jax.Array:
    """One example: ``[d_in]``, ``[T, D]``, an image ``[S, S, C]`` or ids ``[T]``."""
    L, cfg = self.layers, self.cfg
    if isinstance(cfg, MLP):
      for i in range(cfg.depth - 1):
        x = jax.nn.relu(L[f"fc{i}"](x))
      return L["head"](x)
    if isinstance(cfg, Block):
      return L["head"](self._block("", x).mean(axis=0))
    if isinstance(cfg, ViT):
      x = self._patches(x) + L["pos_embed"].pos
      for i in range(cfg.depth):
        x = self._block(f"b{i}_", x)
      x = _per_position(L["norm_f"], x).mean(axis=0)
      return L["head1"](jnp.tanh(L["head0"](x)))
    if isinstance(cfg, Mixer):
      x = self._patches(x)
      for i in range(cfg.depth):
        p = f"b{i}_"
        y = _per_position(L[p + "norm0"], x).T  # [D, T]
        y = _per_position(L[p + "tok1"], jax.nn.gelu(_per_position(L[p + "tok0"], y)))
        x = x + y.T
        y = jax.nn.gelu(_per_position(L[p + "ch0"], _per_position(L[p + "norm1"], x)))
        x = x + _per_position(L[p + "ch1"], y)
      return L["head"](_per_position(L["norm_f"], x).mean(axis=0))
    if isinstance(cfg, GPT):
      x = _per_position(L["embed"], x) + L["pos_embed"].pos
      mask = causal_mask(x.shape[0])
      for i in range(cfg.depth):
        x = self._block(f"b{i}_", x, mask)
      h = L["norm_f"](x[-1])
      return L["embed"].weight @ h  # the decoder tied to the embedding
    raise TypeError(type(cfg).__name__)
