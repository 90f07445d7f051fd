"""``ntk_blocked`` and ``ntk_trace``: large kernels in blocks, within a memory
budget, out of core and resumable, over every device and process, with progress.

The model is traced once, on the whole batch (``jax.make_jaxpr``): the jaxpr gives
the output shape and, with ``out=``, the model's part of the resume fingerprint
(``_fingerprint``); the compiled tile programs then check that every tile's
output has the same shape but the batch axis.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np

from ntklayers import _core
from ntklayers._core import Options, OutputSpec, normalize_axes, split_kwargs
from ntklayers._large import _budget
from ntklayers._large import _fingerprint as fingerprint
from ntklayers._large import _run as _blocked_run
from ntklayers._large import _store
from ntklayers._large import _tiles as T
from ntklayers._large._exec import Request, make_mesh
from ntklayers._large._independence import (InteractingExamplesError, check_tiling,
                                            coupled_layers, why_not_tileable)
from ntklayers._large._kernels import blocked_kernels
from ntklayers._large._plan import plan


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
                precision: str = "highest",
                get: str | Sequence[str] | None = None) -> Any:
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
      refused; damaged files are repaired with a warning or refused, see the
      README). ``None`` keeps the kernel in memory.
    progress: a tqdm bar over blocks: ``None`` shows it on a terminal, ``True``
      always, ``False`` never.
    model_kwargs: keyword arguments of ``f`` (``f(params, x, **model_kwargs)``).
    trace_axes: as for :func:`ntklayers.ntk_fn`; likewise ``diagonal_axes``,
      ``implementation``, ``trainable``, ``independent_samples`` and
      ``precision`` (``layerwise`` is not offered).
      A traced batch axis (``0`` in ``trace_axes``, ``N1 == N2``) averages the
      per-example kernels (diagonal blocks only); the result has no batch axis,
      so it is returned in memory (not with ``out``).
    get: ``None`` or ``"ntk"``: the NTK; ``"nngp"``: the NNGP ``f(x1) f(x2)^T``
      (as :func:`ntklayers.nngp_fn`, in the same blocks, budget and store: the
      NTK of ``s * f`` over the scalar ``s`` at ``s = 1``); a tuple such as
      ``("nngp", "ntk")``: a ``Kernels`` named tuple, one blocked run per kernel
      in ``get``'s order, with ``out`` one path per kernel (a sequence in
      ``get``'s order or a dict by name), each resumable on its own.

  Returns:
    A NumPy array of the kernel's shape (``[N1, N2, O, O]`` for outputs ``[N, O]``
    and default axes), or with ``out`` the file opened read-only memory-mapped;
    a ``Kernels`` named tuple of them for a tuple ``get``.

  Raises:
    MemoryBudgetError: the request cannot fit ``max_memory``.
    InteractingExamplesError: the examples interact (BatchNorm in training, a
      batch mean, an output shape that depends on the batch size), so the kernel
      cannot be cut into blocks.
    ValueError: ``out`` holds a different request, or files that cannot be
      trusted (the message names the files to remove).

  Example:
    >>> import haiku as hk, jax, jax.numpy as jnp, numpy as np, ntklayers
    >>> net = hk.without_apply_rng(hk.transform(lambda x: ntklayers.Linear(2)(x)))
    >>> x = jax.random.normal(jax.random.key(0), (10, 3))
    >>> params = net.init(jax.random.key(1), x)
    >>> K = ntklayers.ntk_blocked(net.apply, params, x, block_size=4)
    >>> K.shape, bool(np.allclose(K, ntklayers.ntk(net.apply, params, x), atol=1e-5))
    ((10, 10, 2, 2), True)
    >>> k = ntklayers.ntk_blocked(net.apply, params, x, block_size=4, get=("nngp", "ntk"))
    >>> k.nngp.shape, bool(np.allclose(k.ntk, K))
    ((10, 10, 2, 2), True)
  """
  if get is not None:
    def run(f: Callable, params: Any, out: Any, implementation: str, trainable: Any):
      return _blocked(f, params, x1, x2, block_size=block_size, max_memory=max_memory,
                      out=out, progress=progress, model_kwargs=model_kwargs,
                      trace_axes=trace_axes, diagonal_axes=diagonal_axes,
                      implementation=implementation, trainable=trainable,
                      independent_samples=independent_samples, precision=precision)
    return blocked_kernels(run, _core.check_f(f), params, x1, get, out, model_kwargs,
                           trainable, implementation)
  return _blocked(f, params, x1, x2, block_size=block_size, max_memory=max_memory, out=out,
                  progress=progress, model_kwargs=model_kwargs, trace_axes=trace_axes,
                  diagonal_axes=diagonal_axes, implementation=implementation,
                  trainable=trainable, independent_samples=independent_samples,
                  precision=precision)


