"""``ntk_blocked(get=...)``: the NNGP (and NNGP with NTK) in blocks, in memory and out of
core, exact against the in-memory kernels, with the resume and fingerprint protections
of every blocked kernel. The model and batches of ``tests/test_blocked.py``."""

from __future__ import annotations

import os
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import blocked_worker as worker
import ntklayers
from ntklayers._large import _store
from reference import TOL64, assert_rel_close

N, B = 10, 3
F, P, X, X2 = worker.problem(N, 7)


def in_memory(x2=None, **axes):
  return ntklayers.kernel_fn(F, **axes)(P, X, x2)


@pytest.mark.parametrize("x2,axes", [
    (None, {}), (X2, {"trace_axes": (-1,)}), (None, {"diagonal_axes": (0,)}),
    (None, {"trace_axes": (0,)}), (X2, {"diagonal_axes": (-1,)})])
def test_nngp_in_memory_blocks(x2, axes):
  k = ntklayers.ntk_blocked(F, P, X, x2, block_size=B, get="nngp", progress=False, **axes)
  assert isinstance(k, np.ndarray)
  assert_rel_close(k, in_memory(x2, **axes).nngp, TOL64)


def test_both_in_memory():
  k = ntklayers.ntk_blocked(F, P, X, X2, block_size=B, get=("ntk", "nngp"), progress=False)
  ref = in_memory(X2)
  assert k._fields == ("ntk", "nngp")
  assert_rel_close(k.ntk, ref.ntk, TOL64)
  assert_rel_close(k.nngp, ref.nngp, TOL64)
  assert np.array_equal(
      ntklayers.ntk_blocked(F, P, X, X2, block_size=B, get="ntk", progress=False), k.ntk)


def _files(path) -> dict[str, bytes]:
  names = [str(path), f"{path}.ntk.json", f"{path}.ntk.p0.log"]
  return {n: pathlib.Path(n).read_bytes() for n in names if os.path.exists(n)}


def test_two_files_resume_and_refuse(tmp_path, monkeypatch):
  paths = (tmp_path / "nngp.npy", tmp_path / "ntk.npy")
  ref = in_memory()
  write = _store.NpyStore.write
  calls = [0]

  def interrupted(self, *args, **kwargs):
    calls[0] += 1
    if calls[0] > 4:
      raise KeyboardInterrupt
    return write(self, *args, **kwargs)

  monkeypatch.setattr(_store.NpyStore, "write", interrupted)
  with pytest.raises(KeyboardInterrupt):
    ntklayers.ntk_blocked(F, P, X, block_size=B, get=("nngp", "ntk"), out=paths,
                          progress=False)
  monkeypatch.setattr(_store.NpyStore, "write", write)
  done, total = _store.progress(str(paths[0]))
  assert 0 < done < total
  k = ntklayers.ntk_blocked(F, P, X, block_size=B, get=("nngp", "ntk"), out=paths,
                            progress=False)
  assert isinstance(k.nngp, np.memmap) and isinstance(k.ntk, np.memmap)
  assert_rel_close(k.nngp, ref.nngp, TOL64)
  assert_rel_close(k.ntk, ref.ntk, TOL64)
  before = {**_files(paths[0]), **_files(paths[1])}
  again = ntklayers.ntk_blocked(F, P, X, block_size=B, get=("nngp", "ntk"),
                                out={"ntk": paths[1], "nngp": paths[0]}, progress=False)
  assert np.array_equal(again.nngp, k.nngp)
  assert {**_files(paths[0]), **_files(paths[1])} == before  # nothing rewritten
  # An NNGP file is not an NTK file, nor the NNGP of other parameters.
  with pytest.raises(ValueError, match="recorded"):
    ntklayers.ntk_blocked(F, P, X, block_size=B, out=paths[0], progress=False)
  with pytest.raises(ValueError, match="recorded"):
    ntklayers.ntk_blocked(F, P, X, block_size=B, out=paths[1], get="nngp", progress=False)
  other = jax.tree.map(lambda a: 2 * a, P)
  with pytest.raises(ValueError, match="params: recorded"):
    ntklayers.ntk_blocked(F, other, X, block_size=B, out=paths[0], get="nngp", progress=False)


@pytest.mark.parametrize("out,error,match", [
    ("k.npy", TypeError, "one file each"),
    (("a.npy",), TypeError, "one file each"),
    (("a.npy", "a.npy"), ValueError, "one file for two kernels"),
    ({"nngp": "a.npy"}, ValueError, "one path per kernel"),
])
def test_bad_out_for_two_kernels(tmp_path, out, error, match):
  with pytest.raises(error, match=match):
    ntklayers.ntk_blocked(F, P, X, block_size=B, get=("nngp", "ntk"), out=out,
                          progress=False)


def test_one_kernel_needs_one_path():
  with pytest.raises(TypeError, match="one path"):
    ntklayers.ntk_blocked(F, P, X, block_size=B, get="nngp", out=("a.npy",), progress=False)


def test_nngp_refuses_interacting_examples():
  def batch_mean(params, x):
    h = F(params, x)
    return h - jnp.mean(h, axis=0, keepdims=True)

  with pytest.raises(ntklayers.InteractingExamplesError):
    ntklayers.ntk_blocked(batch_mean, P, X, block_size=B, get="nngp", progress=False)
