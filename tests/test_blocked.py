"""``ntk_blocked`` and ``ntk_trace``: blocked kernels equal the unblocked ones.

In process (the CPU backend has 2 devices, see ``conftest``, so blocks are spread
over both): every schedule (symmetric upper triangle, full, per-example
diagonal), block sizes that divide the batch and that do not, trace/diagonal
axes, model keyword arguments, pytree inputs, registry models, float32; the
out-of-core ``.npy`` file, its resume and its refusals; the memory budget; the
errors; the progress bar.

In subprocesses (``tests/blocked_worker.py``): a run killed mid-way (SIGKILL,
SIGINT) and resumed writes the same bytes as an uninterrupted one; 4 CPU
devices; two processes under ``jax.distributed`` writing one file.

Most tests share one tiny model (``blocked_worker.F``: an ``ntklayers.Linear``,
a plain ``hk.Linear`` on the fallback, an ``ntklayers.Linear``) with NumPy
parameters, batches of ``N = 10`` and ``N2 = 7`` examples and ``block_size=3``,
so that they share JAX's compilations. NumPy rather than JAX parameters: see
``test_jax_array_params_emit_no_deprecation_warning`` (a known bug).
"""

from __future__ import annotations

import collections
import filecmp
import functools
import json
import os
import pathlib
import signal
import socket
import subprocess
import sys
import time
import warnings

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import blocked_worker as worker
import models
import ntklayers
import ntklayers.metrics
from reference import (TOL32, TOL64, apply_axes, assert_rel_close, batch_jacobians,
                       full_kernel, rel_err)

N, N2 = 10, 7
B = 3  # the block size most tests share (it divides neither N nor N2)
F, P, X, X2 = worker.problem(N, N2)
X2_SAME_N = worker.inputs(N, seed=2)  # a second batch of N examples (diagonal over N)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKER = os.path.join(REPO, "tests", "blocked_worker.py")
SUBPROCESS_TIMEOUT = 180  # seconds; a hang fails the test instead of blocking CI


@functools.lru_cache(maxsize=None)
def unblocked(x2: str | None = None, trace_axes=(), diagonal_axes=()) -> np.ndarray:
  """``ntklayers.ntk`` of the shared model (``x2``: ``None``, ``"x2"`` or ``"same_n"``)."""
  other = {None: None, "x2": X2, "same_n": X2_SAME_N}[x2]
  return np.asarray(ntklayers.ntk(F, P, X, other, trace_axes=trace_axes,
                                  diagonal_axes=diagonal_axes))


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


# ------------------------------------------------ blocked == unblocked ---


@pytest.mark.parametrize("block_size", [3, 5, 10, 16])
def test_symmetric_equals_unblocked(block_size):
  k = ntklayers.ntk_blocked(F, P, X, block_size=block_size)
  assert type(k) is np.ndarray and k.dtype == np.float64 and k.shape == (N, N, 3, 3)
  assert_rel_close(k, unblocked(), TOL64)


@pytest.mark.parametrize("block_size", [3, 7])
def test_asymmetric_equals_unblocked(block_size):
  k = ntklayers.ntk_blocked(F, P, X, X2, block_size=block_size)
  assert k.shape == (N, N2, 3, 3)
  assert_rel_close(k, unblocked("x2"), TOL64)


@pytest.mark.parametrize("x2,axes", [
    (None, dict(trace_axes=-1)),
    ("x2", dict(trace_axes=-1)),
    (None, dict(diagonal_axes=0)),
    ("same_n", dict(diagonal_axes=0)),
    (None, dict(diagonal_axes=-1)),
    ("x2", dict(diagonal_axes=-1)),
], ids=["trace-1", "trace-1-x2", "diag0", "diag0-x2", "diag-1", "diag-1-x2"])
def test_axes_equal_unblocked(x2, axes):
  other = {None: None, "x2": X2, "same_n": X2_SAME_N}[x2]
  k = ntklayers.ntk_blocked(F, P, X, other, block_size=B, **axes)
  expected = unblocked(x2, **{a: (v,) for a, v in axes.items()})
  assert k.shape == expected.shape
  assert_rel_close(k, expected, TOL64)


def test_default_block_size():
  assert_rel_close(ntklayers.ntk_blocked(F, P, X), unblocked(), TOL64)


def _scaled(x, *, scale, act):
  h = ntklayers.Linear(5)(x) * scale
  h = {"tanh": jnp.tanh, "sin": jnp.sin}[act](h)
  return ntklayers.Linear(2)(h)


SCALED = hk.without_apply_rng(hk.transform(_scaled))


