"""``ntklayers.equinox.ntk_fn``: the NTK of an ``eqx.Module`` over its inexact arrays."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Hashable
from typing import Any

import equinox as eqx
import jax
import numpy as np

from ntklayers import adapters


@dataclasses.dataclass(frozen=True)
class _Key:
  """The static part of an Equinox model (compared by value: models with equal
  static fields share one compiled kernel).

  Attributes:
    treedef: the pytree structure of ``(model without arrays, state)``.
    leaves: its leaves that are not arrays (functions, Python numbers, strings),
      hashable.
    batched: the model takes the whole batch (``False``: ``jax.vmap`` over it).
    axis_name: the name of the vmapped batch axis (``eqx.nn.BatchNorm``'s).
    stateful: the model is called ``model(x, state) -> (y, state)``.
  """

  treedef: Any
  leaves: tuple
  batched: bool
  axis_name: Hashable | None
  stateful: bool


def _build(key: _Key, rest: Any, kwargs: dict[str, Any]) -> Callable:
  """``f(params, x)``: the model put back together, applied per example under
  ``jax.vmap`` (``key.batched``: to the whole batch), the state's update dropped."""
  others, state = eqx.combine(rest, jax.tree.unflatten(key.treedef, key.leaves))

  def apply(model: Any, x: Any) -> jax.Array:
    if key.stateful:  # a fresh copy: Equinox refuses a state used twice
      return model(x, jax.tree.map(lambda a: a, state), **kwargs)[0]
    return model(x, **kwargs)

  def f(params, x):
    model = eqx.combine(params, others)
    if key.batched:
      return apply(model, x)
    return jax.vmap(lambda xi: apply(model, xi), axis_name=key.axis_name)(x)

  return f


class _TreeMask:
  """A ``trainable`` mask given as an Equinox module of bools (a filter
  specification): modules are callable, so the core would take it for a callable
  mask; this callable returns it. Hashed by value (a static option)."""

  def __init__(self, tree: Any):
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    bad = [(p, v) for p, v in leaves if not isinstance(v, (bool, np.bool_))]
    if bad:
      path, value = bad[0]
      raise TypeError(
          f"`trainable` values must be Python bools; got {value!r} "
          f"({type(value).__name__}) at `trainable{jax.tree_util.keystr(path)}`.")
    self.tree = tree
    self._key = (jax.tree.structure(tree), tuple(v for _, v in leaves))

  def __call__(self, params: Any) -> Any:
    del params
    return self.tree

  def __hash__(self) -> int:
    return hash(self._key)

  def __eq__(self, other: Any) -> bool:
    return isinstance(other, _TreeMask) and self._key == other._key


def _splitter(batched: bool, axis_name: Hashable | None) -> Callable:
  def split(model: Any) -> tuple[_Key, Any, Any]:
    """``model`` or ``(model, state)`` -> (static key, inexact arrays, other arrays)."""
    stateful = (isinstance(model, tuple) and len(model) == 2
                and isinstance(model[1], eqx.nn.State))
    module, state = model if stateful else (model, None)
    if not isinstance(module, eqx.Module):
      raise TypeError(
          f"`model` must be an equinox Module, or (model, state) as returned by "
          f"eqx.nn.make_with_state; got {type(model).__name__}.")
    params, others = eqx.partition(module, eqx.is_inexact_array)
    arrays, statics = eqx.partition((others, state), eqx.is_array)
    with_path, treedef = jax.tree_util.tree_flatten_with_path(statics)
    for path, leaf in with_path:
      try:
        hash(leaf)
      except TypeError as e:
        where = jax.tree_util.keystr(path[1:])
        raise TypeError(
            f"The {'model' if path[0].idx == 0 else 'state'} field at {where} holds a "
            f"{type(leaf).__name__}, which is neither an array nor hashable: the "
            f"non-array fields of an Equinox model are static (part of the "
            f"compilation cache key), as with eqx.filter_jit. Store a hashable value "
            f"(or a pytree of them) instead.") from e
    key = _Key(treedef, tuple(leaf for _, leaf in with_path), batched, axis_name, stateful)
    return key, params, arrays

  return split


def ntk_fn(*, batched: bool = False, axis_name: Hashable | None = None, **options: Any):
  """Returns ``kernel_fn(model, x1, x2=None, **model_kwargs)`` for Equinox models.

  The kernel differentiates the inexact-array leaves of ``model`` (the first half
  of ``eqx.partition(model, eqx.is_inexact_array)``); its other leaves (integer
  arrays, functions, Python numbers and bools such as a dropout rate) are held
  fixed: arrays are traced, the rest is static (hashable, part of the compilation
  cache key, as with ``eqx.filter_jit``).

  Equinox models are written per example, so by default the model is applied as
  ``jax.vmap(lambda xi: model(xi, **model_kwargs))(x)``: ``x1 [N1, ...]`` and
  ``x2 [N2, ...]`` are batches of what ``model`` takes. ``model_kwargs`` (e.g.
  ``key=`` for dropout, ``inference=True``) are the same for every example: array
  leaves (PRNG keys too) are traced, other leaves static and hashable. With a key,
  the kernel is that of the deterministic function for that key (the same dropout
  mask for every example). For a model that takes the whole batch (its own
  ``vmap`` inside, or per-example keyword arrays), pass ``batched=True``.

  A stateful model (``eqx.nn.BatchNorm``, ``eqx.nn.make_with_state``) is passed
  as ``(model, state)``; it is called ``model(xi, state, **model_kwargs)`` and
  must return ``(y, new_state)``; the state is held fixed and its update dropped.
  A BatchNorm in training mode needs ``axis_name`` (the name it was built with),
  the name of the vmapped batch axis: its batch statistics couple the examples,
  which the kernel detects.

  Args:
    batched: ``model(x, **model_kwargs)`` takes the whole batch (no ``vmap``).
    axis_name: ``jax.vmap``'s ``axis_name`` for the batch axis.
    **options: the options of :func:`ntklayers.ntk_fn` (``trace_axes``,
      ``diagonal_axes``, ``implementation``, ``layerwise``, ``trainable``,
      ``independent_samples``, ``precision``), with the same output layout
      (``[N1, N2, O, O]`` for per-example outputs ``[O]``); ``layerwise`` names
      are the modules' attribute paths (``"layers/0"`` for ``eqx.nn.MLP``), and
      ``trainable`` masks are trees of bools like the model
      (``jax.tree.map(lambda _: True, model)``, Equinox's filter
      specifications), like its filtered parameters, a prefix of either, or a
      callable of the parameters.

  Example:
    >>> import equinox as eqx, jax, jax.numpy as jnp, ntklayers.equinox
    >>> mlp = eqx.nn.MLP(3, 2, width_size=8, depth=2, key=jax.random.key(0))
    >>> kernel_fn = ntklayers.equinox.ntk_fn()
    >>> kernel_fn(mlp, jnp.ones((4, 3))).shape
    (4, 4, 2, 2)
    >>> sorted(ntklayers.equinox.ntk_fn(layerwise=True)(mlp, jnp.ones((4, 3))))
    ['layers/0', 'layers/1', 'layers/2']
  """
  if not isinstance(batched, bool):
    raise TypeError(f"`batched` must be a bool, got {batched!r}.")
  try:
    hash(axis_name)
  except TypeError as e:
    raise TypeError(f"`axis_name` must be hashable, got {axis_name!r}.") from e
  if batched and axis_name is not None:
    raise ValueError("`axis_name` names the vmapped batch axis: it needs batched=False.")
  if isinstance(options.get("trainable"), eqx.Module):
    options["trainable"] = _TreeMask(options["trainable"])
  return adapters.make_kernel_fn(
      _build, _splitter(batched, axis_name), adapters.Options.create(**options),
      "kernel_fn(model, x1, x2=None, **model_kwargs) -> NTK; see "
      "ntklayers.equinox.ntk_fn.")


def inspect(model: Any, x1: Any, x2: Any = None, *, batched: bool = False,
            axis_name: Hashable | None = None, **options: Any):
  """:func:`ntklayers.inspect` for an Equinox model: the route of each group of
  its inexact arrays in ``ntk_fn(**options)(model, x1, x2)``, nothing computed.

  Example:
    >>> import equinox as eqx, jax, jax.numpy as jnp, ntklayers.equinox
    >>> mlp = eqx.nn.MLP(3, 2, width_size=8, depth=1, key=jax.random.key(0))
    >>> info = ntklayers.equinox.inspect(mlp, jnp.ones((4, 3)))
    >>> {g.route for g in info.groups}
    {'structured (recognized)'}
  """
  return ntk_fn(batched=batched, axis_name=axis_name, **options).inspect(model, x1, x2)
