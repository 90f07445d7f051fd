"""The files of a resumable ``.npy`` kernel (see ``_store``): names, the sidecar,
the ``.npy`` header and byte layout, log lines, durable writes, and errors that
name the files to remove.

Standard library and NumPy only.
"""

from __future__ import annotations

import dataclasses
import functools
import glob
import io
import json
import math
import os
import re
import zlib
from typing import Any

import numpy as np

FORMAT = 2
_CHUNK = 1 << 24  # bytes per read when verifying
_LOG = re.compile(r"\.ntk\.p[0-9]+\.log$")


class StoreError(ValueError):
  """An ``out=`` file of ``ntk_blocked`` that cannot be resumed; the message names
  the files and what to do."""


# ------------------------------------------------------------------ names ---


def sidecar(path: str) -> str:
  return f"{path}.ntk.json"


def log_path(path: str, process: int) -> str:
  return f"{path}.ntk.p{process}.log"


def _tmp_npy(path: str) -> str:
  return f"{path}.ntk.tmp"


def log_names(path: str) -> list[str]:
  """The progress logs of ``path`` (of every process), sorted."""
  return sorted(n for n in glob.glob(glob.escape(path) + ".ntk.p*.log") if _LOG.search(n))


def related(path: str) -> list[str]:
  """Every existing file of the kernel at ``path``: itself, its sidecar, its logs
  and temporary files."""
  names = [path, sidecar(path), sidecar(path) + ".tmp", _tmp_npy(path)]
  names += glob.glob(glob.escape(path) + ".ntk.p*.log*")
  return sorted({n for n in names if os.path.exists(n)}, key=names.index)


def start_over(path: str, verb: str = "Remove") -> str:
  """``"Remove 'k.npy', 'k.npy.ntk.json' and 'k.npy.ntk.p0.log' to start over."``"""
  names = [repr(n) for n in related(path)] or [repr(path)]
  listed = names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]
  return f"{verb} {listed} to start over."


def remove_logs(path: str) -> None:
  for name in glob.glob(glob.escape(path) + ".ntk.p*.log*"):
    _remove(name)


def remove_log_temporaries(path: str) -> None:
  for name in glob.glob(glob.escape(path) + ".ntk.p*.log.tmp"):
    _remove(name)


def _remove(name: str) -> None:
  try:
    os.remove(name)
  except FileNotFoundError:
    pass


# ---------------------------------------------------------- durable writes ---


def write_all(fd: int, data: bytes | memoryview) -> None:
  view = memoryview(data)
  while view:
    view = view[os.write(fd, view):]


def pwrite_crc(fd: int, data: memoryview, offset: int, crc: int) -> int:
  """Writes ``data`` at ``offset``; returns its CRC-32 continued from ``crc``."""
  crc = zlib.crc32(data, crc)
  while data:
    written = os.pwrite(fd, data, offset)
    data, offset = data[written:], offset + written
  return crc


def crc_of_range(fd: int, offset: int, nbytes: int, crc: int) -> int:
  """The CRC-32 of ``nbytes`` bytes of ``fd`` at ``offset``, continued from ``crc``."""
  while nbytes > 0:
    chunk = os.pread(fd, min(nbytes, _CHUNK), offset)
    if not chunk:
      return crc ^ 0xFFFFFFFF  # past the end: never a match
    crc = zlib.crc32(chunk, crc)
    offset, nbytes = offset + len(chunk), nbytes - len(chunk)
  return crc


def _sync_dir(path: str) -> None:
  fd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
  try:
    os.fsync(fd)
  finally:
    os.close(fd)


def replace_durably(path: str, data: bytes, size: int | None = None,
                    tmp: str | None = None) -> None:
  """Writes ``path`` atomically: ``data`` (then zeros up to ``size``) to a temporary
  file (``tmp``, default ``path + ".tmp"``), ``fsync``, rename over ``path``,
  ``fsync`` of the directory."""
  tmp = path + ".tmp" if tmp is None else tmp
  fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
  try:
    write_all(fd, data)
    if size is not None:
      os.ftruncate(fd, size)
    os.fsync(fd)
  finally:
    os.close(fd)
  os.replace(tmp, path)
  _sync_dir(path)


# ----------------------------------------------------------------- sidecar ---


def write_sidecar(path: str, record: dict[str, Any]) -> None:
  replace_durably(sidecar(path), json.dumps(record, indent=1, sort_keys=True).encode())


def read_request(path: str) -> dict | None:
  """The recorded request of an earlier run writing ``path``, if any; an unreadable
  or foreign sidecar raises :class:`StoreError` naming the files to remove."""
  name = sidecar(path)
  try:
    with open(name, "rb") as fh:
      data = fh.read()
  except FileNotFoundError:
    return None
  try:
    record = json.loads(data.decode("utf-8"))
  except (UnicodeDecodeError, ValueError) as e:
    raise StoreError(
        f"`out`={path!r}: its progress file {name!r} is not valid JSON ({e}); it was "
        f"damaged or edited, so no block of the kernel can be trusted. "
        f"{start_over(path)}") from e
  if not isinstance(record, dict) or record.get("format") != FORMAT:
    found = record.get("format") if isinstance(record, dict) else type(record).__name__
    raise StoreError(
        f"`out`={path!r}: its progress file {name!r} was not written by this version of "
        f"ntklayers (format {found!r}, this version reads format {FORMAT}). "
        f"{start_over(path)}")
  if not (isinstance(record.get("run"), str) and isinstance(record.get("block_size"), int)
          and record["block_size"] > 0):
    raise StoreError(
        f"`out`={path!r}: its progress file {name!r} lacks a run id or a block size "
        f"(edited?). {start_over(path)}")
  return record


