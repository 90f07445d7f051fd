"""``kill -9`` at any instant loses at most the blocks in flight (issue 17, class 2).

The ``.npy`` store is driven by a light worker (``tests/blocked_store_worker.py``:
no JAX, a fraction of a second per run) with precomputed blocks, killed with
SIGKILL at random instants (``test_kill9_at_random_points``, >= 20 kills) and at
every kind of point of a round (``test_kill9_at_each_point``): while the sidecar
exists but the ``.npy`` does not, between a block and its mirror image, after a
round's bytes but before they are durable and logged, and halfway through a log
write. Every resumed run must finish a file byte-identical to an uninterrupted
one, log every block exactly once, and warn about nothing (the workers run with
``-W error``: a kill is not damage).

End to end (``ntk_blocked`` in ``tests/blocked_worker.py``): a run interrupted by
SIGKILL or SIGINT after 2 blocks and resumed writes the same bytes as an
uninterrupted one; ``test_ntk_blocked_kill9_at_random_points`` (slow) kills it 20
times at random blocks.
"""

from __future__ import annotations

import collections
import filecmp
import json
import os
import random
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

import blocked_procs as procs
import blocked_store_worker as sw
import blocked_worker as worker
import ntklayers
from reference import TOL64, assert_rel_close

STORE_WORKER = os.path.join(procs.REPO, "tests", "blocked_store_worker.py")
TIMEOUT = 120
N, B = 30, 4  # 8 tiles: 36 blocks (28 with a mirror image), 18 rounds
PAUSE = 0.006
KILLS, SEED = 20, 1717


def logged(path) -> list[tuple[int, int]]:
  """Pairs of every complete line of every log of ``path``."""
  pairs = []
  for k in range(4):
    name = f"{path}.ntk.p{k}.log"
    if os.path.exists(name):
      with open(name, encoding="ascii") as fh:
        pairs += [(int(line.split()[1]), int(line.split()[2])) for line in fh
                  if line.endswith("\n")]
  return pairs


def _start(path, **args) -> subprocess.Popen:
  argv = json.dumps(dict(out=str(path), n=N, b=B, pause=PAUSE) | args)
  return subprocess.Popen([sys.executable, "-W", "error", STORE_WORKER, argv], cwd=procs.REPO,
                          env=procs.env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True)


def _wait(proc: subprocess.Popen) -> tuple[str, str]:
  try:
    return proc.communicate(timeout=TIMEOUT)
  except subprocess.TimeoutExpired:
    proc.kill()
    out, err = proc.communicate()
    pytest.fail(f"store worker timed out:\n{err[-3000:]}")


def _complete(path, **args) -> float:
  """Runs a worker to the end (it must succeed, warning about nothing); returns the
  seconds it spent writing."""
  proc = _start(path, **args)
  out, err = _wait(proc)
  assert proc.returncode == 0 and "DONE" in out, (proc.returncode, err[-3000:])
  return float(out.split("DONE")[1].split()[0])


def _kill_after(path, delay: float, seed: int) -> bool:
  """Starts a worker, SIGKILLs it ``delay`` seconds after it is ready; whether it
  was killed (rather than finished first)."""
  proc = _start(path, seed=seed)
  try:
    assert proc.stdout is not None and proc.stdout.readline().strip() == "READY"
    time.sleep(delay)
    proc.send_signal(signal.SIGKILL)
    _, err = _wait(proc)
  finally:
    if proc.poll() is None:
      proc.kill()
      proc.communicate()
  assert proc.returncode in (0, -signal.SIGKILL), (proc.returncode, err[-3000:])
  return proc.returncode == -signal.SIGKILL


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  """``(path, seconds)``: an uninterrupted file and how long its writes took."""
  path = tmp_path_factory.mktemp("reference") / "k.npy"
  seconds = _complete(path)
  np.testing.assert_array_equal(np.load(path), sw.expected(N, B))
  return path, seconds


def _check_resumed(path, reference_path) -> None:
  assert filecmp.cmp(path, reference_path, shallow=False)
  counts = collections.Counter(logged(path))
  assert set(counts) == set(sw.schedule(N, B)) and set(counts.values()) == {1}, counts
  assert not [n for n in os.listdir(os.path.dirname(path)) if n.endswith(".tmp")]


def test_kill9_at_random_points(tmp_path, reference):
  """>= 20 runs, each killed at a random instant (some killed again while
  resuming), then resumed to the end: byte-identical, every block logged once."""
  ref_path, seconds = reference
  rng = random.Random(SEED)
  kills = runs = 0
  while kills < KILLS:
    runs += 1
    assert runs <= 3 * KILLS, f"only {kills} of {runs} workers were killed mid-run"
    path = tmp_path / f"run{runs}" / "k.npy"
    path.parent.mkdir()
    for attempt in range(rng.choice([1, 1, 2])):
      if _kill_after(path, rng.uniform(0, 1.1 * seconds), seed=runs * 10 + attempt):
        kills += 1
    _complete(path, seed=runs)
    _check_resumed(path, ref_path)


@pytest.mark.parametrize("die", [
    ("create", 1), ("write", 1), ("write", 2), ("write", 9), ("write", 40),
    ("commit", 1), ("commit", 6), ("line", 1), ("line", 7)],
    ids=lambda d: f"{d[0]}{d[1]}" if isinstance(d, tuple) else str(d))
