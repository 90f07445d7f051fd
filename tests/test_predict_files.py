"""``ntklayers.predict`` reads ``ntk_blocked(out=...)`` files only when they are whole."""

from __future__ import annotations

import glob

import numpy as np
import pytest

import blocked_worker as worker
import ntklayers
import ntklayers.predict as npr

F, P, X, _ = worker.problem(10, 7)


def test_an_unfinished_kernel_file_is_refused(tmp_path):
  path = tmp_path / "k.npy"
  k = ntklayers.ntk_blocked(F, P, X, block_size=3, out=path, trace_axes=-1)
  op = npr.KernelOperator.from_npy(path, symmetric=True)  # a finished file: fine
  ones = np.ones((op.shape[1], 1))
  np.testing.assert_allclose(op.matmat(ones)[:, 0], np.asarray(k) @ ones[:, 0])
  (log,) = glob.glob(f"{path}.ntk.p*.log")
  with open(log, encoding="ascii") as fh:
    lines = fh.readlines()
  with open(log, "w", encoding="ascii") as fh:  # as if killed before the last round
    fh.writelines(lines[:-1])
  with pytest.raises(ValueError, match=r"unfinished ntk_blocked kernel .* run the same"):
    npr.KernelOperator.from_npy(path, symmetric=True)
  with pytest.raises(ValueError, match="unfinished"):
    npr.KernelOperator.from_array(np.load(path, mmap_mode="r"), symmetric=True)
