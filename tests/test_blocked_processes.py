"""``ntk_blocked`` over more devices and processes, in subprocesses
(``tests/blocked_worker.py``): 4 CPU devices (set by ``jax_num_cpu_devices`` or by
XLA_FLAGS), and two processes under ``jax.distributed`` (gloo collectives) writing
one ``out=`` file, each with its own progress log. Every kernel equals the
single-device unblocked one (``N = 10``, ``N2 = 7``, blocks of 3).
"""

from __future__ import annotations

import functools
import socket

import numpy as np
import pytest

import blocked_procs as procs
import blocked_worker as worker
import ntklayers
from reference import assert_rel_close

N, N2, B = 10, 7, 3
F, P, X, X2 = worker.problem(N, N2)


@functools.lru_cache(maxsize=None)
def unblocked(x2: bool = False) -> np.ndarray:
  return np.asarray(ntklayers.ntk(F, P, X, X2 if x2 else None))


def _check_devices_result(tmp_path, save) -> None:
  with np.load(save) as r:
    assert int(r["devices"]) == 4
    assert_rel_close(r["sym"], unblocked(), 1e-12)
    assert_rel_close(r["asym"], unblocked(x2=True), 1e-12)
    assert_rel_close(r["ooc"], unblocked(), 1e-12)
  pairs = procs.logged_pairs(tmp_path / "k.npy")
  assert len(pairs) == len(set(pairs)) and set(pairs) == procs.upper_pairs(4)


@pytest.mark.parametrize("how", [
    "config", pytest.param("xla_flags", marks=pytest.mark.slow)])
def test_four_devices(tmp_path, how):
  """4 CPU devices, set by ``jax_num_cpu_devices`` or by XLA_FLAGS (the worker
  checks ``len(jax.devices()) == 4``): equal to the single-device unblocked kernel."""
  env = procs.env()
  if how == "xla_flags":
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "")
                        + " --xla_force_host_platform_device_count=4").strip()
  save = tmp_path / "r.npz"
  procs.run("devices", env, how=how, devices=4, n1=N, n2=N2, block_size=B,
            out=str(tmp_path / "k.npy"), save=str(save))
  _check_devices_result(tmp_path, save)


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def test_two_processes(tmp_path):
  """Two processes (one CPU device each, gloo) write one file and each compute the
  in-memory kernel; both equal the unblocked kernel, the blocks split between them."""
  path, save = tmp_path / "k.npy", tmp_path / "mem.npy"
  port = _free_port()
  workers = [procs.start("distributed", port=port, process=k, n1=N, block_size=B,
                         out=str(path), save=str(save)) for k in range(2)]
  try:
    for proc in workers:
      procs.finish(proc)
  finally:
    for proc in workers:
      if proc.poll() is None:
        proc.kill()
        proc.communicate()
  assert_rel_close(np.load(path), unblocked(), 1e-12)
  assert_rel_close(np.load(save), unblocked(), 1e-12)
  pairs = procs.logged_pairs(path)
  assert len(pairs) == len(set(pairs)) and set(pairs) == procs.upper_pairs(4)
  for k in range(2):
    with open(f"{path}.ntk.p{k}.log", encoding="ascii") as fh:
      assert fh.read().strip(), f"process {k} computed no block"


def test_two_processes_resume_a_damaged_file(tmp_path):
  """Process 0 repairs what both processes left (a truncated file, a lost line of
  process 1's log) before either reads its progress: both resume the same blocks
  and the file is exact."""
  path, save = tmp_path / "k.npy", tmp_path / "mem.npy"
  for damage in (False, True):
    if damage:
      with open(path, "r+b") as fh:
        fh.truncate(fh.seek(0, 2) * 2 // 3)
      with open(f"{path}.ntk.p1.log", "rb") as fh:
        lines = fh.readlines()
      with open(f"{path}.ntk.p1.log", "wb") as fh:
        fh.write(b"".join(lines[:-1]))
    port = _free_port()
    workers = [procs.start("distributed", port=port, process=k, n1=N, block_size=B,
                           out=str(path), save=str(save)) for k in range(2)]
    try:
      errs = [procs.wait(proc)[1] for proc in workers]
    finally:
      for proc in workers:
        if proc.poll() is None:
          proc.kill()
          proc.communicate()
    assert [proc.returncode for proc in workers] == [0, 0], [e[-3000:] for e in errs]
  assert "was truncated" in errs[0] and "was truncated" not in errs[1]
  assert_rel_close(np.load(path), unblocked(), 1e-12)
  pairs = procs.logged_pairs(path)
  assert len(pairs) == len(set(pairs)) and set(pairs) == procs.upper_pairs(4)
