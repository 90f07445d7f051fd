"""``ntk_blocked`` and ``ntk_trace``: large kernels in blocks, within a memory
budget, out of core and resumable, over every device and process, with progress."""

from __future__ import annotations

import contextlib
import hashlib
import os
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from ntklayers import _core
from ntklayers._core import OutputSpec, Options, emit_note, resolve_trainable, split_kwargs
from ntklayers._large import _budget
from ntklayers._large import _store
from ntklayers._large import _tiles as T
from ntklayers._large._exec import (InteractingExamplesError, Request, make_mesh, put,
                                     rows_proven)
from ntklayers._large._independence import check_tiling
from ntklayers._large._plan import Programs, padded_count, plan


def ntk_blocked(f: Callable[[Any, Any], jax.Array], params: Any, x1: Any, x2: Any = None, *,
                block_size: int | None = None,
                max_memory: int | float | str | None = None,
                out: str | os.PathLike | None = None,
                progress: bool | None = None,
                model_kwargs: dict[str, Any] | None = None,
                trace_axes: int | Sequence[int] = (),
                diagonal_axes: int | Sequence[int] = (),
                implementation: str = "auto",
                trainable: Any = None,
                independent_samples: bool | None = None,
                precision: str = "highest") -> np.ndarray:
  """The NTK of ``ntk_fn(f, ...)(params, x1, x2)``, computed block by block.

  The batches are cut into tiles of ``block_size`` examples; every tile's
  factors are captured once and each block ``Theta(tile_i, tile_j)`` is
  contracted from them. With ``x2=None`` only blocks ``j >= i`` are computed
  (the rest are their mirror images, the diagonal ones use the symmetric
  product); with ``0`` in ``diagonal_axes`` only the diagonal blocks, so time
  and memory are linear in ``N``. Blocks are spread over every device (and every
  process, under ``jax.distributed``) with ``shard_map``. Equal to the unblocked
  kernel up to float rounding.

  Args:
    f: ``f(params, x) -> [N, ...]`` as for :func:`ntklayers.ntk_fn`.
    params: parameters of ``f``.
    x1: first batch ``[N1, ...]`` (array or pytree of arrays).
    x2: second batch ``[N2, ...]``; ``None`` for ``x1``.
    block_size: examples per tile; ``None`` picks the largest (up to 1024)
      whose estimated peak memory fits ``max_memory``.
    max_memory: memory budget in bytes or as ``"2GiB"``; default half the
      available host memory (device memory on accelerators). The peak is
      estimated before running (inputs, cached factors, the kernel, compiled
      temporaries); a request that cannot fit raises ``MemoryBudgetError``.
    out: path of a ``.npy`` file to write the kernel to, block by block; an
      interrupted run resumes from its finished blocks (a different request is
      refused). ``None`` keeps the kernel in memory.
    progress: a tqdm bar over blocks: ``None`` shows it on a terminal, ``True``
      always, ``False`` never.
    model_kwargs: keyword arguments of ``f`` (``f(params, x, **model_kwargs)``).
    trace_axes, diagonal_axes, implementation, trainable, independent_samples,
      precision: as for :func:`ntklayers.ntk_fn` (``layerwise`` is not offered).

  Returns:
    A NumPy array of the kernel's shape (``[N1, N2, O, O]`` for outputs ``[N, O]``
    and default axes), or with ``out`` the file opened read-only memory-mapped.

  Raises:
    MemoryBudgetError: the request cannot fit ``max_memory``.
    ValueError: the examples interact (BatchNorm in training), so the kernel
      cannot be cut into blocks; or ``out`` holds a different request.

  Example:
    >>> import haiku as hk, jax, jax.numpy as jnp, numpy as np, ntklayers
    >>> net = hk.without_apply_rng(hk.transform(lambda x: ntklayers.Linear(2)(x)))
    >>> x = jax.random.normal(jax.random.key(0), (10, 3))
    >>> params = net.init(jax.random.key(1), x)
    >>> K = ntklayers.ntk_blocked(net.apply, params, x, block_size=4)
    >>> K.shape, bool(np.allclose(K, ntklayers.ntk(net.apply, params, x), atol=1e-5))
    ((10, 10, 2, 2), True)
  """
  f = _core.check_f(f)
  options = Options.create(trace_axes=trace_axes, diagonal_axes=diagonal_axes,
                           implementation=implementation, trainable=trainable,
                           independent_samples=independent_samples, precision=precision)
  if block_size is not None and (isinstance(block_size, bool) or not isinstance(
      block_size, (int, np.integer)) or block_size < 1):
    raise ValueError(f"`block_size` must be a positive int or None, got {block_size!r}.")
  _core.check_pair(x1, x2)
  _core.check_params(params)
  n1 = _core.check_batch(x1, "x1")
  n2 = n1 if x2 is None else _core.check_batch(x2, "x2")
  if model_kwargs is not None and not isinstance(model_kwargs, dict):
    raise TypeError(f"`model_kwargs` must be a dict, got {type(model_kwargs).__name__}.")
  dynamic, static = split_kwargs(model_kwargs or {})
  mesh = make_mesh()
  req = Request(f, options, static, mesh, x2 is None)
  x1 = jax.tree.map(np.asarray, x1)
  x2 = None if x2 is None else jax.tree.map(np.asarray, x2)

  first = jax.tree.map(lambda a: a[:1], x1)
  out_aval = jax.eval_shape(lambda p, x, d: req.model(d)(p, x), params, first, dynamic)
  if not isinstance(out_aval, jax.ShapeDtypeStruct) or not out_aval.shape:
    raise TypeError(f"`f` must return one array [N, ...], got {out_aval}.")
  rest = tuple(out_aval.shape[1:])
  spec = OutputSpec.create((n1, *rest), (n2, *rest), options.trace_axes,
                           options.diagonal_axes, options.precision)
  kind = T.DIAGONAL if options.diagonal_batch else (T.UPPER if x2 is None else T.FULL)
  dtype = np.dtype(out_aval.dtype)
  shape = spec.kernel_shape
  inner = T.kernel_bytes(shape[1 if kind == T.DIAGONAL else 2:], dtype.itemsize)

  def block_bytes(b: int) -> int:
    return inner * (b if kind == T.DIAGONAL else b * b)

  path = None if out is None else os.fspath(out)
  recorded = None if path is None else _store.read_request(path)
  if block_size is None and recorded is not None:
    block_size = int(recorded["block_size"])
  budget = (_budget.default_budget(jax.devices()[0]) if max_memory is None else
            _budget.parse_memory(max_memory))
  output_bytes = 0 if path is not None else T.kernel_bytes(shape, dtype.itemsize)
  progs = plan(req, params, x1, x2, dynamic, block_size=block_size, budget=budget,
               kind=kind, output_bytes=output_bytes, block_bytes=block_bytes,
               out_given=path is not None)

  if options.independent_samples is not True:
    _check_independent(req, params, x1, x2, dynamic, progs.block_size)

  request = {
      "block_size": progs.block_size,
      "params": _store.digest(params),
      "inputs": _store.digest(x1, x2),
      "model_kwargs": _store.digest(dynamic, repr(static.values)),
      "options": repr((options.trace_axes, options.diagonal_axes, options.implementation,
                       options.independent_samples, options.precision,
                       _mask_key(options, params))),
      "model": _model_digest(req, params, first, dynamic),
  }
  if path is None:
    store: Any = _store.MemoryStore(shape, dtype)
  else:
    store = _store.NpyStore(path, shape, dtype, request, jax.process_index())
    if jax.process_index() == 0:
      store.create_or_check()
    _barrier("ntk_blocked: file created")
    if jax.process_index() != 0:
      recorded = _store.read_request(path)
      store.check(recorded or {})
    store.open()
    _barrier("ntk_blocked: progress read")
  try:
    _run(req, progs, kind, spec, params, x1, x2, dynamic, store, progress)
  finally:
    if path is not None:
      store.close()
  _barrier("ntk_blocked: done")
  return store.result()


