"""Resuming ``ntk_blocked(out=...)`` trusts a block only when its bytes, its log
line and the sidecar belong to the same request (issue 17, class 2).

Every damaged-file case is either repaired with a warning that names the file
(and the kernel is exact) or refused with an error that names the file(s) and
says which to remove; never a kernel taken from stale or damaged bytes:

- the ``.npy`` and sidecar deleted (what the refusal message advises) while a log
  survives; the ``.npy`` alone deleted; the sidecar alone deleted;
- a truncated ``.npy`` with a partial and with a full log, truncated into its header;
- a garbled, edited or binary log line; a corrupt, foreign or old sidecar;
- a file longer than its kernel, another ``.npy`` in its place, flipped bytes;

and the undamaged cases: every schedule written out of core equals the in-memory
kernel, a finished file is reused without writing, a different request or model is
refused naming the field, a file not written by ``ntk_blocked`` is refused, a torn
last log line (what ``kill -9`` leaves) is dropped silently.

The shared model and batches of ``tests/test_blocked.py`` (``N = 10`` in blocks of
3: 10 blocks of the symmetric schedule).
"""

from __future__ import annotations

import functools
import json
import os
import pathlib

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import blocked_procs as procs
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


# ------------------------------------------------------------- out paths ---


def test_out_in_a_missing_directory_or_a_directory(tmp_path):
  with pytest.raises(FileNotFoundError, match=r"the directory .*nodir' does not exist"):
    run(tmp_path / "nodir" / "k.npy")
  with pytest.raises(ValueError, match=r"is a directory; pass the path of a file in it"):
    run(tmp_path)
  assert not os.listdir(tmp_path)


# ------------------------------------------------ out of core, resumed ---

KINDS = {  # schedule: (x2, axes, number of blocks with B = 3)
    "upper": (None, {}, 10),
    "full": (X2, {}, 4 * 3),
    "diagonal": (None, dict(diagonal_axes=0), 4),
}


@pytest.mark.parametrize("kind", list(KINDS))
def test_out_of_core_equals_in_memory(tmp_path, kind):
  x2, axes, blocks = KINDS[kind]
  path = tmp_path / "k.npy"
  in_memory = ntklayers.ntk_blocked(F, P, X, x2, block_size=B, **axes)
  k = ntklayers.ntk_blocked(F, P, X, x2, block_size=B, out=path, **axes)
  assert isinstance(k, np.memmap) and not k.flags.writeable
  np.testing.assert_array_equal(k, in_memory)
  np.testing.assert_array_equal(np.load(path), in_memory)
  with open(f"{path}.ntk.json", encoding="utf-8") as fh:
    recorded = json.load(fh)
  assert recorded["block_size"] == B and recorded["shape"] == list(in_memory.shape)
  pairs = procs.logged_pairs(path)
  assert len(pairs) == len(set(pairs)) == blocks
  if kind == "upper":
    assert set(pairs) == procs.upper_pairs(4)

  # The same request again (block_size given, or taken from the record): nothing
  # is recomputed, nothing is written.
  before, mtime = procs.files_of(path), os.stat(path).st_mtime_ns
  for block_size in (B, None):
    again = ntklayers.ntk_blocked(F, P, X, x2, block_size=block_size, out=path, **axes)
    np.testing.assert_array_equal(again, in_memory)
  assert procs.files_of(path) == before and os.stat(path).st_mtime_ns == mtime


def test_resume_refuses_a_different_request(tmp_path):
  path = tmp_path / "k.npy"
  ntklayers.ntk_blocked(F, P, X, block_size=B, out=path)
  before = procs.files_of(path)
  different = {
      "params": dict(params=jax.tree.map(lambda a: 1.5 * a, P)),
      "inputs": dict(x1=X + 1.0),
      "block_size": dict(block_size=5),
      "options": dict(trace_axes=-1),
  }
  for field, change in different.items():
    kw = dict(params=P, x1=X, block_size=B) | change
    with pytest.raises(ValueError, match=rf"{field}: recorded .*, now ") as e:
      ntklayers.ntk_blocked(F, kw.pop("params"), kw.pop("x1"), out=path, **kw)
    named = {k for k in ("params", "inputs", "block_size", "options", "model_kwargs",
                         "model") if f"{k}: recorded" in str(e.value)}
    assert named == {field}, (field, str(e.value))
  assert procs.files_of(path) == before  # a refused request writes nothing
  assert_rel_close(ntklayers.ntk_blocked(F, P, X, out=path), expected(), TOL64)


def _mlp_sin(x):
  """``blocked_worker.F`` with ``sin`` for ``tanh``: the same parameters."""
  x = jnp.sin(ntklayers.Linear(6)(x))
  x = jax.nn.relu(hk.Linear(5)(x))
  return ntklayers.Linear(3)(x)


MLP_SIN = hk.without_apply_rng(hk.transform(_mlp_sin))


def test_resume_refuses_a_different_model(tmp_path):
  path = tmp_path / "k.npy"
  ntklayers.ntk_blocked(F, P, X, block_size=B, out=path)
  with pytest.raises(ValueError, match="model: recorded"):
    ntklayers.ntk_blocked(MLP_SIN.apply, P, X, block_size=B, out=path)


def test_out_refuses_a_foreign_file(tmp_path):
  path = tmp_path / "k.npy"
  np.save(path, np.zeros(3))
  with pytest.raises(FileExistsError, match="not written by ntk_blocked"):
    ntklayers.ntk_blocked(F, P, X, block_size=B, out=path)
  np.testing.assert_array_equal(np.load(path), np.zeros(3))
  assert not os.path.exists(f"{path}.ntk.json")


def test_resume_after_a_torn_log_line(tmp_path):
  """A process killed while appending its log line leaves a torn last line; the
  run resumed after it, and every later run, must still read the log."""
  path = tmp_path / "k.npy"
  ntklayers.ntk_blocked(F, P, X, block_size=B, out=path)
  log = f"{path}.ntk.p0.log"
  with open(log, encoding="ascii") as fh:
    lines = fh.readlines()
  with open(log, "w", encoding="ascii") as fh:  # the last 2 blocks unlogged, one torn
    fh.write("".join(lines[:-2]) + lines[-2][:2])
  for _ in range(2):  # resumed after the torn line, then read again
    assert_rel_close(ntklayers.ntk_blocked(F, P, X, block_size=B, out=path), expected(),
                     TOL64)
  pairs = procs.logged_pairs(path)
  assert set(pairs) == procs.upper_pairs(4)


def test_progress_tells_an_unfinished_kernel(done, tmp_path):
  """``_store.progress``: how many blocks a kernel file's logs finished, for readers
  of the file (an unfinished kernel's missing blocks read as zeros)."""
  from ntklayers._large import _store  # pylint: disable=g-import-not-at-top
  assert _store.progress(str(done)) == (BLOCKS, BLOCKS)
  set_log(done, log_lines(done)[:4] + [b"garbage\n"])
  assert _store.progress(str(done)) == (4, BLOCKS)
  assert _store.progress(str(tmp_path / "other.npy")) is None


def test_block_size_larger_than_the_batch_resumes(tmp_path):
  """``block_size`` > N is capped at N when planned (and recorded so): the same call
  again resumes instead of being refused as ``block_size: recorded 10, now 16``
  (found by tests/test_fuzz_blocked.py)."""
  path = tmp_path / "k.npy"
  for _ in range(2):
    k = ntklayers.ntk_blocked(F, P, X, block_size=16, out=path, progress=False)
    assert_rel_close(np.asarray(k), expected(), TOL64)
