"""The stock-layer models of ``models_stock`` in Equinox, and Equinox builds.

Equinox models are written per example (``[5]``, ``[2, 9, 9]`` channels first,
``[T, d]``, token ids ``[T]``) and batched with ``jax.vmap``, as
``ntklayers.equinox.ntk_fn`` applies them; sequence layers are vmapped over tokens
inside the model. :func:`eqx_build` makes a ``models_flax.FlaxBuilt`` of any
Equinox model: random NumPy values for the inexact arrays (initializers never
run: only ``eqx.filter_eval_shape``), ``f(params, x)`` the vmapped model
recombined from ``eqx.partition(model, eqx.is_inexact_array)``, and ``ntk_fn``
through ``ntklayers.equinox.ntk_fn``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

import models_flax
import ntklayers.equinox
from models import make_inputs
from models_flax import FlaxBuilt
from models_stock import SHAPES, StockDescriptor, stock


class EqxCNN(eqx.Module):
  """[2, 9, 9]: strided, dilated, grouped VALID; a Linear head (as ``hk_cnn``)."""

  conv1: eqx.nn.Conv2d
  conv2: eqx.nn.Conv2d
  conv3: eqx.nn.Conv2d
  head: eqx.nn.Linear

  def __init__(self, dtype, key):
    k = jax.random.split(key, 4)
    self.conv1 = eqx.nn.Conv2d(2, 4, 3, stride=2, padding=1, dtype=dtype, key=k[0])
    self.conv2 = eqx.nn.Conv2d(4, 4, 3, dilation=2, padding=2, dtype=dtype, key=k[1])
    self.conv3 = eqx.nn.Conv2d(4, 4, 3, groups=2, dtype=dtype, key=k[2])
    self.head = eqx.nn.Linear(36, 3, dtype=dtype, key=k[3])

  def __call__(self, x):
    x = jax.nn.relu(self.conv1(x))
    x = jax.nn.relu(self.conv2(x))
    x = jax.nn.relu(self.conv3(x))
    return self.head(x.reshape(-1))


class EqxTransformer(eqx.Module):
  """Pre-LN block on [T=3, d=4] -> [T, d]; ``mask`` (optional) for the attention."""

  ln1: eqx.nn.LayerNorm
  att: eqx.nn.MultiheadAttention
  ln2: eqx.nn.LayerNorm
  mlp_in: eqx.nn.Linear
  mlp_out: eqx.nn.Linear

  def __init__(self, dtype, key):
    k = jax.random.split(key, 3)
    self.ln1 = eqx.nn.LayerNorm(4, dtype=dtype)
    self.att = eqx.nn.MultiheadAttention(2, 4, use_query_bias=True, use_key_bias=True,
                                         use_value_bias=True, use_output_bias=True,
                                         dtype=dtype, key=k[0])
    self.ln2 = eqx.nn.LayerNorm(4, dtype=dtype)
    self.mlp_in = eqx.nn.Linear(4, 8, dtype=dtype, key=k[1])
    self.mlp_out = eqx.nn.Linear(8, 4, dtype=dtype, key=k[2])

  def __call__(self, x, mask=None):
    h = jax.vmap(self.ln1)(x)
    x = x + self.att(h, h, h, mask=mask)
    h = jax.vmap(self.ln2)(x)
    return x + jax.vmap(self.mlp_out)(jax.nn.gelu(jax.vmap(self.mlp_in)(h)))


class EqxEmbed(eqx.Module):
  """Token ids [T=5] -> [3]; an optional dropout (``key=``, ``inference=``)."""

  embed: eqx.nn.Embedding
  proj: eqx.nn.Linear
  head: eqx.nn.Linear
  dropout: eqx.nn.Dropout

  def __init__(self, dtype, key):
    k = jax.random.split(key, 3)
    self.embed = eqx.nn.Embedding(11, 8, dtype=dtype, key=k[0])
    self.proj = eqx.nn.Linear(8, 8, dtype=dtype, key=k[1])
    self.head = eqx.nn.Linear(8, 3, dtype=dtype, key=k[2])
    self.dropout = eqx.nn.Dropout(0.5)

  def __call__(self, x, *, key=None, inference=None):
    h = jax.nn.relu(jax.vmap(self.proj)(jax.vmap(self.embed)(x)))
    h = self.dropout(jnp.mean(h, axis=0), key=key, inference=key is None or inference)
    return self.head(h)


class EqxNorms(eqx.Module):
  """[T=4, C=6]: RMSNorm per token, Linear, GroupNorm (3 groups, channels first)."""

  rms: eqx.nn.RMSNorm
  proj: eqx.nn.Linear
  gn: eqx.nn.GroupNorm
  head: eqx.nn.Linear

  def __init__(self, dtype, key):
    k = jax.random.split(key, 2)
    self.rms = eqx.nn.RMSNorm(6, use_bias=False, dtype=dtype)
    self.proj = eqx.nn.Linear(6, 6, dtype=dtype, key=k[0])
    self.gn = eqx.nn.GroupNorm(3, 6, dtype=dtype)
    self.head = eqx.nn.Linear(6, 3, dtype=dtype, key=k[1])

  def __call__(self, x):
    x = jnp.tanh(jax.vmap(self.proj)(jax.vmap(self.rms)(x)))
    return self.head(jnp.mean(self.gn(x.T).T, axis=0))


class EqxBatchNorm(eqx.Module):
  """Linear, BatchNorm (stateful; ``inference=False`` needs ``axis_name="batch"``),
  relu, Linear: ``(x, state) -> (y, state)``."""

  inp: eqx.nn.Linear
  bn: eqx.nn.BatchNorm
  head: eqx.nn.Linear

  def __init__(self, dtype, key):
    k = jax.random.split(key, 2)
    self.inp = eqx.nn.Linear(5, 8, dtype=dtype, key=k[0])
    self.bn = eqx.nn.BatchNorm(8, axis_name="batch", mode="batch", inference=True,
                               dtype=dtype)
    self.head = eqx.nn.Linear(8, 3, dtype=dtype, key=k[1])

  def __call__(self, x, state, *, inference=None):
    h, state = self.bn(self.inp(x), state, inference=inference)
    return self.head(jax.nn.relu(h)), state


def _mlp(dtype, key):
  return eqx.nn.MLP(5, 3, 16, 2, activation=jax.nn.relu, dtype=dtype, key=key)


# ------------------------------------------------------------------ builds ---


def random_model(make: Callable[[Any, jax.Array], Any], dtype, *, stateful: bool = False,
                 seed: int = 2) -> Any:
  """``make(dtype, key)`` (or ``(model, state)`` from ``eqx.nn.make_with_state``) with
  NumPy values: weights (rank >= 2) ``N(0, 1 / fan_in)`` over all axes but the
  first, rank-1 ``weight``s (norm scales) around 1, biases around 0, float state
  (moving averages) positive around 1, integer state 0."""
  rng = np.random.default_rng(seed)
  key = jax.random.key(0)
  create = eqx.nn.make_with_state(make) if stateful else make
  shapes = eqx.filter_eval_shape(create, dtype, key)

  def fill(path, leaf):
    if not isinstance(leaf, jax.ShapeDtypeStruct):
      return leaf
    shape = leaf.shape
    if not jnp.issubdtype(leaf.dtype, jnp.floating):
      return jnp.zeros(shape, leaf.dtype)
    noise = rng.normal(size=shape)
    name = str(getattr(path[-1], "name", ""))
    if stateful and path[0] == jax.tree_util.SequenceKey(1):
      value = 1.0 + 0.3 * np.abs(noise)
    elif name == "weight" and len(shape) >= 2:
      value = noise / np.sqrt(max(1, int(np.prod(shape[1:]))))
    elif name == "weight":
      value = 1.0 + 0.3 * noise
    else:
      value = 0.3 * noise
    return jnp.asarray(value, leaf.dtype)

  return jax.tree_util.tree_map_with_path(fill, shapes)


def eqx_build(make: Callable, x_shape, layer_names: tuple[str, ...], *,
              vocab: int | None = None, stateful: bool = False,
              kwargs: dict[str, Any] | None = None, standard: bool = False):
  """``build(dtype) -> FlaxBuilt`` of the Equinox model ``make(dtype, key)``, called
  with ``kwargs`` (bound in ``f`` and passed to the entry point); ``standard``: traced
  under "standard" dtype promotion (``eqx.nn.BatchNorm`` mixes Python floats with
  its integer counter, which conftest's "strict" promotion refuses)."""
  kwargs = dict(kwargs or {})

  def build(dtype) -> FlaxBuilt:
    target = random_model(make, dtype, stateful=stateful)
    model, state = target if stateful else (target, None)
    x1, x2 = make_inputs(x_shape, dtype, vocab=vocab)
    params, static = eqx.partition(model, eqx.is_inexact_array)

    def one(m, xi):
      if stateful:  # a fresh copy: Equinox refuses a state used twice
        return m(xi, jax.tree.map(lambda a: a, state), **kwargs)[0]
      return m(xi, **kwargs)

    @functools.partial(models_flax._promoting, standard=standard)
    def f(p, x):
      m = eqx.combine(p, static)
      return jax.vmap(lambda xi: one(m, xi))(x)

    def ntk_fn(**options):
      kernel_fn = ntklayers.equinox.ntk_fn(**options)
      return models_flax._promoting(lambda a, b=None: kernel_fn(target, a, b, **kwargs),
                                    standard)

    return FlaxBuilt(f, params, x1, x2, framework="equinox", ntk_fn=ntk_fn,
                     layer_names=layer_names, extra=dict(model=model, state=state))

  return build


_ATT = ("att/query_proj", "att/key_proj", "att/value_proj", "att/output_proj")
_EQX = {
    "mlp": (_mlp, ("layers/0", "layers/1", "layers/2"), {}),
    "cnn": (EqxCNN, ("conv1", "conv2", "conv3", "head"), {}),
    "transformer": (EqxTransformer, ("ln1", *_ATT, "ln2", "mlp_in", "mlp_out"), {}),
    "embed": (EqxEmbed, ("embed", "proj", "head"), {}),
    "norms": (EqxNorms, ("rms", "proj", "gn", "head"), {}),
    "batchnorm_eval": (EqxBatchNorm, ("inp", "bn", "head"),
                       {"stateful": True, "standard": True}),
}

MODELS: tuple[StockDescriptor, ...] = tuple(
    stock("equinox", kind, eqx_build(make, (2, 9, 9) if kind == "cnn" else SHAPES[kind][0],
                                      names, vocab=SHAPES[kind][2], **kw))
    for kind, (make, names, kw) in _EQX.items())
