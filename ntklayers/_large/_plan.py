"""Plan a blocked kernel: pick the block size that fits the memory budget.

For a candidate block size the capture and round programs are compiled (they
are the programs that will run) and their memory read from XLA's analysis;
with the cached factors (sizes from shapes), the inputs and the kernel itself
they make an :class:`~ntklayers._large._budget.Estimate`. Too large a plan shrinks the
block (round temporaries grow as ``b^2``) or stops caching factors; a plan that
cannot fit even so is refused before anything large is allocated.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from ntklayers._large import _budget
from ntklayers._large._exec import (Request, capture_tiles_jit, compiled,
                                     contract_round_jit)
from ntklayers._large._tiles import Tiles, schedule

#: Largest block chosen by default: big enough for efficient matrix products,
#: small enough that the symmetric schedule saves work and memory.
MAX_BLOCK = 1024


@dataclasses.dataclass
class Programs:
  """The compiled programs and the estimate of one block size."""

  block_size: int
  cached: bool
  capture1: Any
  capture2: Any
  rounds: dict  # diagonal (bool) -> compiled round program
  estimate: _budget.Estimate


def _sds(tree: Any, sharding: Any, lead: tuple[int, ...] = ()) -> Any:
  return jax.tree.map(
      lambda a: jax.ShapeDtypeStruct(lead + tuple(np.shape(a)), _dtype(a),
                                     sharding=sharding), tree)


def _dtype(a: Any) -> Any:
  return a.dtype if hasattr(a, "dtype") else np.result_type(a)


def _tiles_sds(x: Any, tiles: Tiles, count: int, sharding: Any) -> Any:
  return jax.tree.map(lambda a: jax.ShapeDtypeStruct(
      (count, tiles.size) + tuple(np.shape(a)[1:]), _dtype(a), sharding=sharding), x)


def _nbytes(tree: Any) -> int:
  return sum(math.prod(a.shape) * np.dtype(a.dtype).itemsize for a in jax.tree.leaves(tree))


def padded_count(tiles: Tiles, devices: int) -> int:
  """Tiles rounded up to a multiple of the device count."""
  return -(-tiles.count // devices) * devices


def build(req: Request, params: Any, x1: Any, x2: Any, dynamic: list, b: int, cached: bool,
          kind: str, output_bytes: int, round_block_bytes: int) -> Programs:
  """Compiles the programs for block size ``b`` and estimates their peak memory."""
  mesh = req.mesh
  d, d_local = mesh.size, len(jax.local_devices())
  split, rep = NamedSharding(mesh, P("d")), NamedSharding(mesh, P())
  n1 = jax.tree.leaves(x1)[0].shape[0]
  t1 = Tiles(n1, b)
  t2 = t1 if x2 is None else Tiles(jax.tree.leaves(x2)[0].shape[0], b)
  s1 = _tiles_sds(x1, t1, padded_count(t1, d), split)
  s2 = None if x2 is None else _tiles_sds(x2, t2, padded_count(t2, d), split)
  peer1 = None if x2 is None else _tiles_sds(x2, t2, 1, rep)
  peer1 = None if peer1 is None else jax.tree.map(
      lambda a: jax.ShapeDtypeStruct(a.shape[1:], a.dtype, sharding=rep), peer1)
  peer2 = None if x2 is None else jax.tree.map(
      lambda a: jax.ShapeDtypeStruct(a.shape[1:], a.dtype, sharding=rep),
      _tiles_sds(x1, t1, 1, rep))
  p = _sds(params, rep)
  dyn = _sds(dynamic, rep)
  inputs = 2 * (_nbytes(s1) + (0 if s2 is None else _nbytes(s2)))
  capture1 = capture2 = None
  capture_temp = factors = 0
  if cached:
    capture1, temp = compiled(capture_tiles_jit, req, (), p, s1, peer1, dyn)
    f1 = jax.eval_shape(capture_tiles_jit, req, p, s1, peer1, dyn).value[0]
    side1, side2 = _sds(f1, rep), None
    capture_temp = temp * d_local
    factors = _nbytes(f1) * (1 + (d_local if d > 1 else 0))
    if s2 is not None:
      capture2, temp = compiled(capture_tiles_jit, req, (), p, s2, peer2, dyn)
      f2 = jax.eval_shape(capture_tiles_jit, req, p, s2, peer2, dyn).value[0]
      side2 = _sds(f2, rep)
      capture_temp = max(capture_temp, temp * d_local)
      factors += _nbytes(f2) * (1 + (d_local if d > 1 else 0))
  else:
    side1 = _sds(s1, rep)
    side2 = None if s2 is None else _sds(s2, rep)
    inputs += (_nbytes(s1) + (0 if s2 is None else _nbytes(s2))) * d_local
  index = jax.ShapeDtypeStruct((d,), np.int32, sharding=split)
  rounds, round_temp = {}, 0
  diag, other = schedule(kind, t1.count, t2.count)
  kinds = ((True,) if diag else ()) + ((False,) if other else ())
  for diagonal in kinds:
    exe, temp = compiled(contract_round_jit, req, (diagonal, cached), p, side1, side2,
                         peer1, index, index, dyn)
    rounds[diagonal] = exe
    round_temp = max(round_temp, temp * d_local)
  round_temp += 2 * d * round_block_bytes  # the round on the host, and a mirrored block
  estimate = _budget.Estimate(b, inputs, factors, output_bytes, capture_temp, round_temp,
                              cached)
  return Programs(b, cached, capture1, capture2, rounds, estimate)


def plan(req: Request, params: Any, x1: Any, x2: Any, dynamic: list, *, block_size: int | None,
         budget: int, kind: str, output_bytes: int, block_bytes: Callable[[int], int],
         out_given: bool) -> Programs:
  """The programs of the largest block size (at most :data:`MAX_BLOCK`, or
  ``block_size`` when given) whose estimated peak fits ``budget``;
  ``block_bytes(b)`` is the size of one block."""
  n = max(jax.tree.leaves(x)[0].shape[0] for x in (x1, x2) if x is not None)
  b = min(n, block_size or MAX_BLOCK)
  cached = True
  best = None
  for _ in range(12):
    progs = build(req, params, x1, x2, dynamic, b, cached, kind, output_bytes,
                  block_bytes(b))
    est = progs.estimate
    if est.total <= budget:
      return progs
    best = est if best is None or est.total < best.total else best
    fixed = est.inputs + est.factors + est.output
    if fixed > budget and cached:
      cached = False  # recompute factors per block instead of keeping them all
      continue
    if block_size is not None or b == 1 or fixed >= budget:
      break
    room = (budget - fixed) / max(est.capture_temp, est.round_temp, 1)
    b = max(1, min(b - 1, int(b * math.sqrt(room) * 0.9)))
  assert best is not None
  raise _budget.refuse(best, budget, out_given)
