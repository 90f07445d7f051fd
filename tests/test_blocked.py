"""``ntk_blocked`` and ``ntk_trace``: blocked kernels equal the unblocked ones.

In process (the CPU backend has 2 devices, see ``conftest``, so blocks are spread
over both): every schedule (symmetric upper triangle, full, per-example
diagonal), block sizes that divide the batch and that do not, trace/diagonal
axes, model keyword arguments, pytree inputs, registry models, float32; the
memory budget; the errors; the progress bar; non-finite kernels.

Elsewhere: the out-of-core file, its resume, refusals and repairs
(``test_blocked_store.py``), interrupted and killed runs (``test_blocked_kill.py``),
4 devices and 2 processes (``test_blocked_processes.py``), the resume fingerprint
(``test_blocked_fingerprint.py``), options that crashed (``test_blocked_options.py``),
fuzzing (``test_fuzz_blocked.py``).

Most tests share one tiny model (``blocked_worker.F``: an ``ntklayers.Linear``,
a plain ``hk.Linear`` on the fallback, an ``ntklayers.Linear``) with NumPy
parameters, batches of ``N = 10`` and ``N2 = 7`` examples and ``block_size=3``,
so that they share JAX's compilations. NumPy rather than JAX parameters: see
``test_jax_array_params_emit_no_deprecation_warning`` (a known bug).
"""

from __future__ import annotations

import functools
import json
import os
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


@functools.lru_cache(maxsize=None)
def unblocked(x2: str | None = None, trace_axes=(), diagonal_axes=()) -> np.ndarray:
  """``ntklayers.ntk`` of the shared model (``x2``: ``None``, ``"x2"`` or ``"same_n"``)."""
  other = {None: None, "x2": X2, "same_n": X2_SAME_N}[x2]
  return np.asarray(ntklayers.ntk(F, P, X, other, trace_axes=trace_axes,
                                  diagonal_axes=diagonal_axes))


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