def test_model_kwargs(tmp_path):
  kwargs = dict(scale=np.asarray(1.7), act="sin")  # one traced, one static
  params = jax.tree.map(np.asarray, models.init_params(
      lambda key, x: SCALED.init(key, x, **kwargs), jnp.float64, X))
  k = ntklayers.ntk_blocked(SCALED.apply, params, X, X2, block_size=4, model_kwargs=kwargs)
  expected = ntklayers.ntk(lambda p, x: SCALED.apply(p, x, **kwargs), params, X, X2)
  assert_rel_close(k, expected, TOL64)

  path = tmp_path / "k.npy"
  out = ntklayers.ntk_blocked(SCALED.apply, params, X, X2, block_size=4,
                              model_kwargs=kwargs, out=path)
  np.testing.assert_array_equal(out, k)
  other = dict(kwargs, scale=np.asarray(2.0))
  with pytest.raises(ValueError, match="model_kwargs: recorded") as e:
    ntklayers.ntk_blocked(SCALED.apply, params, X, X2, block_size=4, model_kwargs=other,
                          out=path)
  assert "params: recorded" not in str(e.value) and "inputs: recorded" not in str(e.value)


REGISTRY = {m.name: m for m in models.registry()}


@pytest.mark.parametrize("name", ["conv1d_seq", "cross_attention_mask",
                                  "layernorm_variants", "linen_cnn"])
def test_registry_models(name):
  """A conv with rank-3 outputs, attention on pytree inputs, LayerNorm, a linen
  CNN: batches of 3 and 2 in blocks of 2, against the jacrev reference."""
  model = REGISTRY[name]
  built = model.build(jnp.float64)
  params = jax.tree.map(np.asarray, built.params)
  assert jax.tree.leaves(built.x1)[0].shape[0] == 3
  with models.expect_fallback_warning(model):
    sym = ntklayers.ntk_blocked(built.f, params, built.x1, block_size=2)
    asym = ntklayers.ntk_blocked(built.f, params, built.x1, built.x2, block_size=2)
  j1, j2 = batch_jacobians(built.f, built.params, built.x1, built.x2, coupled=False)
  assert_rel_close(sym, apply_axes(full_kernel(j1, j1), model.out_rank), TOL64)
  assert_rel_close(asym, apply_axes(full_kernel(j1, j2), model.out_rank), TOL64)


def test_float32():
  """float32 in and out; within a few float32 ulps of the unblocked float32 kernel
  (another contraction order) and within ``TOL32`` of the float64 one."""
  f, p32, x32, x2_32 = worker.problem(N, N2, "float32")
  for x2, expected64 in ((None, unblocked()), (x2_32, unblocked("x2"))):
    k = ntklayers.ntk_blocked(f, p32, x32, x2, block_size=B)
    assert k.dtype == np.float32
    expected = np.asarray(ntklayers.ntk(f, p32, x32, x2))
    assert rel_err(k, expected) <= 1e-5
    assert_rel_close(k, expected64, TOL32)


# --------------------------------------------------------------- trace ---


def test_ntk_trace():
  t = ntklayers.ntk_trace(F, P, X, block_size=B)
  assert isinstance(t, float)
  expected = float(ntklayers.metrics.trace(unblocked()))
  assert abs(t - expected) <= TOL64 * abs(expected)


def test_ntk_trace_rank3_outputs():
  built = models.build("conv1d_seq")  # outputs [N, T, C]
  params = jax.tree.map(np.asarray, built.params)
  t = ntklayers.ntk_trace(built.f, params, built.x1, block_size=2)
  expected = float(ntklayers.metrics.trace(ntklayers.ntk(built.f, params, built.x1)))
  assert abs(t - expected) <= TOL64 * abs(expected)


# ---------------------------------------------------------- out of core ---

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
  pairs = logged_pairs(path)
  assert len(pairs) == len(set(pairs)) == blocks
  if kind == "upper":
    assert set(pairs) == upper_pairs(4)

  # The same request again (block_size given, or taken from the record): nothing
  # is recomputed, nothing is written.
  before, mtime = files_of(path), os.stat(path).st_mtime_ns
  for block_size in (B, None):
    again = ntklayers.ntk_blocked(F, P, X, x2, block_size=block_size, out=path, **axes)
    np.testing.assert_array_equal(again, in_memory)
  assert files_of(path) == before and os.stat(path).st_mtime_ns == mtime


