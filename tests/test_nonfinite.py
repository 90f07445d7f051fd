"""Issue 17, class 3: no number from a non-finite kernel.

* every metric of ``ntklayers.metrics`` of a kernel with a NaN or an inf anywhere
  (an off-diagonal entry included, which leaves the trace finite) is NaN, eagerly
  and under ``jax.jit``, in float32 and float64, for every layout, per layer for a
  ``layerwise=True`` dict;
* ``check_trainability`` reports a non-finite kernel (every value NaN, never the
  ``0.0`` effective rank or the ``inf`` bound) and warns or raises;
* the monitor records NaN;
* ``step_size_guard`` keeps its last safe scale (0 before the first safe
  measurement: no unguarded step), records the NaN in ``stable_lr`` and
  ``probe_lambda_max`` and counts it in ``num_nonfinite``.
"""

from __future__ import annotations

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import ntklayers
import ntklayers.metrics as nm
import ntklayers.optax as nopt
from ntklayers import TrainabilityError
from ntklayers import TrainabilityWarning

N, D, O = 6, 4, 3


def psd(m, seed=0):
  b = np.random.default_rng(seed).normal(size=(m, m))
  return b @ b.T


def to_layout(mat, n, *outs):
  k = mat.reshape((n, *outs, n, *outs))
  r = 1 + len(outs)
  return np.transpose(k, [i for a in range(r) for i in (a, r + a)])


# (layout, where, value): one bad entry in an otherwise PSD kernel.
CASES = [
    ((), (0, 1), np.nan),                  # off-diagonal NaN: the trace stays finite
    ((), (2, 2), np.inf),
    ((O,), (0, 1, 2, 0), np.nan),
    ((O,), (1, 1, 0, 0), -np.inf),
    ((2, 2), (0, 3, 1, 1, 0, 1), np.inf),  # off-diagonal inf
]
SCALARS = ("lambda_max", "lambda_min", "condition_number", "trace", "effective_rank",
           "max_stable_lr")


def bad_kernel(outs, where, value, dtype):
  K = to_layout(psd(N * int(np.prod(outs)), seed=len(outs)), N, *outs).copy()
  K[where] = value
  return jnp.asarray(K, dtype)


def all_metrics(K, y):
  """Every metric of ``K`` in one dict (one program under ``jax.jit``)."""
  out = {name: getattr(nm, name)(K) for name in SCALARS}
  out.update({f"max_stable_lr_{loss}": nm.max_stable_lr(K, loss=loss)
              for loss in ("sum", "elementwise_mean")})
  out.update(eigvalsh=nm.eigvalsh(K), alignment=nm.alignment(K, y),
             centered_alignment=nm.alignment(K, y, True))
  good = jnp.where(jnp.isfinite(K), K, 0)
  out.update(change_t=nm.relative_change(K, good), change_0=nm.relative_change(good, K))
  return out


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64])
@pytest.mark.parametrize("outs,where,value", CASES)
def test_every_metric_of_a_non_finite_kernel_is_nan(outs, where, value, dtype):
  """Under ``jax.jit`` for every case; eagerly (op by op: slow to compile) for float64."""
  K = bad_kernel(outs, where, value, dtype)
  y = jnp.asarray(np.random.default_rng(1).normal(size=(N, *outs)), dtype)
  runs = [jax.jit(all_metrics)(K, y)]
  if dtype == jnp.float64:
    runs.append(all_metrics(K, y))
  for values in runs:
    for name, v in values.items():
      assert v.dtype == dtype and jnp.all(jnp.isnan(v)), (name, v)
      assert v.shape == ((N * int(np.prod(outs)),) if name == "eigvalsh" else ()), name


@pytest.mark.parametrize("value", [np.nan, np.inf])
def test_diagonal_layouts_and_layerwise_dicts(value):
  """The trace of a diagonal layout; per layer in a dict: only the bad layer is NaN."""
  diag = np.ones((N, O, O))
  diag[2, 0, 1] = value
  assert jnp.isnan(nm.trace(diag, diagonal_axes=(0,)))
  K = bad_kernel((), (0, 1), value, jnp.float64)
  layers = {"bad": K, "good": jnp.eye(N)}
  for name in SCALARS[:-1]:
    out = getattr(nm, name)(layers)
    assert jnp.isnan(out["bad"]) and jnp.isfinite(out["good"]), name
  rel = nm.relative_change(layers, {"bad": jnp.eye(N), "good": 2 * jnp.eye(N)})
  assert jnp.isnan(rel["bad"]) and float(rel["good"]) == 0.5


