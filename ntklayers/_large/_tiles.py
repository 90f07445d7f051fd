"""Tiles of a batch and the schedule of kernel blocks over them.

A batch of ``N`` examples is cut into ``ceil(N / b)`` tiles of ``b`` examples;
the last one is padded by repeating its last example (the padded rows are
computed and dropped, so every tile has one shape and one compiled program).
A kernel block ``(i, j)`` is ``Theta(tile_i of x1, tile_j of x2)``:

- ``"full"``: every ``(i, j)`` (``x2`` given);
- ``"upper"``: ``j >= i`` only (``x2 = x1``); block ``(j, i)`` is the mirror
  image of ``(i, j)`` (:func:`mirror_axes`);
- ``"diagonal"``: ``(i, i)`` only (per-example kernels, ``0`` in
  ``diagonal_axes``), ``O(N)`` work and memory.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import numpy as np

from ntklayers._core import OutputSpec

FULL, UPPER, DIAGONAL = "full", "upper", "diagonal"


@dataclasses.dataclass(frozen=True)
class Tiles:
  """``count`` tiles of ``size`` examples over a batch of ``n``."""

  n: int
  size: int

  @property
  def count(self) -> int:
    return -(-self.n // self.size)

  def span(self, i: int) -> tuple[int, int]:
    """The rows ``[lo, hi)`` of tile ``i`` that are real examples."""
    lo = i * self.size
    return lo, min(lo + self.size, self.n)

  def stack(self, x: Any, count: int | None = None) -> Any:
    """``x`` (leaves ``[n, ...]``, NumPy) as ``[count, size, ...]`` tiles, the
    last tile (and any extra tiles up to ``count``) padded with the last example."""
    count = self.count if count is None else count
    rows = np.minimum(np.arange(count * self.size), self.n - 1)

    def tile(a):
      a = np.asarray(a)
      return a[rows].reshape((count, self.size) + a.shape[1:])

    return jax.tree.map(tile, x)


def schedule(kind: str, count1: int, count2: int) -> tuple[list, list]:
  """``(diagonal_pairs, other_pairs)`` of tile indices to compute.

  Diagonal pairs ``(i, i)`` of ``"upper"`` and ``"diagonal"`` schedules use the
  symmetric product (one capture contracted with itself).
  """
  if kind == DIAGONAL:
    return [(i, i) for i in range(count1)], []
  if kind == UPPER:
    return ([(i, i) for i in range(count1)],
            [(i, j) for i in range(count1) for j in range(i + 1, count1)])
  return [], [(i, j) for i in range(count1) for j in range(count2)]


def mirror_axes(spec: OutputSpec) -> tuple[int, ...]:
  """The permutation taking block ``(i, j)`` of a kernel to block ``(j, i)``.

  In the layout ``(N1, N2, A1, A2, ..., D, ...)`` every paired axis swaps
  with its partner; diagonal axes (one entry) stay.
  """
  perm: list[int] = []
  pos = 0
  for axis in range(spec.ndim):
    if axis in spec.trace_axes:
      continue
    if axis in spec.diagonal_axes:
      perm.append(pos)
      pos += 1
    else:
      perm.extend([pos + 1, pos])
      pos += 2
  return tuple(perm)


def block_slices(kind: str, t1: Tiles, t2: Tiles, i: int, j: int) -> tuple[slice, ...]:
  """Where block ``(i, j)`` (its real rows) goes in the kernel."""
  lo1, hi1 = t1.span(i)
  if kind == DIAGONAL:
    return (slice(lo1, hi1),)
  lo2, hi2 = t2.span(j)
  return slice(lo1, hi1), slice(lo2, hi2)


def trim(kind: str, t1: Tiles, t2: Tiles, i: int, j: int, block: np.ndarray) -> np.ndarray:
  """Block ``(i, j)`` without the rows of padded examples."""
  lo1, hi1 = t1.span(i)
  if kind == DIAGONAL:
    return block[:hi1 - lo1]
  lo2, hi2 = t2.span(j)
  return block[:hi1 - lo1, :hi2 - lo2]


def kernel_bytes(shape: tuple[int, ...], itemsize: int) -> int:
  return math.prod(shape) * itemsize
