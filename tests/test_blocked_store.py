"""Resuming ``ntk_blocked(out=...)`` trusts a block only when its bytes, its log
line and the sidecar belong to the same request (issue 17, class 2): damaged files.

Every damaged-file case is either repaired with a warning that names the file
(and the kernel is exact) or refused with an error that names the file(s) and
says which to remove; never a kernel taken from stale or damaged bytes:

- the ``.npy`` and sidecar deleted (what the refusal message advises) while a log
  survives; the ``.npy`` alone deleted; the sidecar alone deleted;
- a truncated ``.npy`` with a partial and with a full log, truncated into its header;
- a garbled, edited or binary log line; a corrupt, foreign or old sidecar;
- a file longer than its kernel, another ``.npy`` in its place, flipped bytes;

and a finished file is a standard ``.npy`` whose logs tell how many blocks are
done. The undamaged cases (out of core equals in memory, reuse, refused requests,
torn log lines) are in ``test_blocked_store_resume.py``.

The shared model and batches of ``tests/test_blocked.py`` (``N = 10`` in blocks of
3: 10 blocks of the symmetric schedule).
"""

from __future__ import annotations

import functools
import json
import os
import pathlib

import numpy as np
import pytest

import blocked_worker as worker
import ntklayers
from reference import TOL64, assert_rel_close

N, B = 10, 3
F, P, X, X2 = worker.problem(N, 7)
BLOCKS = 10


@functools.lru_cache(maxsize=None)
def expected() -> np.ndarray:
  return np.asarray(ntklayers.ntk(F, P, X))


def run(path, params=P) -> np.ndarray:
  k = ntklayers.ntk_blocked(F, params, X, block_size=B, out=path, progress=False)
  return np.asarray(k)


def exact(path) -> None:
  """A run on ``path`` gives the exact kernel; a second one warns about nothing
  and rewrites nothing."""
  assert_rel_close(run(path), expected(), TOL64)
  before = snapshot(path)
  assert_rel_close(run(path), expected(), TOL64)
  assert snapshot(path) == before


def files(path) -> list[str]:
  names = [str(path), f"{path}.ntk.json", f"{path}.ntk.p0.log"]
  return [n for n in names if os.path.exists(n)]


def snapshot(path) -> dict[str, bytes]:
  return {n: pathlib.Path(n).read_bytes() for n in files(path)}


def log_lines(path) -> list[bytes]:
  with open(f"{path}.ntk.p0.log", "rb") as fh:
    return fh.read().splitlines(keepends=True)


def set_log(path, lines: list[bytes]) -> None:
  with open(f"{path}.ntk.p0.log", "wb") as fh:
    fh.write(b"".join(lines))


def data_offset(path) -> int:
  with open(path, "rb") as fh:
    np.lib.format.read_magic(fh)
    np.lib.format.read_array_header_1_0(fh)
    return fh.tell()


def names_every_file(message: str, path) -> None:
  for name in files(path):
    assert repr(name) in message, (name, message)


@pytest.fixture
def done(tmp_path):
  """A finished kernel file."""
  path = tmp_path / "k.npy"
  run(path)
  return path


# ------------------------------------------------------------ stale logs ---


def test_stale_log_after_deleting_npy_and_sidecar(done):
  """Deleting the ``.npy`` and its sidecar starts over: the surviving log of the
  earlier run does not count (it gave an all-zero kernel, without a word)."""
  stale = log_lines(done)
  os.remove(done)
  os.remove(f"{done}.ntk.json")
  k = run(done)
  assert np.abs(k).max() > 0
  assert_rel_close(k, expected(), TOL64)
  assert not set(log_lines(done)) & set(stale) and len(log_lines(done)) == BLOCKS


def test_refusal_lists_every_file_and_following_it_starts_over(done):
  with pytest.raises(ValueError, match="params: recorded") as e:
    run(done, params=jax_scaled(P, 1.5))
  names_every_file(str(e.value), done)
  assert f"{done}.ntk.p0.log" in str(e.value)
  for name in files(done):  # exactly what the message says
    os.remove(name)
  assert_rel_close(run(done, params=jax_scaled(P, 1.5)),
                   np.asarray(ntklayers.ntk(F, jax_scaled(P, 1.5), X)), TOL64)


def jax_scaled(tree, c):
  return {m: {n: c * v for n, v in leaves.items()} for m, leaves in tree.items()}


def test_npy_deleted_alone(done):
  os.remove(done)
  with pytest.warns(RuntimeWarning, match=rf"{done}.*was missing.*{BLOCKS} blocks"):
    k = run(done)
  assert_rel_close(k, expected(), TOL64)
  exact(done)


def test_sidecar_deleted_alone(done):
  os.remove(f"{done}.ntk.json")
  with pytest.raises(FileExistsError, match="no progress file") as e:
    run(done)
  names_every_file(str(e.value), done)


# ------------------------------------------------------------- truncated ---


