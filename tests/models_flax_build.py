"""The builders of the Flax (linen and NNX) test models of ``models_flax.py``.

:class:`FlaxBuilt` (a ``models.Built`` that also carries the Flax entry point),
random parameters of the shapes the initializers would create
(:func:`fill_value`, :func:`linen_variables`, :func:`nnx_model`), the local dtype
promotion of Flax's norms (:func:`flax_promotion`), the ``build(dtype)`` functions
of a linen module (``_linen_build``) and of an NNX model (``_nnx_build``), and
:class:`FlaxModelDescriptor` with its constructors ``_linen`` / ``_nnx``.
``models_flax`` (whose docstring describes the format) re-exports them all.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import ntklayers.flax
from ntklayers.flax import nnx as fx

import models
from models import ModelDescriptor, make_inputs


class FlaxBuilt(models.Built):
  """``models.Built(f, params, x1, x2)`` plus the Flax entry point (see module doc).

  A subclass of the ``Built`` NamedTuple: still a 4-tuple (unpacking and field
  access behave as for Haiku models); the extra attributes live in ``__dict__``.
  """

  def __new__(cls, f, params, x1, x2, *, framework: str,
              ntk_fn: Callable[..., Callable], layer_names: tuple[str, ...],
              extra: dict[str, Any] | None = None):
    self = super().__new__(cls, f, params, x1, x2)
    self.framework = framework
    self.ntk_fn = ntk_fn
    self.layer_names = tuple(layer_names)
    self.extra = dict(extra or {})  # e.g. the linen module / variables, the NNX model
    return self


# ------------------------------------------------------------- parameters ---


def _leaf_name(path) -> str:
  """Last dict key of a tree path (NNX Variables add a trailing ``.value``)."""
  for k in reversed(path):
    if isinstance(k, jax.tree_util.DictKey):
      return str(k.key)
  return str(path[-1])


def fill_value(path, leaf, rng: np.random.Generator, dtype) -> jax.Array:
  """Random value for one parameter/state leaf of abstract shape ``leaf``."""
  shape, leaf_dtype = tuple(leaf.shape), leaf.dtype
  if jnp.issubdtype(leaf_dtype, jax.dtypes.prng_key):
    return jax.random.key(0)  # NNX RngKey state (not differentiated)
  if not jnp.issubdtype(leaf_dtype, jnp.floating):
    return jnp.zeros(shape, leaf_dtype)  # e.g. an NNX RngCount
  name = _leaf_name(path)
  noise = rng.normal(size=shape)
  if name == "kernel":
    value = noise / np.sqrt(max(1, math.prod(shape[:-1])))
  elif name == "scale":
    value = 1.0 + 0.3 * noise
  elif name == "var":
    value = 1.0 + 0.3 * np.abs(noise)  # a positive moving variance
  elif name == "embedding":
    value = noise
  else:  # bias, mean
    value = 0.3 * noise
  return jnp.asarray(value, dtype)


def linen_variables(module: nn.Module, dtype, *args, seed: int = 2, **kwargs):
  """``module.init(key, *args, **kwargs)``'s tree with random NumPy values."""
  rng = np.random.default_rng(seed)
  shapes = jax.eval_shape(lambda k: module.init(k, *args, **kwargs), jax.random.key(0))
  return jax.tree_util.tree_map_with_path(lambda p, l: fill_value(p, l, rng, dtype),
                                          shapes)


def nnx_model(make: Callable[[nnx.Rngs], nnx.Module], dtype, *, seed: int = 2):
  """``make(nnx.Rngs(0))`` with random NumPy values (initializers never run)."""
  rng = np.random.default_rng(seed)
  abstract = nnx.eval_shape(lambda: make(nnx.Rngs(0)))
  graphdef, state = nnx.split(abstract)
  state = jax.tree_util.tree_map_with_path(lambda p, l: fill_value(p, l, rng, dtype),
                                           state)
  return nnx.merge(graphdef, state)


# ------------------------------------------------------------ builders ---


def flax_promotion(standard: bool):
  """Flax's ``LayerNorm``/``BatchNorm`` compute statistics in
  ``jnp.promote_types(dtype, jnp.float32)``, which ``jax_numpy_dtype_promotion=
  "strict"`` (conftest) rejects for float64: such models run (and are traced)
  under a local ``"standard"`` promotion, like Haiku's BatchNorm in models.py."""
  return jax.numpy_dtype_promotion("standard") if standard else contextlib.nullcontext()


def _promoting(fn: Callable, standard: bool) -> Callable:
  if not standard:
    return fn

  def wrapped(*args, **kwargs):
    with flax_promotion(True):
      return fn(*args, **kwargs)

  return wrapped