def test_kill9_at_each_point(tmp_path, reference, die):
  """Killed at a chosen point of the write protocol, then resumed."""
  path = tmp_path / "k.npy"
  proc = _start(path, die=list(die), pause=0.0)
  _, err = _wait(proc)
  assert proc.returncode == -signal.SIGKILL, (proc.returncode, err[-3000:])
  if die[0] == "line":  # the torn line is on disk, and is dropped silently on resume
    with open(f"{path}.ntk.p0.log", "rb") as fh:
      assert not fh.read().endswith(b"\n")
  before = set(logged(path)) if os.path.exists(f"{path}.ntk.p0.log") else set()
  _complete(path, pause=0.0)
  assert before <= set(logged(path))  # kept, not recomputed (each is logged once)
  _check_resumed(path, reference[0])


def test_interrupt_after_logging_does_not_log_twice(tmp_path):
  """A KeyboardInterrupt right after a round's lines are logged (while the log is
  fsync'd): closing the store must not log them again."""
  store_mod = sw.load_store()

  class Interrupted(store_mod.NpyStore):
    def _append(self, lines):
      super()._append(lines)
      raise KeyboardInterrupt

  path = str(tmp_path / "k.npy")
  store = Interrupted(path, (N, N, *sw.INNER), np.float64, sw.request(N, B),
                      sw.regions(N, B), sw.schedule(N, B))
  store.create_or_check()
  store.open()
  pair = sw.schedule(N, B)[0]
  store.put(pair, [(sw.regions(N, B)(pair)[0], sw.block(N, B, pair))])
  with pytest.raises(KeyboardInterrupt):
    try:
      store.commit()
    finally:
      store.close()
  assert logged(path) == [pair]


# ------------------------------------------------------------- end to end ---


KILL_N, KILL_B = 24, 2  # 12 tiles: 78 blocks, in rounds of 2 (2 devices)
KILL_BLOCKS = procs.upper_pairs(KILL_N // KILL_B)


def _write(path, slow: float = 0.0, strict: bool = False):
  """``ntk_blocked`` of ``blocked_worker``'s model into ``path`` (``strict``: a
  RuntimeWarning, e.g. of a repair, is an error)."""
  return procs.start("write", python_args=("-W", "error::RuntimeWarning") if strict else (),
                     out=str(path), n=KILL_N, block_size=KILL_B, devices=2, slow=slow)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
  """``get() -> path`` of a kernel file written by an uninterrupted worker, started
  once per module and waited for when first needed (it runs beside the first
  interrupted worker)."""
  path = tmp_path_factory.mktemp("uninterrupted") / "k.npy"
  proc = _write(path)
  done = []

  def get():
    if not done:
      procs.finish(proc)
      done.append(True)
    return path

  yield get
  if proc.poll() is None:
    proc.kill()
    proc.communicate()


def _interrupt(path, sig: int, logged_before: int = 2) -> list[tuple[int, int]]:
  """Runs a slowed-down worker writing ``path`` and sends it ``sig`` once
  ``logged_before`` blocks are logged; returns the blocks logged before it died."""
  proc = _write(path, slow=0.02)
  deadline = time.monotonic() + procs.TIMEOUT
  try:
    while len(procs.logged_pairs(path)) < logged_before:
      assert proc.poll() is None, ("worker exited before the blocks were logged",
                                   proc.communicate()[1][-3000:])
      assert time.monotonic() < deadline, "no block logged in time"
      time.sleep(0.005)
    proc.send_signal(sig)
    _, err = procs.wait(proc)
  finally:
    if proc.poll() is None:
      proc.kill()
      proc.communicate()
  assert proc.returncode != 0, "the worker finished before the signal"
  if sig == signal.SIGKILL:
    assert proc.returncode == -signal.SIGKILL
  else:
    assert "KeyboardInterrupt" in err, err[-3000:]
  assert os.path.exists(f"{path}.ntk.p0.log") or not logged_before
  return procs.logged_pairs(path)


def _resumed(path, before: list, reference) -> None:
  """Resumes ``path`` (warning about nothing): byte-identical to ``reference``, the
  earlier lines kept, every block logged once."""
  procs.finish(_write(path, strict=True))
  after = procs.logged_pairs(path)
  assert after[:len(before)] == before  # the resumed run only appended
  counts = collections.Counter(after)
  assert set(counts) == KILL_BLOCKS and set(counts.values()) == {1}  # no block twice
  assert filecmp.cmp(path, reference, shallow=False)


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGINT], ids=["SIGKILL", "SIGINT"])
def test_resume_after_interrupt_is_byte_identical(tmp_path, uninterrupted, sig):
  path = tmp_path / "k.npy"
  before = _interrupt(path, sig)
  assert 2 <= len(before) < len(KILL_BLOCKS), len(before)  # killed mid-run
  _resumed(path, before, uninterrupted())
  f, p, x, _ = worker.problem(KILL_N)
  assert_rel_close(np.load(path), ntklayers.ntk(f, p, x), TOL64)


@pytest.mark.slow
def test_ntk_blocked_kill9_at_random_points(tmp_path, uninterrupted):
  """``ntk_blocked`` killed 20 times, each after a random number of logged blocks
  (0 to 70 of 78), then resumed: every file byte-identical to an uninterrupted
  one (about 4 minutes on 2 cores)."""
  rng = random.Random(SEED)
  for run in range(KILLS):
    path = tmp_path / f"run{run}.npy"
    before = _interrupt(path, signal.SIGKILL, logged_before=rng.randrange(0, 70))
    _resumed(path, before, uninterrupted())
