"""Where the blocks of a blocked kernel go: memory, or a resumable ``.npy`` file.

Out of core, the kernel is a standard ``.npy`` file (``numpy.load(path,
mmap_mode="r")`` opens it memory-mapped). Blocks are written in place with
positioned writes as they finish: a writable memory map would count every
written page in the process's resident memory, which is what ``out=`` exists to
bound. Beside the file:

- ``<out>.ntk.json`` (the *sidecar*): the fingerprint of the request and a random
  run id, created (atomically) before the file and never rewritten;
- ``<out>.ntk.p<k>.log``: one line per finished block, appended by process ``k``:
  ``<run id> <i> <j> <crc32 of the block's bytes> <crc32 of the line>``.

A block is trusted only when its bytes, its log line and the sidecar belong to
the same request: the line carries the sidecar's run id and a checksum of
itself, and on resume every logged block's bytes are read back and checked
against its checksum. Writes are ordered (a round's block bytes, ``fsync``,
then their log lines, ``fsync``), so ``kill -9`` at any instant loses at most
the blocks in flight. Damage is either repaired with a warning (a truncated
file is extended, blocks and lines that fail their checksums are recomputed) or
refused with a message naming the files to remove (an unreadable sidecar, a
foreign header). This module imports only the standard library and NumPy (the
kill tests drive it in light subprocesses).
"""

from __future__ import annotations

import mmap
import os
import secrets
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from ntklayers._large import _store_files as files
from ntklayers._large._store_files import FORMAT, StoreError, log_path, read_request, sidecar

Index = tuple[slice, ...]
Pair = tuple[int, int]
#: ``regions(pair)``: where block ``pair`` lies in the kernel, in write order.
Regions = Callable[[Pair], Sequence[Index]]

__all__ = ["FORMAT", "MemoryStore", "NpyStore", "StoreError", "host_array", "read_request",
           "sidecar", "log_path"]


def host_array(shape: tuple[int, ...], dtype: Any) -> np.ndarray:
  """An uninitialized array; large ones in an anonymous memory map advised to use
  huge pages (first writes to a plain ``np.empty`` of 400 MB cost seconds of page
  faults on some virtual machines, about 8x more than with huge pages)."""
  dtype = np.dtype(dtype)
  nbytes = int(np.prod(shape)) * dtype.itemsize
  if nbytes < 1 << 26 or not hasattr(mmap, "MADV_HUGEPAGE"):
    return np.empty(shape, dtype)
  buf = mmap.mmap(-1, nbytes)
  buf.madvise(mmap.MADV_HUGEPAGE)
  return np.frombuffer(buf, dtype).reshape(shape)


class MemoryStore:
  """The kernel as one NumPy array in host memory."""

  def __init__(self, shape: tuple[int, ...], dtype: Any):
    self.array = host_array(shape, dtype)
    self.done: set[Pair] = set()

  def put(self, pair: Pair, items: Sequence[tuple[Index, np.ndarray]]) -> None:
    for index, block in items:
      self.array[index] = block
    self.done.add(pair)

  def commit(self) -> None:
    pass

  def result(self) -> np.ndarray:
    return self.array


def full_request(request: dict[str, Any], shape: tuple[int, ...], dtype: Any) -> dict:
  """The recorded request: the fingerprint, the format, the kernel's shape and dtype."""
  return dict(request, format=FORMAT, shape=list(shape), dtype=np.dtype(dtype).str)


def check_request(path: str, recorded: dict, request: dict) -> None:
  """Refuses a sidecar that records a request other than ``request`` (of
  :func:`full_request`), naming each field that differs and every file to remove."""
  differ = sorted(k for k in (set(recorded) | set(request)) - {"run", "blocks"}
                  if recorded.get(k) != request.get(k))
  if differ:
    shown = ", ".join(f"{k}: recorded {recorded.get(k)!r}, now {request.get(k)!r}"
                      for k in differ)
    raise ValueError(
        f"`out`={path!r} holds a partial kernel of a different request ({shown}). "
        f"Resume with the same model, params, inputs and options, or "
        f"{files.start_over(path, 'remove')}")


