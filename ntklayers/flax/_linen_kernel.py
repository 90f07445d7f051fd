"""``ntklayers.flax.ntk_fn`` for linen modules: differentiate ``params`` only."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax

from ntklayers import _api, _checks


def _is_array(value: Any) -> bool:
  return isinstance(value, jax.Array) or hasattr(value, "__array__")


class _Static:
  """The hashable, non-array part of ``apply_kwargs`` (a static jit argument).

  ``treedef`` is the pytree structure of the kwargs; ``values`` holds, per leaf,
  ``None`` where the leaf is an array (traced) and the leaf itself otherwise.
  """

  __slots__ = ("treedef", "is_array", "values", "_hash")

  def __init__(self, treedef, is_array: tuple[bool, ...], values: tuple[Any, ...]):
    self.treedef, self.is_array, self.values = treedef, is_array, values
    self._hash = hash((treedef, is_array, values))

  def __hash__(self) -> int:
    return self._hash

  def __eq__(self, other: Any) -> bool:
    return (isinstance(other, _Static) and self.treedef == other.treedef
            and self.is_array == other.is_array and self.values == other.values)

  def merge(self, arrays: Sequence[Any]) -> dict[str, Any]:
    """The kwargs, with the (traced) ``arrays`` put back in their places."""
    it = iter(arrays)
    leaves = [next(it) if a else v for a, v in zip(self.is_array, self.values)]
    return jax.tree.unflatten(self.treedef, leaves)


def _split_kwargs(kwargs: Mapping[str, Any]) -> tuple[list[Any], _Static]:
  """Splits ``apply_kwargs`` into traced array leaves and a hashable static rest.

  Array leaves anywhere in the kwargs (nested dicts, lists, tuples; PRNG keys,
  old-style ``uint32`` or new-style ``jax.random.key``) are traced, so new values
  of the same shapes do not recompile; the other leaves (``train=True``,
  strings, ``None``...) are static and must be hashable.
  """
  with_path, treedef = jax.tree_util.tree_flatten_with_path(dict(kwargs))
  is_array = tuple(_is_array(leaf) for _, leaf in with_path)
  arrays = [leaf for (_, leaf), a in zip(with_path, is_array) if a]
  values = []
  for (path, leaf), a in zip(with_path, is_array):
    if not a:
      try:
        hash(leaf)
      except TypeError as e:
        name = path[0].key if path and hasattr(path[0], "key") else "?"
        where = jax.tree_util.keystr(path[1:])
        raise TypeError(
            f"apply kwarg {name!r}{f' (at {where})' if where else ''} holds a "
            f"{type(leaf).__name__}, which is neither an array (traced) nor hashable "
            f"(static, part of the compilation cache key). Pass arrays, or hashable "
            f"values such as bools, numbers, strings and tuples.") from e
    values.append(None if a else leaf)
  return arrays, _Static(treedef, is_array, tuple(values))


def ntk_fn(module: nn.Module, *, method: str | Callable | None = None,
           mutable: bool | str | Sequence[str] = False,
           trace_axes: int | Sequence[int] = (), diagonal_axes: int | Sequence[int] = (),
           implementation: str = "auto", layerwise: bool = False, trainable: Any = None,
           independent_samples: bool | None = None):
  """Returns ``kernel_fn(variables, x1, x2=None, **apply_kwargs)`` for a linen module.

  Only ``variables["params"]`` is differentiated; every other collection
  (``batch_stats``, ...) is held fixed. ``apply_kwargs`` are passed to
  ``module.apply`` (e.g. ``train=False`` for eval mode, a mask array, or
  ``rngs={"dropout": key}``): array leaves anywhere in them (nested dicts, lists,
  tuples, PRNG keys) are traced, so new values of the same shapes reuse the
  compiled kernel; the other leaves are static and must be hashable. With
  ``rngs``, the kernel is that of the deterministic function of ``params`` for
  those keys (e.g. one fixed dropout mask). Models that update collections need
  ``mutable=[...]`` and their updates are dropped.
  Options and output layout are those of :func:`ntklayers.ntk_fn`; ``layerwise``
  names are linen module paths (``"Dense_0"``, ``"Block_0/Conv_1"``) and
  ``trainable`` masks are trees like ``variables["params"]``.

  Example:
    >>> import jax, jax.numpy as jnp, flax.linen as nn, ntklayers.flax
    >>> from ntklayers.flax import linen as ntk_nn
    >>> class MLP(nn.Module):
    ...   @nn.compact
    ...   def __call__(self, x):
    ...     return ntk_nn.Dense(2)(nn.relu(ntk_nn.Dense(8)(x)))
    >>> variables = MLP().init(jax.random.key(0), jnp.ones((1, 3)))
    >>> kernel_fn = ntklayers.flax.ntk_fn(MLP())
    >>> kernel_fn(variables, jnp.ones((4, 3))).shape
    (4, 4, 2, 2)
  """
  if not isinstance(module, nn.Module):
    raise TypeError(f"`module` must be a flax.linen Module, got {type(module).__name__}.")
  options = _api.check_options(trace_axes=trace_axes, diagonal_axes=diagonal_axes,
                               implementation=implementation, layerwise=layerwise,
                               trainable=trainable, independent_samples=independent_samples)

  def body(params, rest, x1, x2, dynamic, static):
    apply_kwargs = static.merge(dynamic)

    def f(p, x):
      out = module.apply({"params": p, **rest}, x, method=method, mutable=mutable,
                         **apply_kwargs)
      return out[0] if mutable else out
    f.__ntk_owner__ = module  # warnings are de-duplicated per module, not per trace
    return _api.kernel(f, params, x1, x2, **options)

  jitted = jax.jit(body, static_argnums=(5,))

  def kernel_fn(variables: Mapping[str, Any], x1: Any, x2: Any = None, **apply_kwargs):
    if not isinstance(variables, Mapping) or "params" not in variables:
      raise ValueError(
          f"`variables` must be a mapping with a 'params' collection (as returned "
          f"by module.init); got "
          f"{list(variables) if isinstance(variables, Mapping) else type(variables).__name__}.")
    _checks.check_pair(x1, x2)
    rest = {k: v for k, v in variables.items() if k != "params"}
    dynamic, static = _split_kwargs(apply_kwargs)
    return _api.checked(*jitted(variables["params"], rest, x1, x2, dynamic, static))

  return kernel_fn