def test_resume_refuses_a_different_request(tmp_path):
  path = tmp_path / "k.npy"
  ntklayers.ntk_blocked(F, P, X, block_size=B, out=path)
  before = files_of(path)
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
  assert files_of(path) == before  # a refused request writes nothing
  assert_rel_close(ntklayers.ntk_blocked(F, P, X, out=path), unblocked(), TOL64)


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
    assert_rel_close(ntklayers.ntk_blocked(F, P, X, block_size=B, out=path), unblocked(),
                     TOL64)
  pairs = logged_pairs(path)
  assert set(pairs) == upper_pairs(4)


# --------------------------------------------------------- memory budget ---


def test_memory_budget(tmp_path):
  """A kernel of 6.5 MB: refused in memory under 1 MB (the message suggests
  ``out=``), computed out of core under the same budget in smaller blocks,
  refused with a budget smaller than the inputs even out of core."""
  f, p, x, _ = worker.problem(300)
  with pytest.raises(ntklayers.MemoryBudgetError) as e:
    ntklayers.ntk_blocked(f, p, x, max_memory="1MB")
  msg = str(e.value)
  assert "max_memory=976.56 KiB" in msg and "estimated peak for block_size=" in msg
  assert "kernel in memory 6.18 MiB" in msg and "out=" in msg

  path = tmp_path / "k.npy"
  k = ntklayers.ntk_blocked(f, p, x, max_memory="1MB", out=path)
  with open(f"{path}.ntk.json", encoding="utf-8") as fh:
    assert 1 <= json.load(fh)["block_size"] < 300
  assert_rel_close(k, ntklayers.ntk(f, p, x), TOL64)

  tiny = tmp_path / "tiny.npy"
  with pytest.raises(ntklayers.MemoryBudgetError, match="max_memory=19.53 KiB") as e:
    ntklayers.ntk_blocked(f, p, x, max_memory="20kB", out=tiny)
  assert "out=" not in str(e.value) and "kernel written out of core" in str(e.value)
  assert not os.path.exists(tiny)  # refused before anything is written


@pytest.mark.parametrize("value,error,match", [
    ("12 parsecs", ValueError, r"`max_memory` must look like '2GiB'"),
    ("", ValueError, r"`max_memory` must look like"),
    (-1, ValueError, r"`max_memory` must be positive"),
    (0, ValueError, r"`max_memory` must be positive"),
    (float("nan"), ValueError, r"`max_memory` must be positive"),
    (True, TypeError, r"`max_memory` must be a number of bytes"),
    ([1], TypeError, r"`max_memory` must be a number of bytes"),
])
def test_max_memory_parse_errors(value, error, match):
  with pytest.raises(error, match=match):
    ntklayers.ntk_blocked(F, P, X, block_size=B, max_memory=value)


def test_max_memory_infinite():
  try:
    k = ntklayers.ntk_blocked(F, P, X, block_size=B, max_memory=float("inf"))
  except ValueError as e:
    assert "max_memory" in str(e)
  else:
    assert_rel_close(k, unblocked(), TOL64)


@pytest.mark.parametrize("block_size", [0, -2, "4", True, 2.0])
def test_block_size_errors(block_size):
  with pytest.raises(ValueError, match="`block_size` must be a positive int"):
    ntklayers.ntk_blocked(F, P, X, block_size=block_size)


# ---------------------------------------------------------- interaction ---


def test_interacting_examples(tmp_path):
  with pytest.raises(ntklayers.InteractingExamplesError, match="interact"):
    ntklayers.ntk_blocked(F, P, X, block_size=B, independent_samples=False)
  with pytest.raises(ntklayers.InteractingExamplesError):
    ntklayers.ntk_trace(F, P, X, block_size=B, independent_samples=False)
  path = tmp_path / "k.npy"
  with pytest.raises(ntklayers.InteractingExamplesError):
    ntklayers.ntk_blocked(F, P, X, block_size=B, independent_samples=False, out=path)
  assert not os.path.exists(path)
  built = models.build("batchnorm_train")  # BatchNorm with batch statistics
  with pytest.raises(ntklayers.InteractingExamplesError, match="BatchNorm"):
    ntklayers.ntk_blocked(built.f, jax.tree.map(np.asarray, built.params), built.x1,
                          block_size=2)


def _center_input(x):
  return ntklayers.Linear(2)(x - jnp.mean(x, axis=0, keepdims=True))


def _roll(x):
  return ntklayers.Linear(2)(jnp.roll(x, 1, axis=0))