def progress(path: str) -> tuple[int, int] | None:
  """``(finished, total)`` blocks of the ``ntk_blocked(out=path)`` file by its logs
  (lines of its run; bytes not re-read), ``None`` if ``path`` has no sidecar. For
  readers of a kernel file: fewer finished than total means an unfinished kernel
  (its missing blocks read as zeros)."""
  record = read_request(path)
  if record is None:
    return None
  done = {pair for name in files.log_names(path)
          for _, pair, _ in files.Log.read(name, record["run"], None).lines}
  return len(done), int(record.get("blocks", -1))


class NpyStore:
  """The kernel as a ``.npy`` file at ``path``, resumable (module docstring).

  Args:
    path: the ``.npy`` file.
    shape, dtype: the kernel's.
    request: the fingerprint (``block_size`` and digests, JSON values).
    regions: where each block of the schedule lies (:data:`Regions`).
    pairs: every block of the schedule (a logged pair outside it is damage).
    process: this process's index (its log is ``<out>.ntk.p<process>.log``).
  """

  def __init__(self, path: str, shape: tuple[int, ...], dtype: Any, request: dict[str, Any],
               regions: Regions, pairs: Sequence[Pair], process: int = 0):
    self.path, self.shape, self.dtype = path, tuple(shape), np.dtype(dtype)
    self.request = full_request(request, self.shape, self.dtype)
    self.regions, self.pairs, self.process = regions, frozenset(pairs), process
    self.layout = files.Layout(self.shape, self.dtype)
    self.run = ""
    self.done: set[Pair] = set()
    self._pending: list[tuple[Pair, int]] = []
    self._fd = -1
    self._log_fd = -1

  # ------------------------------------------------ process 0, before others ---

  def create_or_check(self) -> None:
    """Process 0: creates the file and its sidecar, or checks an earlier run's
    request (a different one is refused, naming what differs) and repairs its
    files (module docstring); every log is then left holding trusted lines only."""
    recorded = read_request(self.path)
    if recorded is None:
      if os.path.exists(self.path):
        raise FileExistsError(
            f"`out`={self.path!r} exists but has no progress file {sidecar(self.path)!r}: "
            f"it was not written by ntk_blocked (or its progress file was deleted), so "
            f"none of its bytes can be trusted. {files.start_over(self.path)}")
      self._create()
      return
    self.check(recorded)
    self.run = recorded["run"]
    if not os.path.exists(self.path):  # killed before the file was made, or deleted
      lost = sum(len(log.lines) for log in self._logs())
      files.remove_logs(self.path)
      files.create_npy(self.path, self.layout)
      if lost:
        warnings.warn(
            f"ntk_blocked: `out`={self.path!r} was missing (deleted?): the {lost} "
            f"blocks its progress logs recorded are recomputed.", RuntimeWarning,
            stacklevel=5)
      return
    self._repair()

  def _create(self) -> None:
    files.remove_logs(self.path)  # stale logs of an earlier request never count
    self.run = secrets.token_hex(8)
    files.write_sidecar(self.path, dict(self.request, run=self.run, blocks=len(self.pairs)))
    self._create_npy()

  def _create_npy(self) -> None:
    files.create_npy(self.path, self.layout)

  def check(self, recorded: dict) -> None:
    """Refuses a sidecar that records a different request, naming each field."""
    check_request(self.path, recorded, self.request)

  def _logs(self) -> list[files.Log]:
    return [files.Log.read(name, self.run, self.pairs)
            for name in files.log_names(self.path)]

  def _repair(self) -> None:
    """Checks the header and size, verifies every logged block against the bytes,
    rewrites logs that hold anything else; warns about what is recomputed."""
    size, full = files.check_npy(self.path, self.layout)
    files.remove_log_temporaries(self.path)  # of a rewrite killed half-way
    if size < full:
      os.truncate(self.path, full)  # the lost tail reads as zeros: fails its checksums
    logs = self._logs()
    fd = os.open(self.path, os.O_RDONLY)
    try:
      seen: set[Pair] = set()
      failed = 0
      for log in logs:
        kept = []
        for line, pair, crc in log.lines:
          if pair in seen:
            continue
          if self._crc(fd, pair) == crc:
            seen.add(pair)
            kept.append(line)
          else:
            failed += 1
        if kept != [line for line, _, _ in log.lines] or log.dropped or log.torn:
          files.rewrite_log(log.name, kept)
    finally:
      os.close(fd)
    notes = []
    if size < full:
      notes.append(f"`out`={self.path!r} was truncated ({size} of {full} bytes: a full "
                   f"disk, a partial copy?) and is extended to its full size")
    if failed:
      notes.append(f"{failed} blocks logged as finished in {self.path!r} do not match "
                   f"their checksums (their bytes were lost or modified)")
    for log in logs:
      if log.dropped:
        notes.append(f"{log.dropped} unreadable lines of {log.name!r} (damaged, edited or "
                     f"of another run) are dropped")
    if notes:
      warnings.warn(f"ntk_blocked: {'; '.join(notes)}. The blocks concerned are "
                    f"recomputed; the others are kept.", RuntimeWarning, stacklevel=6)

  def _crc(self, fd: int, pair: Pair) -> int:
    crc = 0
    for index in self.regions(pair):
      for offset, nbytes in self.layout.segments(index):
        crc = files.crc_of_range(fd, offset, nbytes, crc)
    return crc

  # --------------------------------------------------------- every process ---

  def open(self) -> None:
    """Opens the file for writing and reads the finished blocks (after process 0's
    :meth:`create_or_check`: every remaining log line is trusted)."""
    recorded = read_request(self.path)
    if recorded is None or not os.path.exists(self.path):
      raise StoreError(f"`out`={self.path!r} or its progress file {sidecar(self.path)!r} "
                       f"disappeared while starting. {files.start_over(self.path)}")
    self.run = recorded["run"]
    self.done = {pair for log in self._logs() for _, pair, _ in log.lines}
    self._fd = os.open(self.path, os.O_RDWR)
    self._log_fd = os.open(log_path(self.path, self.process),
                           os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

  def write(self, index: Index, block: np.ndarray, crc: int = 0) -> int:
    """Writes ``block`` at ``index`` (row slice, optional column slice) in place;
    returns the CRC-32 of its bytes continued from ``crc``."""
    data = np.ascontiguousarray(block, dtype=self.dtype)
    flat = data.reshape(-1).view(np.uint8).data
    start = 0
    for offset, nbytes in self.layout.segments(index):
      crc = files.pwrite_crc(self._fd, flat[start:start + nbytes], offset, crc)
      start += nbytes
    if start != data.nbytes:
      raise ValueError(f"block of shape {block.shape} does not fill {index} of the "
                       f"kernel {self.shape}")
    return crc

  def put(self, pair: Pair, items: Sequence[tuple[Index, np.ndarray]]) -> None:
    """Writes block ``pair`` (its regions, e.g. a block and its mirror image); it
    counts as finished after the next :meth:`commit`."""
    crc = 0
    for index, block in items:
      crc = self.write(index, block, crc)
    self._pending.append((pair, crc))

  def commit(self) -> None:
    """Makes the written blocks durable, then logs them (in that order)."""
    if not self._pending:
      return
    pending, self._pending = self._pending, []  # interrupted below: never logged twice
    os.fsync(self._fd)
    self._append(b"".join(files.log_line(self.run, pair, crc) for pair, crc in pending))
    self.done.update(pair for pair, _ in pending)

  def _append(self, lines: bytes) -> None:
    files.write_all(self._log_fd, lines)  # one write: O_APPEND, whole lines
    os.fsync(self._log_fd)

  def close(self) -> None:
    """Logs what was written (as :meth:`commit`), then closes the file and the log."""
    try:
      if self._fd >= 0 and self._log_fd >= 0:
        self.commit()
    finally:
      for fd in (self._fd, self._log_fd):
        if fd >= 0:
          os.close(fd)
      self._fd = self._log_fd = -1

  def result(self) -> np.ndarray:
    return np.load(self.path, mmap_mode="r")
