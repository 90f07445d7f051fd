"""``ntklayers.optax``: the NTK monitor and step-size guard inside jitted optax steps.

* the monitor, in ``jax.jit(train_step)`` with ``optax.chain(optax.adam, monitor)``,
  records the metrics of the params of that step (float64, rtol 1e-9), leaves the
  updates unchanged, keeps a ring-buffer history, and the step compiles once;
* the stability bound ``max_stable_lr`` (MSE, full-batch GD): exact for the
  linearized model (0.9x converges, 1.5x diverges); for the nonlinear MLP 0.9x
  converges monotonically, and 1.5x diverges or converges only once the NTK has
  shrunk to the edge of stability (``max_stable_lr`` of the final params = lr);
* the guard keeps 3x the bound from diverging.
"""

from __future__ import annotations

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from compile_log import log_compilations

import ntklayers
import ntklayers.metrics as nm
import ntklayers.optax as nopt

N, D, O, W = 8, 4, 3, 16
RTOL = 1e-9
STEPS, EVERY, HIST = 13, 3, 4  # monitored at 0, 3, 6, 9, 12; the ring keeps the last 4
METRICS = {"lambda_max": "lambda_max", "lambda_min": "lambda_min",
           "condition_number": "condition_number", "trace": "trace",
           "effective_rank": "effective_rank", "max_stable_lr": "max_stable_lr",
           "relative_change": "relative_change",
           "frobenius": lambda K: jnp.linalg.norm(K)}


def mlp(width=W, out=O, act=jnp.tanh):
  return hk.without_apply_rng(hk.transform(
      lambda x: ntklayers.Linear(out)(act(ntklayers.Linear(width)(x)))))


@pytest.fixture(scope="module")
def run():
  """13 jitted adam+monitor steps; per step: params, updates, state; compile logs."""
  net = mlp()
  x = jax.random.normal(jax.random.key(0), (N, D))
  y = jnp.cos(x[:, :O])
  params = net.init(jax.random.key(1), x)
  mon = nopt.monitor(net.apply, x, every=EVERY, history=HIST, metrics=METRICS)
  opt, adam = optax.chain(optax.adam(1e-2), mon), optax.adam(1e-2)
  loss = lambda p: 0.5 * jnp.mean(jnp.sum((net.apply(p, x) - y) ** 2, -1))

  # optax.adam's bias correction (float ** int32) needs standard dtype promotion;
  # the monitor alone runs under the strict setting in the other tests.
  @jax.jit
  def train_step(params, state):
    grads = jax.grad(loss)(params)
    with jax.numpy_dtype_promotion("standard"):
      updates, state = opt.update(grads, state, params)
    return optax.apply_updates(params, updates), state, updates

  @jax.jit
  def adam_updates(params, adam_state):
    with jax.numpy_dtype_promotion("standard"):
      return adam.update(jax.grad(loss)(params), adam_state, params)[0]

  state = opt.init(params)
  out = {"params": [], "states": [], "updates": [], "adam": []}
  logs = []
  for _ in range(STEPS):
    out["adam"].append(adam_updates(params, state[0]))
    out["params"].append(params)
    with log_compilations() as log:
      params, state, updates = train_step(params, state)
    logs.append(log)
    out["states"].append(state)
    out["updates"].append(updates)
  out.update(first=logs[0].names, later=[n for log in logs[1:] for n in log.names])
  kernel_fn = ntklayers.ntk_fn(net.apply)
  out.update(kernels=[kernel_fn(p, x) for p in out["params"]])
  return out


def direct(K, K0):
  out = {k: getattr(nm, k)(K) for k in METRICS if k not in ("relative_change", "frobenius")}
  return {**out, "relative_change": nm.relative_change(K, K0), "frobenius": jnp.linalg.norm(K)}


def test_monitor_values_match_direct_computation(run):
  K0 = run["kernels"][0]
  for step, state in enumerate(run["states"]):
    last = step - step % EVERY
    expected = direct(run["kernels"][last], K0)
    got = nopt.monitor_values(state)
    assert sorted(got) == sorted(METRICS)
    for name in METRICS:
      np.testing.assert_allclose(got[name], expected[name], rtol=RTOL, atol=1e-12,
                                 err_msg=f"{name} at step {step}")
      assert float(optax.tree_utils.tree_get(state, name)) == got[name]
    assert int(nopt.monitor_state(state).last_step) == last
  assert run["states"][0][1].kernel0 is not None


