"""neural-tangents' ``batch`` on ``ntklayers.ntk_blocked``.

``batch(kernel_fn, batch_size)`` returns a function with ``kernel_fn``'s
signature that computes the same kernels with ``ntk_blocked``: tiles of
``batch_size`` examples (any batch sizes: the last tile is padded, no
divisibility requirement), upper blocks only when ``x2`` is ``None``, diagonal
blocks only when ``0`` is in ``diagonal_axes`` (so the per-example kernels have
neural-tangents' unbatched shapes), every device used. ``kernel_fn`` must come
from this package (``empirical_ntk_fn``, ``empirical_nngp_fn``,
``empirical_kernel_fn``): ``batch`` needs the model, not a black box.

Keyword arguments: a 2-tuple of arrays is per example (``(kwargs of x1, kwargs
of x2)``, as neural-tangents' ``batch`` slices them) and rides along with the
inputs; ``rng`` is passed unchanged to every block (one function for the whole
kernel; neural-tangents drew a new key per block); anything else is shared.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ntklayers import _large
from ntklayers.compat import _empirical

#: What the functions of ``empirical_*_fn`` carry for ``batch``.
SPEC = "_ntklayers_empirical"


@dataclasses.dataclass(frozen=True)
class Kind:
  """Which empirical function: ``"ntk"``, ``"nngp"`` or ``"kernel"`` (with ``get``)."""

  name: str
  empirical: _empirical.Empirical


def tag(fn: Callable, kind: str, empirical: _empirical.Empirical) -> Callable:
  setattr(fn, SPEC, Kind(kind, empirical))
  return fn


def _parse(kind: str, args: tuple, kwargs: dict) -> tuple[Any, Any, dict]:
  """``(get, params, apply_fn_kwargs)`` from a call's positional and keyword arguments."""
  kwargs = dict(kwargs)
  rest = list(args)
  if kind == "kernel":
    get = rest.pop(0) if rest else kwargs.pop("get", None)
  else:
    get = kind
  if rest:
    params = rest.pop(0)
  elif "params" in kwargs:
    params = kwargs.pop("params")
  else:
    raise TypeError("missing the argument `params`.")
  if rest:
    raise TypeError(f"too many positional arguments: {len(rest)} more.")
  return get, params, kwargs


def batch(kernel_fn: Callable, batch_size: int = 0, device_count: int = -1,
          store_on_device: bool = True) -> Callable:
  """See ``ntklayers.compat.neural_tangents.batch``."""
  spec = getattr(kernel_fn, SPEC, None)
  if not isinstance(spec, Kind):
    raise TypeError(
        "batch: `kernel_fn` must come from ntklayers.compat.neural_tangents "
        "(empirical_ntk_fn, empirical_nngp_fn or empirical_kernel_fn); ntklayers batches "
        "the model's kernel with ntklayers.ntk_blocked, which needs the model itself "
        f"(infinite-width stax kernels are not provided). Got {kernel_fn!r}.")
  if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or (
      batch_size < 0):
    raise ValueError(f"`batch_size` must be a non-negative int, got {batch_size!r}.")
  if isinstance(device_count, bool) or not isinstance(device_count, (int, np.integer)) or (
      device_count < -1):
    raise ValueError(f"`device_count` must be -1, 0 or a positive int, got {device_count!r}.")
  if not isinstance(store_on_device, bool):
    raise TypeError(f"`store_on_device` must be a bool, got {store_on_device!r}.")
  emp = spec.empirical
  block = int(batch_size) or None

  def batched(x1: Any, x2: Any = None, *args: Any, **kwargs: Any) -> Any:
    get, params, apply_fn_kwargs = _parse(spec.name, args, kwargs)
    return blocked(emp, get, x1, x2, params, apply_fn_kwargs, block, store_on_device)

  batched.__doc__ = kernel_fn.__doc__
  return tag(batched, spec.name, emp)


def _per_example(emp: _empirical.Empirical, keys: tuple[str, ...]) -> _empirical.Empirical:
  """``emp`` with the kwargs ``keys`` batched with the inputs too (cached)."""
  if not keys:
    return emp
  cache = emp.__dict__.setdefault("_per_example", {})
  if keys not in cache:
    cache[keys] = _empirical.Empirical(emp.f, emp.trace_axes, emp.diagonal_axes,
                                       emp.implementation,
                                       {**emp.batched, **{k: 0 for k in keys}})
  return cache[keys]


def blocked(emp: _empirical.Empirical, get: Any, x1: Any, x2: Any, params: Any,
            apply_fn_kwargs: dict[str, Any], block: int | None, on_device: bool) -> Any:
  """The kernels of ``emp`` by ``ntk_blocked`` (module docstring)."""
  single, names = _empirical.canonicalize_get(get)
  pairs = tuple(k for k, v in apply_fn_kwargs.items()
                if k != "rng" and isinstance(v, tuple) and len(v) == 2
                and all(hasattr(a, "shape") for a in jax.tree.leaves(v)))
  emp = _per_example(emp, pairs)
  shared = {k: v for k, v in apply_fn_kwargs.items() if k not in pairs}
  side1 = {k: apply_fn_kwargs[k][0] for k in pairs}
  side2 = {k: apply_fn_kwargs[k][1] for k in pairs}
  xe1, _ = emp.fold(x1, {**shared, **side1})
  xe2, _ = emp.fold(x2, {**shared, **side2})
  shared = {k: v for k, v in shared.items() if k not in emp.batched}
  n, treedef = emp.leaves(params, xe1, shared)
  convert = jnp.asarray if on_device else np.asarray
  per_leaf = []
  for i in range(n):
    k = _large.ntk_blocked(emp.leaf_model(i, n), params, xe1, xe2, block_size=block,
                           model_kwargs=shared, trace_axes=emp.trace_axes,
                           diagonal_axes=emp.diagonal_axes,
                           implementation=emp.implementation, get=names)
    values = {g: convert(v) for g, v in zip(names, k)}
    per_leaf.append(values[names[0]] if single else _empirical.empirical_kernel_type(names)(
        *(values[g] for g in names)))
  return jax.tree.unflatten(treedef, per_leaf)