@pytest.mark.parametrize("fn", [_center_input, _roll], ids=["center_input", "roll"])
def test_coupled_outside_layers_is_refused_or_exact(fn):
  net = hk.without_apply_rng(hk.transform(fn))
  x = X[:4]
  params = jax.tree.map(np.asarray, models.init_params(net.init, jnp.float64, x))
  try:
    k = ntklayers.ntk_blocked(net.apply, params, x, block_size=2)
  except ntklayers.InteractingExamplesError:
    return
  assert_rel_close(k, ntklayers.ntk(net.apply, params, x), TOL64)


COUPLED_OR_PERMUTED = [n for n, m in models.BY_NAME.items()
                       if m.coupled or n.startswith("c2_")]
@pytest.mark.slow
@pytest.mark.parametrize("name", COUPLED_OR_PERMUTED)
def test_registry_coupled_models_are_refused_or_exact(name):
  """Models whose examples interact, or whose layers see the batch permuted:
  ``ntk_blocked`` must refuse them or be exact, never silently differ."""
  model = models.BY_NAME[name]
  built = models.build(name)
  params = jax.tree.map(np.asarray, built.params)
  with models.expect_fallback_warning(model):
    try:
      sym = ntklayers.ntk_blocked(built.f, params, built.x1, block_size=2)
      asym = ntklayers.ntk_blocked(built.f, params, built.x1, built.x2, block_size=2)
    except ntklayers.InteractingExamplesError:
      return
  j1, j2 = batch_jacobians(built.f, built.params, built.x1, built.x2,
                           coupled=model.coupled)
  assert_rel_close(sym, apply_axes(full_kernel(j1, j1), model.out_rank), TOL64)
  assert_rel_close(asym, apply_axes(full_kernel(j1, j2), model.out_rank), TOL64)


# ------------------------------------------------------------ progress ---


def test_progress(capfd):
  ntklayers.ntk_blocked(F, P, X, block_size=B, progress=True)
  err = capfd.readouterr().err
  assert "ntk_blocked" in err and "10/10" in err and "block" in err
  for progress in (False, None):  # None: only on a terminal (pytest captures)
    ntklayers.ntk_blocked(F, P, X, block_size=B, progress=progress)
    captured = capfd.readouterr()
    assert captured.err == "" and captured.out == ""


# ------------------------------------------------------ non-finite, dtype ---


def test_nan_kernel_warns_structured():
  built = models.build("mlp_relu")  # annotated layers only
  params = jax.tree.map(np.array, built.params)
  params["linear"]["w"][0, 0] = np.nan
  with pytest.warns(RuntimeWarning, match="NaN or inf"):
    k = ntklayers.ntk_blocked(built.f, params, built.x1, block_size=2)
  assert np.isnan(k).any()


def test_nan_kernel_warns_fallback():
  params = jax.tree.map(np.array, P)
  params[next(iter(params))]["w"][0, 0] = np.nan
  with warnings.catch_warnings(record=True) as caught:  # (pytest.warns would mask
    warnings.simplefilter("always")                     # the error with its own)
    k = ntklayers.ntk_blocked(F, params, X, block_size=B)
  assert any("NaN or inf" in str(w.message) for w in caught)
  assert np.isnan(k).any()


def test_jax_array_params_emit_no_deprecation_warning():
  params = jax.tree.map(jnp.asarray, P)
  assert_rel_close(ntklayers.ntk_blocked(F, params, X, block_size=B), unblocked(), TOL64)


# --------------------------------------------------------- subprocesses ---


def _env(**extra) -> dict[str, str]:
  env = dict(os.environ, JAX_PLATFORMS="cpu", **extra)
  env["PYTHONPATH"] = os.pathsep.join(
      p for p in (REPO, os.environ.get("PYTHONPATH", "")) if p)
  return env


def _command(mode: str, **args) -> list[str]:
  return [sys.executable, WORKER, mode, json.dumps(args)]