def test_step_compiles_once(run):
  names = run["first"]
  assert sum("train_step" in m for m in names) == 1, names
  assert not [n for n in run["later"] if "train_step" in n], run["later"]


def test_updates_unchanged(run):
  for got, want in zip(run["updates"], run["adam"]):
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-14, atol=0), got, want)
  net, x = mlp(), jnp.ones((N, D))
  params = net.init(jax.random.key(0), x)
  mon = nopt.monitor(net.apply, x, every=1)
  grads = jax.tree.map(jnp.ones_like, params)
  updates, _ = mon.update(grads, mon.init(params), params)
  assert updates is grads


def test_history_ring_buffer(run):
  hist = nopt.monitor_history(run["states"][-1])
  np.testing.assert_array_equal(hist["step"], [3, 6, 9, 12])
  K0 = run["kernels"][0]
  for i, step in enumerate(hist["step"]):
    expected = direct(run["kernels"][step], K0)
    for name in METRICS:
      np.testing.assert_allclose(hist[name][i], expected[name], rtol=RTOL, atol=1e-12)
  early = nopt.monitor_history(run["states"][4])  # records at steps 0 and 3
  np.testing.assert_array_equal(early["step"], [0, 3])
  raw = run["states"][-1][1]
  assert raw.history.shape == (HIST, len(METRICS)) and int(raw.num_records) == 5
  np.testing.assert_array_equal(raw.history_step, [12, 3, 6, 9])  # record 5 overwrote slot 0


def test_needs_params_and_checks_metrics():
  net, x = mlp(), jnp.ones((N, D))
  params = net.init(jax.random.key(0), x)
  mon = nopt.monitor(net.apply, x)
  with pytest.raises(ValueError, match="needs the current parameters"):
    mon.update(params, mon.init(params))
  with pytest.raises(ValueError, match="Unknown metric 'lambda_maxx'"):
    nopt.monitor(net.apply, x, metrics=("lambda_maxx",))
  with pytest.raises(ValueError, match="no usable name"):
    nopt.monitor(net.apply, x, metrics=(lambda K: K.sum(),))
  with pytest.raises(ValueError, match="probe_y"):
    nopt.monitor(net.apply, x, metrics=("alignment",))
  with pytest.raises(ValueError, match="scalar"):
    nopt.monitor(net.apply, x, metrics={"diag": jnp.diagonal}).init(params)
  with pytest.raises(ValueError, match="layerwise"):
    nopt.monitor(net.apply, x, layerwise=True)
  with pytest.raises(ValueError, match="No ntklayers.optax.monitor"):
    nopt.monitor_values(optax.adam(1.0).init(params))


def test_named_callable_and_alignment():
  net, x = mlp(), jax.random.normal(jax.random.key(0), (N, D))
  labels = jnp.arange(N) % O
  params = net.init(jax.random.key(1), x)

  def spectral_gap(K):
    ev = nm.eigvalsh(K)
    return ev[-1] - ev[-2]

  mon = nopt.monitor(net.apply, x, metrics=(spectral_gap, "centered_alignment"),
                     probe_y=labels, num_classes=O)
  state = mon.update(params, mon.init(params), params)[1]
  K = ntklayers.ntk_fn(net.apply)(params, x)
  np.testing.assert_allclose(state.values["spectral_gap"], spectral_gap(K), rtol=RTOL)
  np.testing.assert_allclose(state.values["centered_alignment"],
                             nm.alignment(K, labels, True, num_classes=O), rtol=RTOL)
  assert state.kernel0 is None  # K_0 is kept only for relative_change


# --- stability bound and guard: full-batch GD on MSE, N = 16, tanh MLP 4-32-2 ---

def problem(seed):
  net = mlp(width=32, out=2)
  x = jax.random.normal(jax.random.key(seed), (16, D))
  y = jnp.sin(1.5 * x[:, :2])
  params = net.init(jax.random.key(seed + 100), x)
  bound = float(nm.max_stable_lr(ntklayers.ntk_fn(net.apply)(params, x), loss="mean"))
  return net, x, y, params, bound


