"""The zoo's architectures in plain JAX, on canonical weights (the reference forms).

Every zoo model is defined here once, as a function ``apply(weights, x)`` of a flat
dict of *canonical weights* ``{"module/leaf": array}``; the Haiku, Flax and
Equinox forms (``hk_models.py``, ``linen_models.py``, ``nnx_models.py``,
``eqx_models.py``) build the same network with the same module names, and
``weights.py`` maps the canonical dict onto their parameter trees. Canonical
layouts are Haiku's: dense ``w [in, out]``, conv ``w [H, W, I, O]`` (``NHWC``
inputs), ``b``, norm ``scale``/``offset`` ``[C]``, BatchNorm moving ``mean``/``var``
``[C]`` (not trainable), ``embeddings [V, D]``; attention ``name/query``,
``name/key``, ``name/value`` (``w [D, H * K]``) and ``name/linear`` (``[H * K, D]``).

This module imports only ``jax`` and ``numpy`` and runs on jax 0.4.23 too:
``nt_side.py`` rebuilds every model from it in neural-tangents' environment. No
implicit rank promotion (biases are broadcast explicitly), so the models also run
under ``jax_numpy_rank_promotion="raise"``.

Glossary of shapes: ``N`` batch, ``T`` tokens, ``D`` width, ``H`` heads,
``K = D / H`` head size, ``O`` outputs, ``V`` vocabulary.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

Weights = dict[str, Any]
LN_EPS = 1e-5  # every norm of the zoo, in every framework
BN_DECAY = 0.9

# --------------------------------------------------------------- configs ---


class MLP(NamedTuple):
  """ReLU MLP: ``depth`` dense layers ``fc0 .. fc{depth-2}`` of ``width``, then ``head``."""

  d_in: int = 64
  width: int = 512
  depth: int = 4
  n_out: int = 10


class CNN(NamedTuple):
  """3x3 convs ``conv0`` (16), ``conv1`` (32, stride 2), ``conv2`` (32), flatten, ``head``."""

  size: int = 16
  c_in: int = 3
  widths: tuple[int, ...] = (16, 32, 32)
  n_out: int = 10


class Block(NamedTuple):
  """One pre-LN transformer block on ``[N, T, D]`` inputs, mean-pooled, ``head``."""

  t: int = 16
  d: int = 64
  heads: int = 4
  n_out: int = 10


class ResNet(NamedTuple):
  """CIFAR ResNet (basic blocks, BatchNorm in inference mode).

  ``preact=False``: post-activation blocks (ResNet-18: ``blocks=(2, 2, 2, 2)``,
  ``widths=(64, 128, 256, 512)``); ``preact=True``: a WideResNet (WRN-16-4 is
  ``blocks=(2, 2, 2)``, ``widths=(64, 128, 256)``, ``stem=16``).
  """

  size: int = 32
  c_in: int = 3
  widths: tuple[int, ...] = (16, 32, 64)
  blocks: tuple[int, ...] = (2, 2, 2)
  stem: int = 16
  preact: bool = False
  n_out: int = 10


class ViT(NamedTuple):
  """Patch embedding (conv), position embedding, pre-LN blocks, mean pool, MLP head."""

  size: int = 32
  c_in: int = 3
  patch: int = 4
  d: int = 64
  depth: int = 4
  heads: int = 4
  n_out: int = 10


class Mixer(NamedTuple):
  """MLP-Mixer: patch embedding, token- and channel-mixing MLPs, mean pool, ``head``."""

  size: int = 32
  c_in: int = 3
  patch: int = 4
  d: int = 64
  depth: int = 4
  tokens_mlp: int = 32
  channels_mlp: int = 256
  n_out: int = 10


class GPT(NamedTuple):
  """Small GPT: token + position embeddings, causal pre-RMSNorm blocks, a decoder
  tied to the token embedding, read at the last position (``O = V``)."""

  vocab: int = 10
  t: int = 32
  d: int = 64
  depth: int = 2
  heads: int = 4


class HkResNet(NamedTuple):
  """Haiku's own ``hk.nets.ResNet`` (``blocks=(2, 2, 2, 2)`` and ``channels=(64, ...,
  512)``: ``hk.nets.ResNet18``, unmodified); built in Haiku on both sides."""

  size: int = 32
  c_in: int = 3
  blocks: tuple[int, ...] = (2, 2, 2, 2)
  channels: tuple[int, ...] = (64, 128, 256, 512)
  n_out: int = 10


# Sizes per zoo model: ``(config, N)``. ``default``: the table (float32,
# O = 10); ``small``: a quick run; ``tiny``: the tests (float64, against jacrev).
SIZES: dict[str, dict[str, tuple[Any, int]]] = {
    "mlp": {"default": (MLP(), 32), "small": (MLP(32, 128, 3), 16),
            "tiny": (MLP(5, 7, 3, 3), 3)},
    "cnn": {"default": (CNN(), 16), "small": (CNN(size=8), 8),
            "tiny": (CNN(6, 2, (3, 4, 4), 3), 3)},
    "transformer": {"default": (Block(), 16), "small": (Block(8, 32), 8),
                    "tiny": (Block(4, 8, 2, 3), 3)},
    "resnet": {"default": (ResNet(), 8), "small": (ResNet(16, widths=(8, 16, 32)), 4),
               "tiny": (ResNet(8, 2, (4, 6), (1, 1), 4, False, 3), 3)},
    "resnet18": {"default": (ResNet(widths=(32, 64, 128, 256), blocks=(2, 2, 2, 2), stem=32), 8),
                 "full": (ResNet(widths=(64, 128, 256, 512), blocks=(2, 2, 2, 2), stem=64), 8),
                 "small": (ResNet(16, widths=(8, 16, 32, 64), blocks=(2, 2, 2, 2), stem=8), 4),
                 "tiny": (ResNet(8, 2, (4, 4, 6, 6), (1, 1, 1, 1), 4, False, 3), 3)},
    "wrn": {"default": (ResNet(widths=(32, 64, 128), preact=True), 8),
            "small": (ResNet(16, widths=(16, 32, 64), blocks=(1, 1, 1), preact=True), 4),
            "tiny": (ResNet(8, 2, (4, 6), (1, 1), 4, True, 3), 3)},
    "vit": {"default": (ViT(), 8), "small": (ViT(16, d=32, depth=2), 4),
            "tiny": (ViT(8, 2, 4, 8, 1, 2, 3), 3)},
    "mixer": {"default": (Mixer(), 8), "small": (Mixer(16, d=32, depth=2, channels_mlp=64), 4),
              "tiny": (Mixer(8, 2, 4, 8, 1, 3, 8, 3), 3)},
    "gpt": {"default": (GPT(), 8), "small": (GPT(t=16, d=32), 4),
            "tiny": (GPT(5, 4, 8, 1, 2), 3)},
    "hk_resnet18": {"default": (HkResNet(), 4),
                    "small": (HkResNet(16, channels=(16, 32, 64, 128)), 4),
                    "tiny": (HkResNet(16, 2, (1, 1, 1, 1), (4, 4, 4, 4), 3), 2)},
}


# ------------------------------------------------------------ primitives ---


def _bcast(v: jax.Array, y: jax.Array) -> jax.Array:
  """A trailing-axis vector broadcast explicitly to ``y``'s shape."""
  return jnp.broadcast_to(v, y.shape)