def _check_independent(req: Request, params: Any, x1: Any, x2: Any, dynamic: list,
                       b: int) -> None:
  """Refuses tiles unless examples are proven (statically) or checked (two tilings
  agree on ``J^T u``) not to interact."""
  for x in (x1,) if x2 is None else (x1, x2):
    n = jax.tree.leaves(x)[0].shape[0]
    if n <= b:
      continue
    tile = jax.tree.map(lambda a: a[:b], x)
    if rows_proven(req, params, (tile,), dynamic):
      continue
    if not check_tiling(req.model(dynamic), params, x, b):
      raise InteractingExamplesError(
          f"ntk_blocked: the model's examples interact (its parameter Jacobian on a "
          f"tile of {b} examples differs from that on a tile of {b + 1}: e.g. a batch "
          f"mean, a roll over the batch, or batch-size dependence), so the kernel "
          f"cannot be cut into blocks; compute it with ntklayers.ntk_fn.")


def _model_digest(req: Request, params: Any, x: Any, dynamic: list) -> str:
  """A digest of the model's program (its jaxpr on one example)."""
  jaxpr = jax.make_jaxpr(lambda p, z, d: req.model(d)(p, z))(params, x, dynamic)
  return hashlib.sha256(str(jaxpr).encode()).hexdigest()[:32]


def _mask_key(options: Options, params: Any) -> tuple:
  return tuple(resolve_trainable(options.mask, params))


def _barrier(name: str) -> None:
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    multihost_utils.sync_global_devices(name)


def _rounds(todo: list, d: int) -> list[tuple[bool, list]]:
  """Rounds of at most ``d`` pairs, diagonal (symmetric) ones apart from the rest."""
  rounds = []
  for diagonal in (True, False):
    pairs = [p for dg, p in todo if dg == diagonal]
    rounds += [(diagonal, pairs[k:k + d]) for k in range(0, len(pairs), d)]
  return rounds


