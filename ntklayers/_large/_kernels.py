"""``get`` for blocked kernels: the NNGP, or NNGP and NTK, through ``ntk_blocked``.

The NNGP ``f(x1) f(x2)^T`` of ``f`` is the NTK of ``g((s, params), x) = s f(params, x)``
with respect to the scalar ``s`` alone, at ``s = 1``: ``dg/ds = f``. So a blocked
NNGP is a blocked NTK of :class:`Scaled` with ``trainable=(True, False)``, by
Jacobian contraction (the Jacobian with respect to ``s`` is one forward pass per
tile): tiles, rounds, the memory budget, the independence guard, the resumable
``.npy`` store and its fingerprint (``g``'s program, ``(s, params)``, the mask)
are those of every blocked kernel. ``s = 1`` multiplies exactly, so the blocks
equal the in-memory NNGP's up to the order of float sums.

With a tuple ``get`` each kernel is its own blocked run (one ``.npy`` file each
with ``out=``), in ``get``'s order.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from ntklayers import _core

Out = str | os.PathLike | None


class Scaled:
  """``g((s, params), x, **kw) = s * f(params, x, **kw)``, equal (and hashed) by ``f``,
  so that compiled blocked programs are reused across calls with the same ``f``."""

  def __init__(self, f: Callable):
    self.f = f

  def __call__(self, p: tuple[jax.Array, Any], x: Any, **kwargs: Any) -> jax.Array:
    s, params = p
    return s * self.f(params, x, **kwargs)

  def __eq__(self, other: Any) -> bool:
    return isinstance(other, Scaled) and other.f == self.f

  def __hash__(self) -> int:
    return hash((Scaled, self.f))


def nngp_model(f: Callable, params: Any, x1: Any,
               model_kwargs: dict[str, Any] | None) -> tuple[Scaled, tuple, tuple]:
  """``(g, (s, params), trainable)``: the model whose NTK over ``s`` is ``f``'s NNGP
  (``s`` a scalar one of the output dtype)."""
  out = jax.eval_shape(lambda p, x: f(p, x, **(model_kwargs or {})), params, x1)
  dtype = out.dtype if isinstance(out, jax.ShapeDtypeStruct) else jnp.float32
  return Scaled(f), (jnp.ones((), dtype), params), (True, False)


def out_paths(out: Out | Sequence[Out] | Mapping[str, Out], names: tuple[str, ...],
              single: bool) -> dict[str, Out]:
  """One ``out`` per kernel of ``get``: a path for one kernel; for several, a sequence
  in ``get``'s order or a dict by name (``None``: in memory)."""
  if single:
    if not (out is None or isinstance(out, (str, os.PathLike))):
      raise TypeError(f"`out` must be one path (or None) for get={names[0]!r}, got {out!r}.")
    return {names[0]: out}
  if out is None:
    return {g: None for g in names}
  if isinstance(out, Mapping):
    if set(out) != set(names):
      raise ValueError(f"`out` must have one path per kernel of `get`={names}; got keys "
                       f"{sorted(out)}.")
    return {g: out[g] for g in names}
  if isinstance(out, (list, tuple)) and len(out) == len(names):
    paths = dict(zip(names, out))
    given = [os.fspath(p) for p in paths.values() if p is not None]
    if len(set(given)) != len(given):
      raise ValueError(f"`out` names one file for two kernels: {out!r}.")
    return paths
  example = tuple(f"kernel_{g}.npy" for g in names)
  raise TypeError(
      f"`get`={names} computes {len(names)} kernels, one file each: pass `out` as a "
      f"sequence in `get`'s order, e.g. out={example!r}, or a dict by name; got {out!r}.")


def blocked_kernels(run: Callable[..., Any], f: Callable, params: Any, x1: Any,
                    get: str | Sequence[str], out: Any,
                    model_kwargs: dict[str, Any] | None, trainable: Any,
                    implementation: str) -> Any:
  """The kernels ``get`` names, each by ``run(f, params, out, implementation,
  trainable)`` (a blocked run); one array for a string ``get``, else a ``Kernels``
  named tuple in ``get``'s order."""
  single, names = _core.normalize_get(get)
  paths = out_paths(out, names, single)
  values = {}
  for name in names:
    if name == "ntk":
      values[name] = run(f, params, paths[name], implementation, trainable)
    else:
      g, p, mask = nngp_model(f, params, x1, model_kwargs)
      values[name] = run(g, p, paths[name], "jacobian", mask)
  return values[names[0]] if single else _core.kernels_type(names)(
      *(values[g] for g in names))
