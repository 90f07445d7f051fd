"""``ntk_blocked(out=...)`` on undamaged files (issue 17, class 2): every schedule
written out of core equals the in-memory kernel, a finished file is reused without
writing, a different request or model is refused naming the field, a file not
written by ``ntk_blocked`` is refused, a torn last log line (what ``kill -9``
leaves) is dropped silently, ``out`` in a missing directory or naming a directory
is refused, and a ``block_size`` larger than the batch resumes.

The model, batches and helpers of ``test_blocked_store.py`` (damaged files):
``N = 10`` in blocks of 3.
"""

from __future__ import annotations

import json
import os

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import blocked_procs as procs
import ntklayers
from reference import TOL64, assert_rel_close
from test_blocked_store import B, F, P, X, X2, expected, run


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


def test_block_size_larger_than_the_batch_resumes(tmp_path):
  """``block_size`` > N is capped at N when planned (and recorded so): the same call
  again resumes instead of being refused as ``block_size: recorded 10, now 16``
  (found by tests/test_fuzz_blocked.py)."""
  path = tmp_path / "k.npy"
  for _ in range(2):
    k = ntklayers.ntk_blocked(F, P, X, block_size=16, out=path, progress=False)
    assert_rel_close(np.asarray(k), expected(), TOL64)