# ------------------------------------------------------------ the .npy file ---


@dataclasses.dataclass(frozen=True)
class Layout:
  """Bytes of a C-ordered ``.npy`` kernel of ``shape`` and ``dtype``."""

  shape: tuple[int, ...]
  dtype: np.dtype

  @functools.cached_property
  def header(self) -> bytes:
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {
        "descr": np.lib.format.dtype_to_descr(self.dtype), "fortran_order": False,
        "shape": self.shape})
    return buf.getvalue()

  @property
  def size(self) -> int:
    return len(self.header) + math.prod(self.shape) * self.dtype.itemsize

  def segments(self, index: tuple[slice, ...]) -> list[tuple[int, int]]:
    """``(offset, nbytes)`` of ``kernel[index]`` (rows, optional columns) in order."""
    item = self.dtype.itemsize
    row = math.prod(self.shape[1:]) * item
    start = len(self.header)
    rows = index[0]
    if len(index) == 1:
      return [(start + rows.start * row, (rows.stop - rows.start) * row)]
    cols = index[1]
    inner = math.prod(self.shape[2:]) * item
    width = (cols.stop - cols.start) * inner
    return [(start + r * row + cols.start * inner, width)
            for r in range(rows.start, rows.stop)]


def create_npy(path: str, layout: Layout) -> None:
  """The ``.npy`` file of ``layout``, zeros (sparse), created atomically."""
  replace_durably(path, layout.header, layout.size, _tmp_npy(path))


def _describe_header(path: str) -> str:
  try:
    with open(path, "rb") as fh:
      version = np.lib.format.read_magic(fh)
      read = (np.lib.format.read_array_header_1_0 if version == (1, 0) else
              np.lib.format.read_array_header_2_0)
      shape, fortran, dtype = read(fh)
    return f"shape {shape}, dtype {dtype.str}{', Fortran order' if fortran else ''}"
  except Exception:  # pylint: disable=broad-except  (any damage: described as such)
    return "no readable .npy header"


def check_npy(path: str, layout: Layout) -> tuple[int, int]:
  """``(size, full size)`` of the kernel file; refuses a foreign or damaged header
  and a file longer than its kernel."""
  size = os.path.getsize(path)
  with open(path, "rb") as fh:
    head = fh.read(len(layout.header))
  wanted = f"shape {layout.shape}, dtype {layout.dtype.str}"
  if head != layout.header:
    raise StoreError(
        f"`out`={path!r} does not start with the .npy header of this request's kernel "
        f"({wanted}); found {_describe_header(path)} ({size} bytes): the file was "
        f"truncated into its header, replaced or edited. {start_over(path)}")
  if size > layout.size:
    raise StoreError(
        f"`out`={path!r} has {size} bytes, more than the {layout.size} of its kernel "
        f"({wanted}): it was modified by something else. {start_over(path)}")
  return size, layout.size


# -------------------------------------------------------------------- logs ---


def log_line(run: str, pair: tuple[int, int], crc: int) -> bytes:
  body = f"{run} {pair[0]} {pair[1]} {crc:08x}"
  return f"{body} {zlib.crc32(body.encode()):08x}\n".encode("ascii")


def _parse(line: bytes, run: str) -> tuple[tuple[int, int], int] | None:
  """``(pair, block crc)`` of a log line of run ``run`` (without its newline)."""
  body, _, check = line.rpartition(b" ")
  try:
    if int(check, 16) != zlib.crc32(body) or len(check) != 8:
      return None
    line_run, i, j, crc = body.decode("ascii").split(" ")
    return ((int(i), int(j)), int(crc, 16)) if line_run == run else None
  except ValueError:
    return None


@dataclasses.dataclass
class Log:
  """The lines of one progress log that belong to run ``run`` and to the schedule:
  ``(line, pair, block crc)``; ``dropped`` counts the others (garbled, edited,
  another run's), ``torn`` says the last line was cut short (killed mid-write)."""

  name: str
  lines: list[tuple[bytes, tuple[int, int], int]]
  dropped: int
  torn: bool

  @classmethod
  def read(cls, name: str, run: str, pairs: frozenset | None) -> "Log":
    """The log ``name`` (``pairs``: the schedule; ``None`` accepts any pair)."""
    with open(name, "rb") as fh:
      data = fh.read()
    *complete, tail = data.split(b"\n")
    lines, dropped = [], 0
    for line in complete:
      parsed = _parse(line, run)
      if parsed is None or (pairs is not None and parsed[0] not in pairs):
        dropped += 1
      else:
        lines.append((line + b"\n", parsed[0], parsed[1]))
    return cls(name, lines, dropped, bool(tail))


def rewrite_log(name: str, lines: list[bytes]) -> None:
  replace_durably(name, b"".join(lines))
