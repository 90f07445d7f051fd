"""The zoo in flax.nnx (where cheap: MLP, CNN, the ResNets, MLP-Mixer).

``Model(cfg, form, rngs)`` keeps its layers as attributes named like ``plain.py``'s
modules, from ``ntklayers.flax.nnx`` (``form="dropin"``) or ``flax.nnx``
(``"stock"``). ``build`` fills them with the canonical weights and returns what
``registry.build`` needs: the kernel differentiates the ``nnx.Param`` state, through
``ntklayers.flax.nnx.ntk_fn()`` on ``(graphdef, params, *rest)``.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from ntklayers.flax import nnx as ntk_nnx

from . import weights as W
from .plain import BN_DECAY, CNN, LN_EPS, MLP, Mixer, ResNet


class Model(nnx.Module):
  """A zoo architecture in NNX (``cfg``: a ``plain.py`` config)."""

  def __init__(self, cfg: Any, form: str, rngs: nnx.Rngs):
    self.cfg = cfg
    L = ntk_nnx if form == "dropin" else nnx
    add = lambda name, layer: setattr(self, name, layer)
    ln = lambda d: L.LayerNorm(d, epsilon=LN_EPS, use_fast_variance=False, rngs=rngs)
    if isinstance(cfg, MLP):
      dims = [cfg.d_in] + [cfg.width] * (cfg.depth - 1)
      for i in range(cfg.depth - 1):
        add(f"fc{i}", L.Linear(dims[i], dims[i + 1], rngs=rngs))
      add("head", L.Linear(dims[-1], cfg.n_out, rngs=rngs))
    elif isinstance(cfg, CNN):
      c, size = cfg.c_in, cfg.size
      for i, width in enumerate(cfg.widths):
        add(f"conv{i}", L.Conv(c, width, (3, 3), strides=2 if i == 1 else 1, rngs=rngs))
        c, size = width, -(-size // 2) if i == 1 else size
      add("head", L.Linear(size * size * c, cfg.n_out, rngs=rngs))
    elif isinstance(cfg, ResNet):
      conv = lambda i, o, s, k=3: L.Conv(i, o, (k, k), strides=s, use_bias=False, rngs=rngs)
      bn = lambda c: L.BatchNorm(c, use_running_average=True, momentum=BN_DECAY,
                                 epsilon=LN_EPS, rngs=rngs)
      add("stem_conv", conv(cfg.c_in, cfg.stem, 1))
      if not cfg.preact:
        add("stem_bn", bn(cfg.stem))
      c = cfg.stem
      for s, (width, n) in enumerate(zip(cfg.widths, cfg.blocks)):
        for b in range(n):
          p, stride = f"s{s}b{b}_", 2 if (s > 0 and b == 0) else 1
          add(p + "bn0", bn(c if cfg.preact else width))
          add(p + "conv0", conv(c, width, stride))
          add(p + "bn1", bn(width))
          add(p + "conv1", conv(width, width, 1))
          if stride != 1 or c != width:
            add(p + "proj", conv(c, width, stride, 1))
            if not cfg.preact:
              add(p + "proj_bn", bn(width))
          c = width
      if cfg.preact:
        add("final_bn", bn(c))
      add("head", L.Linear(c, cfg.n_out, rngs=rngs))
    elif isinstance(cfg, Mixer):
      t = (cfg.size // cfg.patch) ** 2
      add("patch", L.Conv(cfg.c_in, cfg.d, (cfg.patch, cfg.patch), strides=cfg.patch,
                          padding="VALID", rngs=rngs))
      for i in range(cfg.depth):
        p = f"b{i}_"
        add(p + "norm0", ln(cfg.d))
        add(p + "tok0", L.Linear(t, cfg.tokens_mlp, rngs=rngs))
        add(p + "tok1", L.Linear(cfg.tokens_mlp, t, rngs=rngs))
        add(p + "norm1", ln(cfg.d))
        add(p + "ch0", L.Linear(cfg.d, cfg.channels_mlp, rngs=rngs))
        add(p + "ch1", L.Linear(cfg.channels_mlp, cfg.d, rngs=rngs))
      add("norm_f", ln(cfg.d))
      add("head", L.Linear(cfg.d, cfg.n_out, rngs=rngs))
    else:
      raise TypeError(f"no NNX form of {type(cfg).__name__}")

  def __call__(self, x: jax.Array) -> jax.Array:
    cfg = self.cfg
    L = lambda name: getattr(self, name)
    if isinstance(cfg, MLP):
      for i in range(cfg.depth - 1):
        x = jax.nn.relu(L(f"fc{i}")(x))
      return L("head")(x)
    if isinstance(cfg, CNN):
      for i, _ in enumerate(cfg.widths):
        x = jax.nn.relu(L(f"conv{i}")(x))
      return L("head")(x.reshape(x.shape[0], -1))
    if isinstance(cfg, ResNet):
      x = L("stem_conv")(x)
      if not cfg.preact:
        x = jax.nn.relu(L("stem_bn")(x))
      for s, n in enumerate(cfg.blocks):
        for b in range(n):
          p = f"s{s}b{b}_"
          project = hasattr(self, p + "proj")
          if cfg.preact:
            o = jax.nn.relu(L(p + "bn0")(x))
            h = L(p + "conv1")(jax.nn.relu(L(p + "bn1")(L(p + "conv0")(o))))
            x = h + (L(p + "proj")(o) if project else x)
          else:
            h = jax.nn.relu(L(p + "bn0")(L(p + "conv0")(x)))
            h = L(p + "bn1")(L(p + "conv1")(h))
            x = jax.nn.relu(h + (L(p + "proj_bn")(L(p + "proj")(x)) if project else x))
      if cfg.preact:
        x = jax.nn.relu(L("final_bn")(x))
      return L("head")(x.mean(axis=(1, 2)))
    if isinstance(cfg, Mixer):
      y = L("patch")(x)
      x = y.reshape(y.shape[0], -1, y.shape[-1])
      for i in range(cfg.depth):
        p = f"b{i}_"
        y = jnp.swapaxes(L(p + "norm0")(x), 1, 2)
        y = L(p + "tok1")(jax.nn.gelu(L(p + "tok0")(y)))
        x = x + jnp.swapaxes(y, 1, 2)
        x = x + L(p + "ch1")(jax.nn.gelu(L(p + "ch0")(L(p + "norm1")(x))))
      return L("head")(L("norm_f")(x).mean(axis=1))
    raise TypeError(type(cfg).__name__)


def _nnx_key(canon: W.Canonical, path: list[str], shape: tuple[int, ...]):
  if path and path[-1] == "value":
    path = path[:-1]
  key = W.flax_key(canon, path)
  return key, W._reshaped(canon, key, shape)  # pylint: disable=protected-access


def build(cfg: Any, form: str, canon: W.Canonical, x: jax.Array):
  """``(apply, params, kernel factory)`` of the NNX form (see ``registry.build``)."""
  import ntklayers.flax.nnx  # pylint: disable=g-import-not-at-top
  model = Model(cfg, form, nnx.Rngs(0))
  state = nnx.state(model)
  flat, treedef = jax.tree_util.tree_flatten_with_path(state)
  values = W.fill_paths(canon, [(W.path_names(p), leaf) for p, leaf in flat], _nnx_key)
  nnx.update(model, jax.tree.unflatten(treedef, [jnp.asarray(v) for v in values]))
  graphdef, params, *rest = nnx.split(model, nnx.Param, ...)

  def apply(p, x):
    return nnx.merge(graphdef, p, *rest)(x)

  def factory(impl):
    kernel_fn = ntklayers.flax.nnx.ntk_fn(implementation=impl)
    return lambda p, x: kernel_fn((graphdef, p, *rest), x)

  return apply, params, factory