def test_finite_kernels_are_unchanged():
  """Zero and singular kernels keep their documented values (not NaN)."""
  assert nm.effective_rank(jnp.zeros((3, 3))) == 0
  assert nm.max_stable_lr(jnp.zeros((3, 3))) == jnp.inf
  assert nm.condition_number(jnp.diag(jnp.array([4.0, 1.0, -1.0]))) == jnp.inf
  big = jnp.diag(jnp.array([1e308, 1e308]))  # finite entries; the trace overflows
  assert nm.trace(big) == jnp.inf


# --- the training-loop tools ------------------------------------------------------

def mlp():
  return hk.without_apply_rng(hk.transform(
      lambda x: ntklayers.Linear(O)(jnp.tanh(ntklayers.Linear(8)(x)))))


@pytest.fixture(scope="module")
def model():
  net = mlp()
  x = jax.random.normal(jax.random.key(0), (N, D))
  params = net.init(jax.random.key(1), x)
  nan_params = jax.tree.map(lambda a: a.at[(0,) * a.ndim].set(jnp.nan), params)
  return net, x, params, nan_params


def test_check_trainability_reports_nan(model):
  net, x, _, nan_params = model
  with pytest.warns(RuntimeWarning), pytest.warns(TrainabilityWarning, match="not finite"):
    report = ntklayers.check_trainability(net.apply, nan_params, x, lr=0.1)
  assert not report.ok
  for name in ("lambda_max", "lambda_min", "condition_number", "max_stable_lr",
               "effective_rank", "trace"):
    assert np.isnan(getattr(report, name)), name
  with pytest.warns(RuntimeWarning), pytest.raises(TrainabilityError, match="not finite"):
    ntklayers.check_trainability(net.apply, nan_params, x, lr=0.1, raise_on_failure=True)


def test_monitor_records_nan(model):
  net, x, params, nan_params = model
  mon = nopt.monitor(net.apply, x, every=1, metrics=(
      "lambda_max", "effective_rank", "max_stable_lr", "trace", "condition_number"))
  step = jax.jit(mon.update)
  state = step(params, mon.init(params), params)[1]
  assert all(np.isfinite(v) for v in nopt.monitor_values(state).values())
  state = step(params, state, nan_params)[1]
  values = nopt.monitor_values(state)
  assert all(np.isnan(v) for v in values.values()), values


@pytest.mark.parametrize("method", ["kernel", "lanczos"])
def test_guard_keeps_its_last_safe_scale(model, method):
  net, x, params, nan_params = model
  lr = 3 * float(nm.max_stable_lr(ntklayers.ntk_fn(net.apply)(params, x)))
  guard = nopt.step_size_guard(net.apply, x, lr=lr, every=1, method=method,
                               num_iters=N * O)
  update = jax.jit(guard.update)
  ones = jax.tree.map(jnp.ones_like, params)
  state = guard.init(params)
  assert int(state.num_nonfinite) == 0
  u, state = update(ones, state, params)
  safe = float(state.scale)
  assert 0 < safe < 1 and int(state.num_nonfinite) == 0
  u, state = update(ones, state, nan_params)
  assert float(state.scale) == safe                      # not 1.0: still guarded
  assert np.isnan(state.stable_lr) and np.isnan(state.probe_lambda_max)
  assert int(state.num_nonfinite) == 1
  jax.tree.map(lambda a: np.testing.assert_allclose(a, safe), u)
  u, state = update(ones, state, params)                  # finite again
  np.testing.assert_allclose(state.scale, safe, rtol=1e-6)
  assert np.isfinite(state.stable_lr) and int(state.num_nonfinite) == 1
  assert int(optax.tree_utils.tree_get(optax.chain(guard).init(params),
                                       "num_nonfinite")) == 0


@pytest.mark.parametrize("method", ["kernel", "lanczos"])
def test_guard_nan_before_any_safe_measurement_stops_the_step(model, method):
  """A NaN at the first measurement: scale 0 (no update), never the unguarded 1."""
  net, x, _, nan_params = model
  guard = nopt.step_size_guard(net.apply, x, lr=0.1, every=1, method=method)
  ones = jax.tree.map(jnp.ones_like, nan_params)
  u, state = jax.jit(guard.update)(ones, guard.init(nan_params), nan_params)
  assert float(state.scale) == 0 and int(state.num_nonfinite) == 1
  assert np.isnan(state.stable_lr)
  jax.tree.map(lambda a: np.testing.assert_array_equal(a, 0), u)