def gd(apply, params, x, y, lr, steps=300, tx=None):
  """``steps`` steps of ``tx`` (default SGD) on ``1/N Σ ½‖f − y‖²``: final params
  and the full-batch loss before each step."""
  tx = optax.sgd(lr) if tx is None else tx
  loss = lambda p: 0.5 * jnp.mean(jnp.sum((apply(p, x) - y) ** 2, -1))

  def body(carry, _):
    p, s = carry
    val, g = jax.value_and_grad(loss)(p)
    u, s = tx.update(g, s, p)
    return (optax.apply_updates(p, u), s), val

  (final, _), losses = jax.lax.scan(body, (params, tx.init(params)), None, length=steps)
  return final, losses


def gd_losses(*args, **kwargs):
  return gd(*args, **kwargs)[1]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_bound_is_exact_for_the_linearized_model(seed):
  net, x, y, params, bound = problem(seed)
  f0, jvp = jax.linearize(lambda p: net.apply(p, x), params)
  lin = lambda p, _: f0 + jvp(jax.tree.map(jnp.subtract, p, params))
  run = jax.jit(lambda lr: gd_losses(lin, params, x, y, lr))
  good, bad = np.asarray(run(0.9 * bound)), np.asarray(run(1.5 * bound))
  assert good[-1] < 0.5 * good[0] and np.all(np.diff(good) <= 1e-12)
  assert not np.isfinite(bad[-1]) or bad[-1] > 1e6 * bad[0]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_bound_holds_for_the_mlp(seed):
  """0.9x: monotone to < 1 % of the initial loss. 1.5x: the loss at least doubles
  within 50 steps, then GD diverges (seed 1) or "catapults" (Lewkowycz et al.
  2020): it converges only after the NTK has shrunk until ``max_stable_lr`` of
  the final params equals the lr (within 5 %, the edge of stability of Cohen et
  al. 2021). Over seeds 0-7: 2 diverge, 6 end at 0.988-1.043x."""
  net, x, y, params, bound = problem(seed)
  run = jax.jit(lambda lr: gd(net.apply, params, x, y, lr))
  good, bad = run(0.9 * bound)[1], run(1.5 * bound)
  good = np.asarray(good)
  assert good[-1] < 0.01 * good[0] and good.max() <= good[0]
  final_params, losses = bad
  losses = np.asarray(losses)
  assert np.nanmax(losses[:50]) > 2 * losses[0]
  if np.isfinite(losses[-1]) and losses[-1] < losses[0]:  # caught by the catapult
    final = nm.max_stable_lr(ntklayers.ntk_fn(net.apply)(final_params, x), loss="mean")
    assert abs(float(final) / (1.5 * bound) - 1) < 0.05
  else:
    assert seed == 1 and not np.isfinite(losses[-1])


@pytest.mark.parametrize("method", ["kernel", "lanczos"])
def test_guard_keeps_three_times_the_bound_stable(method):
  net, x, y, params, bound = problem(0)
  lr = 3 * bound
  guard = nopt.step_size_guard(net.apply, x, lr=lr, safety=0.5, every=5, method=method,
                               num_iters=32)
  guarded = np.asarray(gd_losses(net.apply, params, x, y, lr,
                                 tx=optax.chain(optax.sgd(lr), guard)))
  plain = np.asarray(gd_losses(net.apply, params, x, y, lr))
  assert np.all(np.isfinite(guarded)) and guarded[-1] < 0.01 * guarded[0]
  assert not np.isfinite(plain[-1]) or plain[-1] > 1e3 * plain[0]
  state = guard.init(params)
  _, state = guard.update(params, state, params)
  np.testing.assert_allclose(state.scale, 0.5 * bound / lr, rtol=1e-6)
  np.testing.assert_allclose(state.stable_lr, bound, rtol=1e-6)


def test_guard_argument_checks():
  net, x = mlp(), jnp.ones((N, D))
  with pytest.raises(ValueError, match="safety"):
    nopt.step_size_guard(net.apply, x, lr=1.0, safety=2.0)
  with pytest.raises(ValueError, match="method"):
    nopt.step_size_guard(net.apply, x, lr=1.0, method="power")
  guard = nopt.step_size_guard(net.apply, x, lr=1.0)
  params = net.init(jax.random.key(0), x)
  with pytest.raises(ValueError, match="needs the current parameters"):
    guard.update(params, guard.init(params))