@pytest.mark.parametrize("kept_lines", [BLOCKS, 4], ids=["full-log", "partial-log"])
def test_truncated_npy_is_extended_and_recomputed(done, kept_lines):
  set_log(done, log_lines(done)[:kept_lines])
  size = os.path.getsize(done)
  offset = data_offset(done)
  os.truncate(done, offset + (size - offset) // 3)
  with pytest.warns(RuntimeWarning, match=rf"{done}.*was truncated") as w:
    k = run(done)
  assert "do not match their checksums" in str(w[0].message)
  assert os.path.getsize(done) == size
  assert_rel_close(k, expected(), TOL64)
  assert len(log_lines(done)) == BLOCKS
  exact(done)


@pytest.mark.parametrize("size", [0, 5, 100])
def test_truncated_into_its_header_is_refused(done, size):
  os.truncate(done, size)
  before = snapshot(done)
  with pytest.raises(ValueError, match=r"\.npy header") as e:
    run(done)
  names_every_file(str(e.value), done)
  assert "to start over" in str(e.value)
  assert snapshot(done) == before


# ------------------------------------------------------------------ logs ---


@pytest.mark.parametrize("damage", ["junk", "binary", "edited_pair", "edited_crc",
                                    "other_run", "out_of_schedule"])
def test_garbled_log_line_is_dropped_with_a_warning(done, damage):
  lines = log_lines(done)
  set_log(done, lines[:5] + [_damaged(lines[5], damage)] + lines[6:])  # an off-diagonal
  with pytest.warns(RuntimeWarning, match=rf"1 unreadable lines of '{done}.ntk.p0.log'"):
    k = run(done)
  assert_rel_close(k, expected(), TOL64)
  assert len(log_lines(done)) == BLOCKS and _damaged(lines[5], damage) not in log_lines(done)
  exact(done)


def _damaged(line: bytes, damage: str) -> bytes:
  """``line`` (``<run id> <i> <j> <block crc> <line crc>``) garbled or edited."""
  if damage == "junk":
    return b"garbage here\n"
  if damage == "binary":
    return b"\xff\xfe\x00\x01 1 2\n"
  run_id, i, j, crc, check = line.decode().split()
  return {
      "edited_pair": f"{run_id} {j} {i} {crc} {check}\n",
      "edited_crc": f"{run_id} {i} {j} {int(crc, 16) ^ 1:08x} {check}\n",
      "other_run": f"0123456789abcdef {i} {j} {crc} {check}\n",
      "out_of_schedule": f"{run_id} 7 9 {crc} {check}\n",
  }[damage].encode()


def test_logged_block_with_flipped_bytes_is_recomputed(done):
  offset = data_offset(done)
  with open(done, "r+b") as fh:
    fh.seek(offset + 8 * 17)
    fh.write(b"\x7f")
  with pytest.warns(RuntimeWarning, match=rf"1 blocks logged as finished in '{done}' do "
                    r"not match their checksums"):
    k = run(done)
  assert_rel_close(k, expected(), TOL64)
  exact(done)


# --------------------------------------------------------------- sidecar ---


@pytest.mark.parametrize("content", [b'{"block_size": 3, "par', b"\xff\xfe", b"[1, 2]",
                                     b"{}", b'{"format": 1, "block_size": 3}'],
                         ids=["cut", "binary", "list", "empty", "old-format"])
def test_corrupt_or_foreign_sidecar_is_refused(done, content):
  with open(f"{done}.ntk.json", "wb") as fh:
    fh.write(content)
  with pytest.raises(ValueError, match=r"progress file .*ntk\.json") as e:
    run(done)
  assert not isinstance(e.value, json.JSONDecodeError)
  names_every_file(str(e.value), done)
  assert "to start over" in str(e.value)


def test_sidecar_without_a_run_id_is_refused(done):
  with open(f"{done}.ntk.json", encoding="utf-8") as fh:
    record = json.load(fh)
  del record["run"]
  with open(f"{done}.ntk.json", "w", encoding="utf-8") as fh:
    json.dump(record, fh)
  with pytest.raises(ValueError, match="run id") as e:
    run(done)
  names_every_file(str(e.value), done)


# ------------------------------------------------------------ wrong file ---


def test_longer_file_is_refused(done):
  with open(done, "ab") as fh:
    fh.write(b"\0" * 64)
  with pytest.raises(ValueError, match=r"more than the .* of its kernel") as e:
    run(done)
  names_every_file(str(e.value), done)


@pytest.mark.parametrize("replacement", [np.zeros(3), np.zeros((N, N, 3, 3), np.float32),
                                         np.zeros((N, N, 3, 3)).T],
                         ids=["shape", "dtype", "fortran"])
def test_another_npy_in_its_place_is_refused(done, replacement):
  np.save(done, replacement)
  with pytest.raises(ValueError, match=r"does not start with the \.npy header") as e:
    run(done)
  names_every_file(str(e.value), done)


def test_result_is_a_standard_npy(done):
  k = np.load(done, mmap_mode="r")
  assert isinstance(k, np.memmap) and k.shape == (N, N, 3, 3)
  assert_rel_close(np.asarray(k), expected(), TOL64)


# -------------------------------------------------------------- progress ---


def test_progress_tells_an_unfinished_kernel(done, tmp_path):
  """``_store.progress``: how many blocks a kernel file's logs finished, for readers
  of the file (an unfinished kernel's missing blocks read as zeros)."""
  from ntklayers._large import _store  # pylint: disable=g-import-not-at-top
  assert _store.progress(str(done)) == (BLOCKS, BLOCKS)
  set_log(done, log_lines(done)[:4] + [b"garbage\n"])
  assert _store.progress(str(done)) == (4, BLOCKS)
  assert _store.progress(str(tmp_path / "other.npy")) is None
