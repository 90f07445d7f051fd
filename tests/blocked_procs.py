"""Parent-side helpers of the ``ntk_blocked`` tests: the progress logs of an
``out=`` file, and ``tests/blocked_worker.py`` subprocesses (started, waited for,
checked). Standard library only (no JAX)."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKER = os.path.join(REPO, "tests", "blocked_worker.py")
TIMEOUT = 180  # seconds; a hang fails the test instead of blocking CI


def logged_pairs(path) -> list[tuple[int, int]]:
  """The finished blocks of every process's log of ``path``, in order (lines
  ``<run id> <i> <j> <block crc> <line crc>``; a torn last line is skipped)."""
  pairs = []
  for k in range(8):
    log = f"{path}.ntk.p{k}.log"
    if os.path.exists(log):
      with open(log, encoding="ascii") as fh:
        pairs += [(int(line.split()[1]), int(line.split()[2])) for line in fh
                  if line.endswith("\n")]
  return pairs


def upper_pairs(tiles: int) -> set[tuple[int, int]]:
  return {(i, j) for i in range(tiles) for j in range(i, tiles)}


def files_of(path) -> dict[str, bytes]:
  """The bytes of the kernel file and its sidecars."""
  names = [str(path), f"{path}.ntk.json"] + [f"{path}.ntk.p{k}.log" for k in range(2)]
  return {n: pathlib.Path(n).read_bytes() for n in names if os.path.exists(n)}


def env(**extra) -> dict[str, str]:
  """The environment of a worker: CPU only, the repository importable."""
  out = dict(os.environ, JAX_PLATFORMS="cpu", **extra)
  out["PYTHONPATH"] = os.pathsep.join(
      p for p in (REPO, os.environ.get("PYTHONPATH", "")) if p)
  return out


def start(mode: str, environ: dict | None = None, python_args: tuple = (),
          **args) -> subprocess.Popen:
  """``python tests/blocked_worker.py MODE '<args>'`` in the background."""
  return subprocess.Popen([sys.executable, *python_args, WORKER, mode, json.dumps(args)],
                          cwd=REPO, env=environ or env(), stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)


def finish(proc: subprocess.Popen, timeout: float = TIMEOUT) -> str:
  """Waits for a worker (killed after ``timeout``) and checks that it succeeded."""
  out, err = wait(proc, timeout)
  assert proc.returncode == 0 and "DONE" in out, (proc.returncode, err[-3000:])
  return out


def wait(proc: subprocess.Popen, timeout: float = TIMEOUT) -> tuple[str, str]:
  """``(stdout, stderr)`` of a worker; fails the test if it runs past ``timeout``."""
  try:
    return proc.communicate(timeout=timeout)
  except subprocess.TimeoutExpired:
    proc.kill()
    _, err = proc.communicate()
    pytest.fail(f"worker timed out after {timeout} s:\n{err[-3000:]}")


def run(mode: str, environ: dict | None = None, **args) -> str:
  return finish(start(mode, environ, **args))
