"""Run a planned blocked kernel: capture every tile once, then contract rounds of
blocks (one per device) and hand each block to the store (memory or ``.npy``).

A round's blocks are written (each with its mirror image in the symmetric
schedule), then committed: made durable and logged, so that an interrupted
``out=`` run resumes from its committed blocks.
"""

from __future__ import annotations

import contextlib
import warnings
from typing import Any

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from ntklayers._progress import progress_bar
from ntklayers._core import OutputSpec, emit_note
from ntklayers._large import _store
from ntklayers._large import _tiles as T
from ntklayers._large._exec import Request, put
from ntklayers._large._independence import InteractingExamplesError
from ntklayers._large._plan import Programs, padded_count


def rounds(todo: list, d: int) -> list[tuple[bool, list]]:
  """Rounds of at most ``d`` pairs, diagonal (symmetric) ones apart from the rest."""
  out = []
  for diagonal in (True, False):
    pairs = [p for dg, p in todo if dg == diagonal]
    out += [(diagonal, pairs[k:k + d]) for k in range(0, len(pairs), d)]
  return out


def regions(kind: str, t1: T.Tiles, t2: T.Tiles):
  """``regions(pair)``: where block ``pair`` goes in the kernel, in write order (the
  block, then its mirror image in the symmetric schedule)."""
  def where(pair: tuple[int, int]) -> list[tuple[slice, ...]]:
    a, b = pair
    out = [T.block_slices(kind, t1, t2, a, b)]
    if kind == T.UPPER and a != b:
      out.append(T.block_slices(kind, t1, t2, b, a))
    return out
  return where


def run(req: Request, progs: Programs, kind: str, spec: OutputSpec, params: Any, x1: Any,
        x2: Any, dynamic: list, store: Any, progress: bool | None) -> None:
  """Computes every block of the schedule that ``store.done`` lacks into ``store``."""
  mesh, d = req.mesh, req.mesh.size
  t1 = T.Tiles(jax.tree.leaves(x1)[0].shape[0], progs.block_size)
  t2 = t1 if x2 is None else T.Tiles(jax.tree.leaves(x2)[0].shape[0], progs.block_size)
  diag, other = T.schedule(kind, t1.count, t2.count)
  todo = [(True, p) for p in diag if p not in store.done] + [
      (False, p) for p in other if p not in store.done]
  if not todo:
    return
  params_g, dyn_g = put(params, mesh, P()), put(dynamic, mesh, P())
  tiles1 = put(t1.stack(x1, padded_count(t1, d)), mesh, P("d"))
  tiles2 = None if x2 is None else put(t2.stack(x2, padded_count(t2, d)), mesh, P("d"))
  peer1 = None if x2 is None else put(_first_tile(x2, t2), mesh, P())
  peer2 = None if x2 is None else put(_first_tile(x1, t1), mesh, P())
  warned: set = set()
  if progs.cached:
    side1 = _capture(progs.capture1, params_g, tiles1, peer1, dyn_g, warned, mesh)
    side2 = None if x2 is None else _capture(progs.capture2, params_g, tiles2, peer2, dyn_g,
                                             warned, mesh)
  else:
    side1 = _replicated(tiles1, mesh)
    side2 = None if tiles2 is None else _replicated(tiles2, mesh)
  gather = isinstance(store, _store.MemoryStore)
  perm = T.mirror_axes(spec)
  where = regions(kind, t1, t2)
  nonfinite = False

  def launch(diagonal: bool, chunk: list):
    pairs = chunk + [chunk[-1]] * (d - len(chunk))  # pad the last round
    i = put(np.array([p[0] for p in pairs], np.int32), mesh, P("d"))
    j = put(np.array([p[1] for p in pairs], np.int32), mesh, P("d"))
    return chunk, progs.rounds[diagonal](params_g, side1, side2, peer1, i, j, dyn_g)

  def finish(chunk: list, res: Any) -> bool:
    blocks, finite = res.value
    _notes(res.notes, warned)
    if not bool(res.ok.all()):
      raise row_check_failed()
    for k, block in _blocks(blocks, gather):
      if k >= len(chunk):
        continue
      a, b = chunk[k]
      block = T.trim(kind, t1, t2, a, b, block)
      places = where((a, b))
      items = [(places[0], block)]
      if len(places) > 1:
        items.append((places[1], np.transpose(block, perm)))
      store.put((a, b), items)
    store.commit()  # the round's bytes durable, then logged
    return not bool(finite.all())

  with _bar(len(todo), progress) as bar:
    for diagonal, chunk in rounds(todo, d):
      nonfinite = finish(*launch(diagonal, chunk)) or nonfinite
      if bar is not None:
        bar.update(len(chunk))
  if nonfinite:
    warnings.warn("ntklayers: the kernel contains NaN or inf values (check the model's "
                  "outputs and parameters).", RuntimeWarning, stacklevel=4)


class RowCheckFailed(InteractingExamplesError):
  """A layer's rows are not its examples (the batch permuted around it, or examples
  that interact): ``ntk_blocked`` retries with each tile captured as one sample."""


def row_check_failed() -> InteractingExamplesError:
  return RowCheckFailed(
      "ntk_blocked: the row check found that the model's examples interact, so the "
      "kernel cannot be computed in blocks; compute it with ntklayers.ntk_fn.")


def _first_tile(x: Any, tiles: T.Tiles) -> Any:
  return jax.tree.map(lambda a: a[0], tiles.stack(x, 1))


def _replicated(tree: Any, mesh: Any) -> Any:
  """A global array gathered onto every device (``jit`` with replicated output)."""
  return jax.jit(lambda t: t, out_shardings=NamedSharding(mesh, P()))(tree)


def _capture(exe: Any, params: Any, tiles: Any, peer: Any, dynamic: list, warned: set,
             mesh: Any) -> Any:
  res = exe(params, tiles, peer, dynamic)
  _notes(res.notes, warned)
  if not bool(res.ok):
    raise row_check_failed()
  return _replicated(res.value[0], mesh) if mesh.size > 1 else res.value[0]


def _notes(notes: tuple, warned: set) -> None:
  for note in notes:
    if note not in warned:
      warned.add(note)
      emit_note(note, stacklevel=7)


def _blocks(value: jax.Array, gather: bool):
  """``(k, block k)`` of a round's result ``[D, ...]`` that this process holds
  (every block when ``gather``: the kernel is kept whole by every process)."""
  if jax.process_count() > 1 and gather:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    value = multihost_utils.process_allgather(value, tiled=True)
  if isinstance(value, np.ndarray) or value.is_fully_addressable:
    host = np.asarray(value)
    yield from enumerate(host)
    return
  for shard in value.addressable_shards:
    start = shard.index[0].start or 0
    for k, block in enumerate(np.asarray(shard.data)):
      yield start + k, block


@contextlib.contextmanager
def _bar(total: int, progress: bool | None):
  """A tqdm bar on process 0: ``None`` on a terminal only, ``True`` always."""
  if jax.process_index() != 0:
    yield None
    return
  with progress_bar(total, "ntk_blocked", progress, unit="block", leave=True) as bar:
    yield bar