def _start(mode: str, env: dict | None = None, **args) -> subprocess.Popen:
  return subprocess.Popen(_command(mode, **args), cwd=REPO, env=env or _env(),
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _finish(proc: subprocess.Popen, timeout: float = SUBPROCESS_TIMEOUT) -> str:
  """Waits for a worker (killed after ``timeout``) and checks that it succeeded."""
  try:
    out, err = proc.communicate(timeout=timeout)
  except subprocess.TimeoutExpired:
    proc.kill()
    out, err = proc.communicate()
    pytest.fail(f"worker timed out after {timeout} s:\n{err[-3000:]}")
  assert proc.returncode == 0 and "DONE" in out, (proc.returncode, err[-3000:])
  return out


def _run(mode: str, env: dict | None = None, **args) -> str:
  return _finish(_start(mode, env, **args))


KILL_N, KILL_B = 24, 2  # 12 tiles: 78 blocks, in rounds of 2 (2 devices)
KILL_BLOCKS = upper_pairs(KILL_N // KILL_B)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
  """``get() -> path`` of a kernel file written by an uninterrupted worker, started
  once per module and waited for when first needed (it runs beside the first
  interrupted worker)."""
  path = tmp_path_factory.mktemp("uninterrupted") / "k.npy"
  proc = _start("write", out=str(path), n=KILL_N, block_size=KILL_B, devices=2)
  done = []

  def get():
    if not done:
      _finish(proc)
      done.append(True)
    return path

  yield get
  if proc.poll() is None:
    proc.kill()
    proc.communicate()


def _interrupt(path, sig: int) -> list[tuple[int, int]]:
  """Runs a slowed-down worker writing ``path`` and sends it ``sig`` once 2 blocks
  are logged; returns the blocks logged before it died."""
  proc = _start("write", out=str(path), n=KILL_N, block_size=KILL_B, devices=2,
                slow=0.02)
  log = f"{path}.ntk.p0.log"
  deadline = time.monotonic() + SUBPROCESS_TIMEOUT
  try:
    while len(logged_pairs(path)) < 2:
      assert proc.poll() is None, ("worker exited before 2 blocks were logged",
                                   proc.communicate()[1][-3000:])
      assert time.monotonic() < deadline, "no block logged in time"
      time.sleep(0.005)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=SUBPROCESS_TIMEOUT)
  finally:
    if proc.poll() is None:
      proc.kill()
      proc.communicate()
  assert proc.returncode != 0, "the worker finished before the signal"
  if sig == signal.SIGKILL:
    assert proc.returncode == -signal.SIGKILL
  else:
    assert "KeyboardInterrupt" in err, err[-3000:]
  assert os.path.exists(log)
  return logged_pairs(path)


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGINT], ids=["SIGKILL", "SIGINT"])
def test_resume_after_interrupt_is_byte_identical(tmp_path, uninterrupted, sig):
  path = tmp_path / "k.npy"
  before = _interrupt(path, sig)
  assert 2 <= len(before) < len(KILL_BLOCKS), len(before)  # killed mid-run
  _run("write", out=str(path), n=KILL_N, block_size=KILL_B, devices=2)
  after = logged_pairs(path)
  assert after[:len(before)] == before  # the resumed run only appended
  counts = collections.Counter(after)
  assert set(counts) == KILL_BLOCKS and set(counts.values()) == {1}  # no block twice
  assert filecmp.cmp(path, uninterrupted(), shallow=False)
  f, p, x, _ = worker.problem(KILL_N)
  assert_rel_close(np.load(path), ntklayers.ntk(f, p, x), TOL64)


def _check_devices_result(tmp_path, save) -> None:
  with np.load(save) as r:
    assert int(r["devices"]) == 4
    assert_rel_close(r["sym"], unblocked(), 1e-12)
    assert_rel_close(r["asym"], unblocked("x2"), 1e-12)
    assert_rel_close(r["ooc"], unblocked(), 1e-12)
  pairs = logged_pairs(tmp_path / "k.npy")
  assert len(pairs) == len(set(pairs)) and set(pairs) == upper_pairs(4)


@pytest.mark.parametrize("how", [
    "config", pytest.param("xla_flags", marks=pytest.mark.slow)])
def test_four_devices(tmp_path, how):
  """4 CPU devices, set by ``jax_num_cpu_devices`` or by XLA_FLAGS (the worker
  checks ``len(jax.devices()) == 4``): equal to the single-device unblocked kernel."""
  env = _env()
  if how == "xla_flags":
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "")
                        + " --xla_force_host_platform_device_count=4").strip()
  save = tmp_path / "r.npz"
  _run("devices", env, how=how, devices=4, n1=N, n2=N2, block_size=B,
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
  procs = [_start("distributed", port=port, process=k, n1=N, block_size=B,
                  out=str(path), save=str(save)) for k in range(2)]
  try:
    for proc in procs:
      _finish(proc)
  finally:
    for proc in procs:
      if proc.poll() is None:
        proc.kill()
        proc.communicate()
  assert_rel_close(np.load(path), unblocked(), 1e-12)
  assert_rel_close(np.load(save), unblocked(), 1e-12)
  pairs = logged_pairs(path)
  assert len(pairs) == len(set(pairs)) and set(pairs) == upper_pairs(4)
  for k in range(2):
    with open(f"{path}.ntk.p{k}.log", encoding="ascii") as fh:
      assert fh.read().strip(), f"process {k} computed no block"