def dense(w: Weights, name: str, x: jax.Array) -> jax.Array:
  """``x @ w (+ b)`` over the last axis."""
  y = jnp.dot(x, w[f"{name}/w"])
  b = w.get(f"{name}/b")
  return y if b is None else y + _bcast(b, y)


def conv(w: Weights, name: str, x: jax.Array, stride: int = 1,
         padding: str = "SAME") -> jax.Array:
  """2-D convolution, ``NHWC`` inputs, ``HWIO`` kernel."""
  y = lax.conv_general_dilated(x, w[f"{name}/w"], (stride, stride), padding,
                               dimension_numbers=("NHWC", "HWIO", "NHWC"))
  b = w.get(f"{name}/b")
  return y if b is None else y + _bcast(b, y)


def layer_norm(w: Weights, name: str, x: jax.Array) -> jax.Array:
  """LayerNorm over the last axis (exact variance), scale and offset."""
  mean = jnp.mean(x, axis=-1, keepdims=True)
  var = jnp.var(x, axis=-1, keepdims=True)
  y = (x - mean) * lax.rsqrt(var + LN_EPS)
  return y * _bcast(w[f"{name}/scale"], y) + _bcast(w[f"{name}/offset"], y)


def rms_norm(w: Weights, name: str, x: jax.Array) -> jax.Array:
  """RMSNorm over the last axis, scale only."""
  y = x * lax.rsqrt(jnp.mean(jnp.square(x), axis=-1, keepdims=True) + LN_EPS)
  return y * _bcast(w[f"{name}/scale"], y)


