"""The zoo in Haiku: every architecture of ``plain.py``, drop-in or stock layers.

One function per architecture takes a layer namespace ``L``: ``ntklayers.haiku``
(drop-ins: ``Linear``, ``Conv2D``, ``LayerNorm``, ``BatchNorm``, ``RMSNorm``,
``Embed``, ``MultiHeadAttention``) or ``haiku`` itself (stock layers). The drop-ins
are subclasses with the same constructors and parameter names, so both forms have
the same parameter tree, module names as in ``plain.py``. ``hk_resnet18`` is
Haiku's own ``hk.nets.ResNet18``, unmodified; its ``dropin`` form swaps Haiku's
classes for the drop-ins *inside* ``haiku._src.nets.resnet`` while it runs (a
benchmark-only patch, to measure what annotated layers would give it).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import haiku as hk
import jax
import jax.numpy as jnp

import ntklayers.haiku as nh

from .plain import BN_DECAY, CNN, GPT, LN_EPS, MLP, Block, HkResNet, Mixer, ResNet, ViT
from .plain import causal_mask

_W_INIT = hk.initializers.VarianceScaling(1.0)


def layers(form: str) -> Any:
  """The layer namespace of a form: ``"dropin"`` or ``"stock"``."""
  return nh if form == "dropin" else hk


def _ln(L, name):
  return L.LayerNorm(axis=-1, create_scale=True, create_offset=True, eps=LN_EPS, name=name)


def _bn(L, name):
  return L.BatchNorm(True, True, BN_DECAY, eps=LN_EPS, name=name)


def _mha(L, name, heads, d):
  return L.MultiHeadAttention(num_heads=heads, key_size=d // heads, model_size=d,
                              w_init=_W_INIT, name=name)


def mlp(L, cfg: MLP) -> Callable:
  def fn(x):
    for i in range(cfg.depth - 1):
      x = jax.nn.relu(L.Linear(cfg.width, name=f"fc{i}")(x))
    return L.Linear(cfg.n_out, name="head")(x)
  return fn


def cnn(L, cfg: CNN) -> Callable:
  def fn(x):
    for i, width in enumerate(cfg.widths):
      x = jax.nn.relu(L.Conv2D(width, 3, stride=2 if i == 1 else 1, name=f"conv{i}")(x))
    return L.Linear(cfg.n_out, name="head")(x.reshape(x.shape[0], -1))
  return fn


def _block(L, x, heads, prefix="", mask=None, rms=False):
  d = x.shape[-1]
  norm = ((lambda n: L.RMSNorm(axis=-1, eps=LN_EPS, name=n)) if rms else
          (lambda n: _ln(L, n)))
  h = norm(prefix + "norm0")(x)
  x = x + _mha(L, prefix + "attn", heads, d)(h, h, h, mask=mask)
  h = jax.nn.gelu(L.Linear(4 * d, name=prefix + "mlp0")(norm(prefix + "norm1")(x)))
  return x + L.Linear(d, name=prefix + "mlp1")(h)


def transformer(L, cfg: Block) -> Callable:
  def fn(x):
    return L.Linear(cfg.n_out, name="head")(_block(L, x, cfg.heads).mean(axis=1))
  return fn


def resnet(L, cfg: ResNet) -> Callable:
  def fn(x, is_training=False):
    conv = lambda c, s, n, k=3: L.Conv2D(c, k, stride=s, with_bias=False, name=n)
    bn = lambda n, h: _bn(L, n)(h, is_training=is_training)
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
    return L.Linear(cfg.n_out, name="head")(x.mean(axis=(1, 2)))
  return fn


def _patches(L, cfg, x):
  y = L.Conv2D(cfg.d, cfg.patch, stride=cfg.patch, padding="VALID", name="patch")(x)
  return y.reshape(y.shape[0], -1, y.shape[-1])


def _pos(x, dtype):
  with hk.name_scope("pos_embed"):
    pos = hk.get_parameter("pos", x.shape[1:], dtype, init=hk.initializers.RandomNormal())
  return x + jnp.broadcast_to(pos, x.shape)


def vit(L, cfg: ViT) -> Callable:
  def fn(x):
    x = _pos(_patches(L, cfg, x), x.dtype)
    for i in range(cfg.depth):
      x = _block(L, x, cfg.heads, prefix=f"b{i}_")
    x = _ln(L, "norm_f")(x).mean(axis=1)
    x = jnp.tanh(L.Linear(cfg.d, name="head0")(x))
    return L.Linear(cfg.n_out, name="head1")(x)
  return fn


def mixer(L, cfg: Mixer) -> Callable:
  def fn(x):
    x = _patches(L, cfg, x)
    t = x.shape[1]
    for i in range(cfg.depth):
      p = f"b{i}_"
      y = jnp.swapaxes(_ln(L, p + "norm0")(x), 1, 2)
      y = L.Linear(t, name=p + "tok1")(jax.nn.gelu(L.Linear(cfg.tokens_mlp, name=p + "tok0")(y)))
      x = x + jnp.swapaxes(y, 1, 2)
      y = jax.nn.gelu(L.Linear(cfg.channels_mlp, name=p + "ch0")(_ln(L, p + "norm1")(x)))
      x = x + L.Linear(cfg.d, name=p + "ch1")(y)
    return L.Linear(cfg.n_out, name="head")(_ln(L, "norm_f")(x).mean(axis=1))
  return fn


def gpt(L, cfg: GPT) -> Callable:
  def fn(ids):
    embed = L.Embed(cfg.vocab, cfg.d, name="embed")
    x = embed(ids)
    x = _pos(x, x.dtype)
    mask = causal_mask(ids.shape[1])[None, None]
    for i in range(cfg.depth):
      x = _block(L, x, cfg.heads, prefix=f"b{i}_", mask=mask, rms=True)
    h = L.RMSNorm(axis=-1, eps=LN_EPS, name="norm_f")(x)[:, -1]
    return jnp.dot(h, embed.embeddings.T)  # the decoder tied to the embedding
  return fn


@contextlib.contextmanager
def _resnet_dropins() -> Iterator[None]:
  """Haiku's ResNet builds its layers through a namespace class ``hk`` in
  ``haiku._src.nets.resnet``; swap its classes for the drop-ins while it runs."""
  from haiku._src.nets import resnet as hk_resnet  # pylint: disable=g-import-not-at-top
  ns = hk_resnet.hk
  saved = {k: getattr(ns, k) for k in ("Conv2D", "BatchNorm", "Linear")}
  for k in saved:
    setattr(ns, k, getattr(nh, k))
  try:
    yield
  finally:
    for k, v in saved.items():
      setattr(ns, k, v)


def hk_resnet(cfg: HkResNet) -> hk.Module:
  """``hk.nets.ResNet18`` for the default config, else ``hk.nets.ResNet`` with the
  same arguments but for ``blocks`` and ``channels`` (also of the initial conv:
  the tests' small twin)."""
  if cfg == HkResNet(cfg.size, cfg.c_in, n_out=cfg.n_out):
    return hk.nets.ResNet18(num_classes=cfg.n_out)
  initial = dict(output_channels=cfg.channels[0], kernel_shape=7, stride=2, with_bias=False,
                 padding="SAME", name="initial_conv")
  return hk.nets.ResNet(blocks_per_group=cfg.blocks, num_classes=cfg.n_out, bottleneck=False,
                        channels_per_group=cfg.channels,
                        use_projection=(False, True, True, True),
                        initial_conv_config=initial)


def hk_resnet18(form: str, cfg: HkResNet) -> Callable:
  def fn(x, is_training=False):
    return hk_resnet(cfg)(x, is_training=is_training)

  if form == "stock":
    return fn

  def patched(x, is_training=False):
    with _resnet_dropins():
      return fn(x, is_training)
  return patched


BUILDERS = {MLP: mlp, CNN: cnn, Block: transformer, ResNet: resnet, ViT: vit,
            Mixer: mixer, GPT: gpt}


def transform(cfg: Any, form: str) -> hk.TransformedWithState:
  """The Haiku model of ``cfg`` in ``form``, with state (BatchNorm), no RNG:
  ``fn(x)``, and ``fn(x, is_training)`` for the models with BatchNorm (inference
  mode by default; ``init`` creates the moving averages in training mode)."""
  if isinstance(cfg, HkResNet):
    fn = hk_resnet18(form, cfg)
  else:
    fn = BUILDERS[type(cfg)](layers(form), cfg)
  return hk.without_apply_rng(hk.transform_with_state(fn))


def templates(cfg: Any, x: Any) -> tuple[Any, Any]:
  """Abstract ``(params, state)`` of ``cfg``'s stock Haiku form."""
  net = transform(cfg, "stock")
  if not isinstance(cfg, (ResNet, HkResNet)):
    return jax.eval_shape(net.init, jax.random.key(0), x)
  # Haiku creates BatchNorm's moving averages in training mode only; its update
  # there raises a float to an int32 power (standard promotion).
  with jax.numpy_dtype_promotion("standard"):
    return jax.eval_shape(lambda k, x: net.init(k, x, True), jax.random.key(0), x)

