"""Where the blocks of a blocked kernel go: memory, or a resumable ``.npy`` file.

Out of core, the kernel is a standard ``.npy`` file (``numpy.load(path,
mmap_mode="r")`` opens it memory-mapped). Blocks are written in place with
positioned writes as they finish: a writable memory map would count every
written page in the process's resident memory, which is what ``out=`` exists to
bound. Beside the file:

- ``<out>.ntk.json``: the fingerprint of the request (parameters, inputs, model
  keyword arguments, options, kernel shape, dtype and block size), written once;
- ``<out>.ntk.p<k>.log``: one line ``i j`` per finished block, appended by
  process ``k`` after the block's bytes are written. A killed process loses at
  most the block in flight; a torn last line is ignored.

Resuming with the same request skips every logged block and finishes the same
bytes; a different request is refused, naming what differs.
"""

from __future__ import annotations

import glob
import hashlib
import json
import mmap
import os
from collections.abc import Iterable
from typing import Any

import jax
import numpy as np

FORMAT = 1


def _leaf_bytes(leaf: Any) -> bytes:
  if hasattr(leaf, "dtype") and jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
    leaf = jax.random.key_data(leaf)
  a = np.asarray(leaf)
  return f"{a.dtype.str}{a.shape}".encode() + np.ascontiguousarray(a).tobytes()


def digest(*trees: Any) -> str:
  """A SHA-256 digest of pytrees: their structure, shapes, dtypes and values."""
  h = hashlib.sha256()
  for tree in trees:
    leaves, treedef = jax.tree.flatten(tree)
    h.update(str(treedef).encode())
    for leaf in leaves:
      h.update(_leaf_bytes(leaf) if hasattr(leaf, "shape") else repr(leaf).encode())
  return h.hexdigest()[:32]


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
    self.done: set[tuple[int, int]] = set()

  def write(self, index: tuple[slice, ...], block: np.ndarray) -> None:
    self.array[index] = block

  def finish(self, pair: tuple[int, int]) -> None:
    self.done.add(pair)

  def result(self) -> np.ndarray:
    return self.array


def sidecar(path: str) -> str:
  return f"{path}.ntk.json"


def read_request(path: str) -> dict | None:
  """The recorded request of an earlier run writing ``path``, if any."""
  try:
    with open(sidecar(path), encoding="utf-8") as fh:
      return json.load(fh)
  except FileNotFoundError:
    return None


class NpyStore:
  """The kernel as a ``.npy`` file at ``path``, resumable (module docstring)."""

  def __init__(self, path: str, shape: tuple[int, ...], dtype: Any,
               request: dict[str, Any], process: int = 0):
    self.path, self.shape, self.dtype = path, tuple(shape), np.dtype(dtype)
    self.request = dict(request, format=FORMAT, shape=list(shape), dtype=self.dtype.str)
    self.process = process
    self.done: set[tuple[int, int]] = set()
    self._fd = -1
    self._log: Any = None

  def create_or_check(self) -> None:
    """Process 0: creates the file and its sidecar, or checks an earlier run's
    request (a mismatch is refused, naming what differs)."""
    recorded = read_request(self.path)
    if recorded is not None:
      self.check(recorded)
      if not os.path.exists(self.path):  # killed between the sidecar and the file
        for log in glob.glob(glob.escape(self.path) + ".ntk.p*.log"):
          os.remove(log)
        np.lib.format.open_memmap(self.path, mode="w+", dtype=self.dtype, shape=self.shape)
    elif os.path.exists(self.path):
      raise FileExistsError(
          f"`out`={self.path!r} exists but has no progress file {sidecar(self.path)!r}: it "
          f"was not written by ntk_blocked (or its progress file was deleted). Remove it "
          f"or choose another path.")
    else:  # the sidecar first: a file without one is never ours
      tmp = sidecar(self.path) + ".tmp"
      with open(tmp, "w", encoding="utf-8") as fh:
        json.dump(self.request, fh, indent=1, sort_keys=True)
      os.replace(tmp, sidecar(self.path))
      np.lib.format.open_memmap(self.path, mode="w+", dtype=self.dtype, shape=self.shape)

  def check(self, recorded: dict) -> None:
    differ = sorted(k for k in set(recorded) | set(self.request)
                    if recorded.get(k) != self.request.get(k))
    if differ:
      shown = ", ".join(f"{k}: recorded {recorded.get(k)!r}, now {self.request.get(k)!r}"
                        for k in differ)
      raise ValueError(
          f"`out`={self.path!r} holds a partial kernel of a different request "
          f"({shown}). Resume with the same params, inputs and options, or remove "
          f"{self.path!r} and {sidecar(self.path)!r} to start over.")

  def open(self) -> None:
    """Opens the file for writing and reads which blocks are already finished."""
    self.done = set(self._finished())
    self._fd = os.open(self.path, os.O_RDWR)
    with open(self.path, "rb") as fh:
      version = np.lib.format.read_magic(fh)
      if version == (1, 0):
        np.lib.format.read_array_header_1_0(fh)
      else:
        np.lib.format.read_array_header_2_0(fh)
      self._offset = fh.tell()
    log = f"{self.path}.ntk.p{self.process}.log"
    if os.path.exists(log):  # drop a torn last line (killed mid-write)
      with open(log, "rb+") as fh:
        data = fh.read()
        if data and not data.endswith(b"\n"):
          fh.truncate(data.rfind(b"\n") + 1)
    self._log = open(log, "a", encoding="ascii")

  def _finished(self) -> Iterable[tuple[int, int]]:
    for name in glob.glob(glob.escape(self.path) + ".ntk.p*.log"):
      with open(name, encoding="ascii") as fh:
        for line in fh:
          if line.endswith("\n"):
            i, j = line.split()
            yield int(i), int(j)

  def write(self, index: tuple[slice, ...], block: np.ndarray) -> None:
    """Writes ``block`` at ``index`` (row slice, optional column slice) in place."""
    block = np.ascontiguousarray(block, dtype=self.dtype)
    item = self.dtype.itemsize
    row = int(np.prod(self.shape[1:])) * item
    rows = index[0]
    if len(index) == 1:  # whole rows: one contiguous write
      _pwrite(self._fd, block.tobytes(), self._offset + rows.start * row)
      return
    cols = index[1]
    inner = int(np.prod(self.shape[2:])) * item
    for r in range(rows.stop - rows.start):
      _pwrite(self._fd, block[r].tobytes(),
              self._offset + (rows.start + r) * row + cols.start * inner)

  def finish(self, pair: tuple[int, int]) -> None:
    """Records ``pair`` as finished (after its bytes are written)."""
    self._log.write(f"{pair[0]} {pair[1]}\n")
    self._log.flush()
    self.done.add(pair)

  def close(self) -> None:
    if self._fd >= 0:
      os.close(self._fd)
      self._fd = -1
    if self._log is not None:
      self._log.close()
      self._log = None

  def result(self) -> np.ndarray:
    return np.load(self.path, mmap_mode="r")


def _pwrite(fd: int, data: bytes, offset: int) -> None:
  view = memoryview(data)
  while view:
    written = os.pwrite(fd, view, offset)
    view, offset = view[written:], offset + written