def _blocked(f: Callable, params: Any, x1: Any, x2: Any, *, block_size: int | None,
             max_memory: int | float | str | None, out: str | os.PathLike | None,
             progress: bool | None, model_kwargs: dict[str, Any] | None,
             trace_axes: int | Sequence[int], diagonal_axes: int | Sequence[int] | None,
             implementation: str, trainable: Any, independent_samples: bool | None,
             precision: str) -> np.ndarray:
  """:func:`ntk_blocked`; ``diagonal_axes=None``: every output axis (``ntk_trace``)."""
  f = _core.check_f(f)
  options = Options.create(trace_axes=trace_axes,
                           diagonal_axes=() if diagonal_axes is None else diagonal_axes,
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
  x1 = jax.tree.map(np.asarray, x1)
  x2 = None if x2 is None else jax.tree.map(np.asarray, x2)
  req = Request(f, options, static, make_mesh(), x2 is None)

  closed, out_aval = _trace(req, params, dynamic, x1, x2 if n2 != n1 else None)
  rest = tuple(out_aval.shape[1:])
  ndim = 1 + len(rest)
  trace = normalize_axes(options.trace_axes, ndim, "trace_axes")
  diag = (tuple(range(ndim)) if diagonal_axes is None else
          normalize_axes(options.diagonal_axes, ndim, "diagonal_axes"))
  if 0 in trace + diag and n1 != n2:
    raise ValueError(
        f"`trace_axes`={options.trace_axes} and `diagonal_axes`={options.diagonal_axes} "
        f"include the batch axis 0, which pairs example n of `x1` with example n of "
        f"`x2`: it needs equal batch sizes, got N1={n1} (`x1`) and N2={n2} (`x2`).")
  batch_traced = 0 in trace
  if batch_traced:  # the per-example kernels, averaged below
    OutputSpec.create((n1, *rest), (n2, *rest), trace, diag)  # N1 == N2, axes apart
    if out is not None:
      raise ValueError(
          f"`trace_axes`={options.trace_axes} contracts the batch axis: the kernel has "
          f"no batch axis (outputs {[n1, *rest]}), so there are no blocks to write to "
          f"`out`={os.fspath(out)!r}. Call without `out` (the per-example kernels it "
          f"averages are kept in memory, linear in N).")
    trace, diag = tuple(a for a in trace if a), tuple(sorted({0, *diag}))
  options = dataclasses.replace(options, trace_axes=trace, diagonal_axes=diag)
  req = dataclasses.replace(req, options=options, rest=rest, batch=n1)
  spec = OutputSpec.create((n1, *rest), (n2, *rest), trace, diag, options.precision)
  kind = T.DIAGONAL if options.diagonal_batch else (T.UPPER if x2 is None else T.FULL)
  dtype = np.dtype(out_aval.dtype)
  shape = spec.kernel_shape
  inner = T.kernel_bytes(shape[1 if kind == T.DIAGONAL else 2:], dtype.itemsize)

  def block_bytes(b: int) -> int:
    return inner * (b if kind == T.DIAGONAL else b * b)

  path = None if out is None else _check_out(out)
  recorded = None if path is None else _store.read_request(path)
  if block_size is None and recorded is not None:
    block_size = int(recorded["block_size"])
  if path is not None:  # checked before planning: a different request is refused at once
    request = {
        "block_size": None if block_size is None else min(block_size, max(n1, n2)),
        "params": fingerprint.digest(params),
        "inputs": fingerprint.digest(x1, x2),
        "model_kwargs": fingerprint.digest(dynamic, repr(static.values)),
        "options": repr((trace, diag, options.implementation, options.independent_samples,
                         options.precision, _mask_key(options, params))),
        "model": fingerprint.program_digest(closed),
    }
    if recorded is not None:
      _store.check_request(path, recorded, _store.full_request(request, shape, dtype))
  budget = (_budget.default_budget(jax.devices()[0]) if max_memory is None else
            _budget.parse_memory(max_memory))
  output_bytes = 0 if path is not None else T.kernel_bytes(shape, dtype.itemsize)
  progs = plan(req, params, x1, x2, dynamic, block_size=block_size, budget=budget,
               kind=kind, output_bytes=output_bytes, block_bytes=block_bytes,
               out_given=path is not None)

  settled = options.independent_samples is True or _check_independent(
      req, params, x1, x2, dynamic, progs.block_size, dtype)

  t1 = T.Tiles(n1, progs.block_size)
  t2 = t1 if x2 is None else T.Tiles(n2, progs.block_size)
  if path is None:
    store: Any = _store.MemoryStore(shape, dtype)
  else:
    request["block_size"] = progs.block_size
    store = _open_store(path, shape, dtype, request, kind, t1, t2)
  try:
    try:
      _blocked_run.run(req, progs, kind, spec, params, x1, x2, dynamic, store, progress)
    except _blocked_run.RowCheckFailed:
      if not settled:
        raise
      # The examples are independent (proven, checked in float64, or promised), but a
      # layer's rows are not its examples (e.g. the batch permuted around it): each
      # tile's factors are captured with the tile as one sample (exact, costlier).
      req = dataclasses.replace(req, tiles_as_samples=True)
      progs = plan(req, params, x1, x2, dynamic, block_size=progs.block_size,
                   budget=budget, kind=kind, output_bytes=output_bytes,
                   block_bytes=block_bytes, out_given=path is not None)
      _blocked_run.run(req, progs, kind, spec, params, x1, x2, dynamic, store, progress)
  finally:
    if path is not None:
      store.close()
  _barrier("ntk_blocked: done")
  result = store.result()
  if batch_traced:  # the mean of the per-example kernels
    return np.asarray(np.mean(result, axis=0, dtype=np.float64), dtype=dtype)
  return result


def _trace(req: Request, params: Any, dynamic: list, x1: Any, x2: Any) -> tuple[Any, Any]:
  """``(closed jaxpr, output ShapeDtypeStruct on x1)``: the model traced once on the
  whole batch (and on ``x2`` if given: its batch size differs), its outputs checked."""
  xs = (x1,) if x2 is None else (x1, x2)
  try:
    closed, outs = jax.make_jaxpr(
        lambda p, d, *zs: [req.model(d)(p, z) for z in zs], return_shape=True)(
            params, dynamic, *xs)
  except Exception as e:  # pylint: disable=broad-except  (re-raised with a note)
    _core.note_failure(e, params, x1)
    raise
  for out, x in zip(outs, xs):
    _core.check_output(out, jax.tree.leaves(x)[0].shape[0], x)
  if len(outs) == 2 and outs[0].shape[1:] != outs[1].shape[1:]:
    raise InteractingExamplesError(
        f"ntk_blocked: the output shape of `f` depends on the batch size: `f` returned "
        f"{list(outs[0].shape)} for `x1` and {list(outs[1].shape)} for `x2`; the kernel "
        f"needs outputs that agree in every axis but the first.")
  return closed, outs[0]


def _check_out(out: str | os.PathLike) -> str:
  """``out`` as a path whose directory exists and that is not a directory."""
  path = os.fspath(out)
  if not isinstance(path, str):
    raise TypeError(f"`out` must be a path (str or os.PathLike), got {out!r}.")
  if os.path.isdir(path):
    raise ValueError(f"`out`={path!r} is a directory; pass the path of a file in it, "
                     f"e.g. {os.path.join(path, 'kernel.npy')!r}.")
  folder = os.path.dirname(os.path.abspath(path))
  if not os.path.isdir(folder):
    raise FileNotFoundError(f"`out`={path!r}: the directory {folder!r} does not exist; "
                            f"create it first.")
  return path


def _open_store(path: str, shape: tuple, dtype: Any, request: dict, kind: str,
                t1: T.Tiles, t2: T.Tiles) -> _store.NpyStore:
  """The ``.npy`` store at ``path``: created or checked and repaired by process 0,
  then opened by every process (all read the same finished blocks)."""
  diag, other = T.schedule(kind, t1.count, t2.count)
  store = _store.NpyStore(path, shape, dtype, request, _blocked_run.regions(kind, t1, t2),
                          diag + other, jax.process_index())
  if jax.process_index() == 0:
    store.create_or_check()
  _barrier("ntk_blocked: file created")
  if jax.process_index() != 0:
    recorded = _store.read_request(path)
    store.check(recorded or {})
  store.open()
  _barrier("ntk_blocked: progress read")
  return store


def _check_independent(req: Request, params: Any, x1: Any, x2: Any, dynamic: list,
                       b: int, dtype: np.dtype) -> bool:
  """Refuses tiles unless examples are proven (statically: the shared guard
  ``why_not_tileable``, which also proves that a tile's program is the batch's but
  for its size) or checked (two tilings agree on ``J^T u``) not to interact.
  Returns whether that is settled beyond the float32 tolerance of the check
  (proven, one tile, or checked in float64)."""
  settled = True
  f = req.model(dynamic)
  for x in (x1,) if x2 is None else (x1, x2):
    n = jax.tree.leaves(x)[0].shape[0]
    if n == b:  # one tile, the batch itself
      continue
    if why_not_tileable(f, params, x, b) is None:
      continue
    coupled = coupled_layers(f, params, jax.tree.map(lambda a: a[:b], x))
    if coupled:
      raise InteractingExamplesError(
          f"ntk_blocked: the model's examples interact ({coupled}), so the kernel of a "
          f"tile pair is not a block of the whole batch's kernel. Compute it unblocked "
          f"with ntklayers.ntk_fn, or make the examples independent (e.g. "
          f"is_training=False).")
    if not check_tiling(f, params, x, b):
      other = (f"that on a tile of {b + 1}" if n > b else
               f"that on the batch of {n} alone (a tile pads it with copies of its "
               f"last example)")
      raise InteractingExamplesError(
          f"ntk_blocked: the model's examples interact (its parameter Jacobian on "
          f"tiles of {b} examples differs from {other}: e.g. a batch mean, a softmax "
          f"over the batch, a roll, or batch-size dependence), so the kernel cannot be "
          f"cut into blocks; compute it with ntklayers.ntk_fn.")
    settled = settled and dtype.itemsize > 4
  return settled


def _mask_key(options: Options, params: Any) -> tuple:
  return tuple(_core.resolve_trainable(options.mask, params))


def _barrier(name: str) -> None:
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    multihost_utils.sync_global_devices(name)


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
    f: the model, as for :func:`ntk_blocked`.
    params: its parameters.
    x: a batch ``[N, ...]``.
    block_size: as for :func:`ntk_blocked`; likewise ``max_memory``,
      ``progress``, ``model_kwargs``, ``implementation``, ``trainable``,
      ``independent_samples`` and ``precision``.

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
  _core.check_batch(x, "x")
  diag = _blocked(f, params, x, None, block_size=block_size, max_memory=max_memory,
                  out=None, progress=progress, model_kwargs=model_kwargs, trace_axes=(),
                  diagonal_axes=None, implementation=implementation, trainable=trainable,
                  independent_samples=independent_samples, precision=precision)
  return float(np.sum(diag, dtype=np.float64))