def _linen_build(module_fn: Callable[[Any], nn.Module], x_shape, layer_names, *,
                 vocab: int | None = None, apply_kwargs: Callable[[Any], dict] | None = None,
                 init_kwargs: dict | None = None, mutable=False, standard: bool = False):
  """``build`` of a linen model: ``module_fn(dtype)`` is the (configured) module;
  ``standard``: the model needs ``flax_promotion``."""

  def build(dtype) -> FlaxBuilt:
    module = module_fn(dtype)
    x1, x2 = make_inputs(x_shape, dtype, vocab=vocab)
    kw = apply_kwargs(dtype) if apply_kwargs else {}
    with flax_promotion(standard):
      variables = linen_variables(module, dtype, x1, **(init_kwargs or kw))
    params = variables["params"]
    rest = {k: v for k, v in variables.items() if k != "params"}

    @functools.partial(_promoting, standard=standard)
    def f(p, x):
      out = module.apply({"params": p, **rest}, x, mutable=mutable, **kw)
      return out[0] if mutable else out

    def ntk_fn(**options):
      kernel_fn = ntklayers.flax.ntk_fn(module, mutable=mutable, **options)
      return _promoting(lambda a, b=None: kernel_fn(variables, a, b, **kw), standard)

    return FlaxBuilt(f, params, x1, x2, framework="linen", ntk_fn=ntk_fn,
                     layer_names=layer_names,
                     extra=dict(module=module, variables=variables, apply_kwargs=kw,
                                mutable=mutable, standard=standard))

  return build


def _nnx_build(make: Callable[[Any, nnx.Rngs], nnx.Module], x_shape, layer_names, *,
               vocab: int | None = None, mode: str | None = None,
               pass_split: bool = False, standard: bool = False):
  """``build`` of an NNX model ``make(dtype, rngs)``; ``mode`` is ``"train"``/``"eval"``;
  ``pass_split`` passes ``(graphdef, params, *states)`` instead of the module."""

  def build(dtype) -> FlaxBuilt:
    with flax_promotion(standard):
      model = nnx_model(lambda rngs: make(dtype, rngs), dtype)
    if mode == "eval":
      model.eval()
    elif mode == "train":
      model.train()
    x1, x2 = make_inputs(x_shape, dtype, vocab=vocab)
    graphdef, params, *rest = nnx.split(model, nnx.Param, ...)

    @functools.partial(_promoting, standard=standard)
    def f(p, x):
      # Fresh Variables created inside the trace (BatchNorm in training mode
      # writes its batch statistics, which NNX allows only at their own trace level).
      return nnx.merge(graphdef, p, *jax.tree.map(lambda a: a, rest))(x)

    target = (graphdef, params, *rest) if pass_split else model

    def ntk_fn(**options):
      kernel_fn = fx.ntk_fn(**options)
      return _promoting(lambda a, b=None: kernel_fn(target, a, b), standard)

    return FlaxBuilt(f, params, x1, x2, framework="nnx", ntk_fn=ntk_fn,
                     layer_names=layer_names, extra=dict(model=model, standard=standard))

  return build


# ------------------------------------------------------------ descriptors ---

@dataclasses.dataclass(frozen=True)
class FlaxModelDescriptor(ModelDescriptor):
  """``models.ModelDescriptor`` plus ``framework`` (``"linen"`` or ``"nnx"``).

  The one field the shared registry lacks: with ``framework: str = "haiku"`` added
  to ``models.ModelDescriptor``, these become plain ``ModelDescriptor``s and tests
  written for Haiku parameter trees can select ``m.framework == "haiku"``.
  """

  framework: str = "linen"


def _linen(name, module_fn, x_shape, layer_names, *, out_rank=2, coupled=False,
           vocab=None, warning=None, **build_kw) -> FlaxModelDescriptor:
  return FlaxModelDescriptor(
      name, _linen_build(module_fn, x_shape, layer_names, vocab=vocab, **build_kw),
      x_shape, out_rank=out_rank, coupled=coupled, int_inputs=vocab is not None,
      warning=warning, framework="linen")


def _nnx(name, make, x_shape, layer_names, *, out_rank=2, coupled=False, vocab=None,
         warning=None, **build_kw) -> FlaxModelDescriptor:
  return FlaxModelDescriptor(
      name, _nnx_build(make, x_shape, layer_names, vocab=vocab, **build_kw),
      x_shape, out_rank=out_rank, coupled=coupled, int_inputs=vocab is not None,
      warning=warning, framework="nnx")