def _run(req: Request, progs: Programs, kind: str, spec: OutputSpec, params: Any, x1: Any,
         x2: Any, dynamic: list, store: Any, progress: bool | None) -> None:
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
  nonfinite = False

  def launch(diagonal: bool, chunk: list):
    pairs = chunk + [chunk[-1]] * (d - len(chunk))  # pad the last round
    i = put(np.array([p[0] for p in pairs], np.int32), mesh, P("d"))
    j = put(np.array([p[1] for p in pairs], np.int32), mesh, P("d"))
    return diagonal, chunk, progs.rounds[diagonal](params_g, side1, side2, peer1, i, j, dyn_g)

  def finish(diagonal: bool, chunk: list, res: Any) -> bool:
    blocks, finite = res.value
    _notes(res.notes, warned)
    if not bool(res.ok.all()):
      raise _row_check_failed()
    for k, block in _blocks(blocks, gather):
      if k >= len(chunk):
        continue
      a, b = chunk[k]
      block = T.trim(kind, t1, t2, a, b, block)
      store.write(T.block_slices(kind, t1, t2, a, b), block)
      if kind == T.UPPER and not diagonal:
        store.write(T.block_slices(kind, t1, t2, b, a), np.transpose(block, perm))
      store.finish((a, b))
    return not bool(finite.all())

  with _bar(len(todo), progress) as bar:
    for diagonal, chunk in _rounds(todo, d):
      nonfinite = finish(*launch(diagonal, chunk)) or nonfinite
      if bar is not None:
        bar.update(len(chunk))
  if nonfinite:
    warnings.warn("ntklayers: the kernel contains NaN or inf values (check the model's "
                  "outputs and parameters).", RuntimeWarning, stacklevel=3)


def _row_check_failed() -> InteractingExamplesError:
  return InteractingExamplesError(
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
    raise _row_check_failed()
  return _replicated(res.value[0], mesh) if mesh.size > 1 else res.value[0]


def _notes(notes: tuple, warned: set) -> None:
  for note in notes:
    if note not in warned:
      warned.add(note)
      emit_note(note, stacklevel=5)


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
  if progress is False or jax.process_index() != 0:
    yield None
    return
  try:
    from tqdm.auto import tqdm  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    if progress:
      raise ImportError("`progress=True` needs tqdm: `pip install tqdm`.") from e
    yield None
    return
  bar = tqdm(total=total, desc="ntk_blocked", unit="block",
             disable=None if progress is None else False)
  try:
    yield bar
  finally:
    bar.close()


def ntk_trace(f: Callable[[Any, Any], jax.Array], params: Any, x: Any, *,
              block_size: int | None = None, max_memory: int | float | str | None = None,
              progress: bool | None = None, model_kwargs: dict[str, Any] | None = None,
              implementation: str = "auto", trainable: Any = None,
              independent_samples: bool | None = None,
              precision: str = "highest") -> float:
  """The trace of the NTK flattened to ``[N*O, N*O]``, without forming it.

  Equals ``ntklayers.metrics.trace(ntk_fn(f)(params, x))``: the sum over
  examples and outputs of ``Theta(x_n, x_n)[o, o]``. Computed from per-example
  diagonals in blocks (:func:`ntk_blocked` with every axis diagonal), so time
  and memory are linear in ``N``.

  Args:
    f, params, x: the model, its parameters and a batch ``[N, ...]``.
    block_size, max_memory, progress, model_kwargs, implementation, trainable,
      independent_samples, precision: as for :func:`ntk_blocked`.

  Returns:
    The trace, a Python float (accumulated in float64).

  Example:
    >>> import haiku as hk, jax, ntklayers
    >>> net = hk.without_apply_rng(hk.transform(lambda x: ntklayers.Linear(2)(x)))
    >>> x = jax.random.normal(jax.random.key(0), (10, 3))
    >>> params = net.init(jax.random.key(1), x)
    >>> t = ntklayers.ntk_trace(net.apply, params, x, block_size=4)
    >>> K = ntklayers.ntk(net.apply, params, x)
    >>> round(t / float(ntklayers.metrics.trace(K)), 5)
    1.0
  """
  first = jax.tree.map(lambda a: np.asarray(a)[:1], x)
  out = jax.eval_shape(lambda p, z: f(p, z, **(model_kwargs or {})), params, first)
  ndim = len(getattr(out, "shape", ()))
  diag = ntk_blocked(f, params, x, block_size=block_size, max_memory=max_memory,
                     progress=progress, model_kwargs=model_kwargs,
                     diagonal_axes=tuple(range(max(ndim, 1))),
                     implementation=implementation, trainable=trainable,
                     independent_samples=independent_samples, precision=precision)
  return float(np.sum(diag, dtype=np.float64))
