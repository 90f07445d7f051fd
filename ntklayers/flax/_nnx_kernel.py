"""``ntklayers.flax.nnx.ntk_fn``: the NTK over the ``nnx.Param`` state of a model."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
from flax import nnx

from ntklayers import _jax_compat, adapters
from ntklayers.flax._nnx_layers import MODULE_PATHS


def _iter_modules(model: nnx.Module):
  for path, module in _jax_compat.nnx_iter_modules(model):
    yield "/".join(str(p) for p in path), module


def _paths(model: nnx.Module) -> dict[int, str]:
  return {id(m): path or type(m).__name__ for path, m in _iter_modules(model)}


def _declare_batch_coupling(model: nnx.Module) -> None:
  for path, m in _iter_modules(model):
    if isinstance(m, nnx.BatchNorm) and m.use_running_average is not True:
      adapters.declare_coupled(path)


def ntk_fn(*, trace_axes: int | Sequence[int] = (), diagonal_axes: int | Sequence[int] = (),
           implementation: str = "auto", layerwise: bool = False, trainable: Any = None,
           independent_samples: bool | None = None, precision: str = "highest"):
  """Returns ``kernel_fn(model, x1, x2=None, **model_kwargs)`` for ``flax.nnx`` models.

  ``model`` is an ``nnx.Module``, or ``(graphdef, params, *other_states)`` from
  ``nnx.split(model, nnx.Param, ...)``; ``model_kwargs`` are passed to
  ``model(x, **model_kwargs)`` (array leaves traced, other leaves static and
  hashable), as with the Haiku and linen entry points. Only ``nnx.Param`` state is
  differentiated; ``BatchStat`` and other state is held fixed (a BatchNorm with
  ``use_running_average=False``, i.e. after ``model.train()``, is detected as
  making samples interact). Options and output layout are those of
  :func:`ntklayers.ntk_fn`; ``layerwise`` names are attribute paths
  (``"layers/0"``) and ``trainable`` masks are trees like the ``nnx.Param`` state.

  Example:
    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> from ntklayers.flax import nnx as ntk_nnx
    >>> model = ntk_nnx.Linear(3, 2, rngs=nnx.Rngs(0))
    >>> ntk_nnx.ntk_fn()(model, jnp.ones((4, 3))).shape
    (4, 4, 2, 2)
  """
  options = adapters.Options.create(
      trace_axes=trace_axes, diagonal_axes=diagonal_axes, implementation=implementation,
      layerwise=layerwise, trainable=trainable, independent_samples=independent_samples,
      precision=precision)

  def body(graphdef, static, params, rest, x1, x2, dynamic):
    kwargs = static.merge(dynamic)

    def f(p, x):
      # Fresh Variables, created at the current trace level (NNX checks it).
      p, states = jax.tree.map(lambda a: a, (p, rest))
      model = nnx.merge(graphdef, p, *states)
      _declare_batch_coupling(model)
      token = MODULE_PATHS.set(_paths(model))
      try:
        return model(x, **kwargs)
      finally:
        MODULE_PATHS.reset(token)
    return adapters.kernel(f, params, x1, x2, options)

  jitted = jax.jit(body, static_argnums=(0, 1))
  warned: set = set()  # fallback warnings are per kernel function

  def kernel_fn(model: Any, x1: Any, x2: Any = None, **model_kwargs: Any):
    if isinstance(model, nnx.Module):
      graphdef, params, *rest = nnx.split(model, nnx.Param, ...)
    elif isinstance(model, tuple) and len(model) >= 2:
      graphdef, params, *rest = model
    else:
      raise TypeError(
          f"`model` must be an nnx.Module or (graphdef, params, *states) from "
          f"nnx.split; got {type(model).__name__}.")
    adapters.check_pair(x1, x2)
    dynamic, static = adapters.split_kwargs(model_kwargs)
    return adapters.checked(jitted(graphdef, static, params, tuple(rest), x1, x2, dynamic),
                            warned)

  return kernel_fn