def batch_norm(w: Weights, name: str, x: jax.Array) -> jax.Array:
  """BatchNorm in inference mode: the moving ``mean``/``var``, scale and offset."""
  y = (x - _bcast(w[f"{name}/mean"], x)) * _bcast(lax.rsqrt(w[f"{name}/var"] + LN_EPS), x)
  return y * _bcast(w[f"{name}/scale"], y) + _bcast(w[f"{name}/offset"], y)


def attention(w: Weights, name: str, x: jax.Array, heads: int,
              mask: jax.Array | None = None) -> jax.Array:
  """Self-attention as Haiku's ``MultiHeadAttention``; ``mask [T, T]`` (bool)."""
  *lead, t, _ = x.shape

  def project(part):
    y = dense(w, f"{name}/{part}", x)
    return y.reshape((*lead, t, heads, y.shape[-1] // heads))

  q, k, v = project("query"), project("key"), project("value")
  logits = jnp.einsum("...thd,...Thd->...htT", q, k) / np.sqrt(q.shape[-1]).astype(x.dtype)
  if mask is not None:
    logits = jnp.where(jnp.broadcast_to(mask, logits.shape), logits, -1e30)
  attn = jnp.einsum("...htT,...Thd->...thd", jax.nn.softmax(logits), v)
  return dense(w, f"{name}/linear", attn.reshape((*lead, t, -1)))


def causal_mask(t: int) -> jax.Array:
  return jnp.tril(jnp.ones((t, t), bool))


# ----------------------------------------------------------------- models ---


def mlp(cfg: MLP, w: Weights, x: jax.Array) -> jax.Array:
  for i in range(cfg.depth - 1):
    x = jax.nn.relu(dense(w, f"fc{i}", x))
  return dense(w, "head", x)


def cnn(cfg: CNN, w: Weights, x: jax.Array) -> jax.Array:
  for i, _ in enumerate(cfg.widths):
    x = jax.nn.relu(conv(w, f"conv{i}", x, stride=2 if i == 1 else 1))
  return dense(w, "head", x.reshape(x.shape[0], -1))


def block(cfg: Block, w: Weights, x: jax.Array, prefix: str = "",
          mask: jax.Array | None = None, norm: Callable = layer_norm) -> jax.Array:
  """A pre-norm transformer block (residual attention, residual 4D GELU MLP)."""
  p = prefix
  x = x + attention(w, f"{p}attn", norm(w, f"{p}norm0", x), cfg.heads, mask)
  h = jax.nn.gelu(dense(w, f"{p}mlp0", norm(w, f"{p}norm1", x)))
  return x + dense(w, f"{p}mlp1", h)


def transformer(cfg: Block, w: Weights, x: jax.Array) -> jax.Array:
  return dense(w, "head", block(cfg, w, x).mean(axis=1))


def resnet(cfg: ResNet, w: Weights, x: jax.Array) -> jax.Array:
  bn = lambda name, h: batch_norm(w, name, h)
  x = conv(w, "stem_conv", x)
  if not cfg.preact:
    x = jax.nn.relu(bn("stem_bn", x))
  c = cfg.stem
  for s, (width, n) in enumerate(zip(cfg.widths, cfg.blocks)):
    for b in range(n):
      p, stride = f"s{s}b{b}_", 2 if (s > 0 and b == 0) else 1
      project = stride != 1 or c != width
      if cfg.preact:
        o = jax.nn.relu(bn(p + "bn0", x))
        h = conv(w, p + "conv0", o, stride)
        h = conv(w, p + "conv1", jax.nn.relu(bn(p + "bn1", h)))
        x = h + (conv(w, p + "proj", o, stride) if project else x)
      else:
        h = jax.nn.relu(bn(p + "bn0", conv(w, p + "conv0", x, stride)))
        h = bn(p + "bn1", conv(w, p + "conv1", h))
        sc = bn(p + "proj_bn", conv(w, p + "proj", x, stride)) if project else x
        x = jax.nn.relu(h + sc)
      c = width
  if cfg.preact:
    x = jax.nn.relu(bn("final_bn", x))
  return dense(w, "head", x.mean(axis=(1, 2)))


def patches(cfg: ViT | Mixer, w: Weights, x: jax.Array) -> jax.Array:
  """``[N, S, S, C] -> [N, T, D]``: a ``patch x patch`` conv of stride ``patch``."""
  y = conv(w, "patch", x, cfg.patch, "VALID")
  return y.reshape(y.shape[0], -1, y.shape[-1])


def vit(cfg: ViT, w: Weights, x: jax.Array) -> jax.Array:
  x = patches(cfg, w, x)
  x = x + jnp.broadcast_to(w["pos_embed/pos"], x.shape)
  for i in range(cfg.depth):
    x = block(Block(x.shape[1], cfg.d, cfg.heads), w, x, prefix=f"b{i}_")
  x = layer_norm(w, "norm_f", x).mean(axis=1)
  return dense(w, "head1", jnp.tanh(dense(w, "head0", x)))


def mixer(cfg: Mixer, w: Weights, x: jax.Array) -> jax.Array:
  x = patches(cfg, w, x)
  for i in range(cfg.depth):
    p = f"b{i}_"
    y = jnp.swapaxes(layer_norm(w, p + "norm0", x), 1, 2)  # [N, D, T]
    y = dense(w, p + "tok1", jax.nn.gelu(dense(w, p + "tok0", y)))
    x = x + jnp.swapaxes(y, 1, 2)
    y = layer_norm(w, p + "norm1", x)
    x = x + dense(w, p + "ch1", jax.nn.gelu(dense(w, p + "ch0", y)))
  return dense(w, "head", layer_norm(w, "norm_f", x).mean(axis=1))


def gpt(cfg: GPT, w: Weights, ids: jax.Array) -> jax.Array:
  table = w["embed/embeddings"]
  x = table[ids]
  x = x + jnp.broadcast_to(w["pos_embed/pos"], x.shape)
  mask = causal_mask(ids.shape[1])
  for i in range(cfg.depth):
    x = block(Block(cfg.t, cfg.d, cfg.heads), w, x, prefix=f"b{i}_", mask=mask,
              norm=rms_norm)
  h = rms_norm(w, "norm_f", x)[:, -1]
  return jnp.dot(h, table.T)


APPLY: dict[type, Callable[..., jax.Array]] = {
    MLP: mlp, CNN: cnn, Block: transformer, ResNet: resnet, ViT: vit, Mixer: mixer, GPT: gpt}


def apply(cfg: Any, w: Weights, x: jax.Array) -> jax.Array:
  """``apply(cfg, weights, x) -> [N, O]`` for any zoo config."""
  return APPLY[type(cfg)](cfg, w, x)


def input_shape(cfg: Any, n: int) -> tuple[int, ...]:
  """The batch shape of ``cfg``'s inputs (ids ``[N, T]`` for the GPT)."""
  if isinstance(cfg, MLP):
    return (n, cfg.d_in)
  if isinstance(cfg, Block):
    return (n, cfg.t, cfg.d)
  if isinstance(cfg, GPT):
    return (n, cfg.t)
  return (n, cfg.size, cfg.size, cfg.c_in)


def make_input(cfg: Any, n: int, dtype: Any, seed: int = 1) -> np.ndarray:
  """Deterministic NumPy inputs: ``N(0, 1)`` data, or token ids in ``[0, V)``."""
  rng = np.random.RandomState(seed)
  shape = input_shape(cfg, n)
  if isinstance(cfg, GPT):
    return rng.randint(0, cfg.vocab, size=shape).astype(np.int32)
  return rng.standard_normal(shape).astype(dtype)
