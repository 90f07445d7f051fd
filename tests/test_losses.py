"""Issue 17, class 8: the stability bound of the loss actually trained.

For softmax cross-entropy the bound is ``2 / λmax(H^{1/2} Θ H^{1/2})`` with ``Θ`` the
flattened ``[N·C, N·C]`` kernel and ``H`` the Hessian of the loss w.r.t. the
outputs at the current logits:

* against a NumPy/SciPy reference (``H`` block diagonal ``(diag p − p pᵀ)/N``,
  itself checked against ``jax.hessian`` of ``optax.softmax_cross_entropy``,
  ``H^{1/2}`` from ``scipy.linalg.eigh``), for the mean and the sum;
* gradient descent on the linearized cross-entropy dynamics (the second-order
  model of the loss of the linearized network) converges at 0.9x, diverges at 1.1x;
* a cross-entropy MLP trained at an lr above the MSE bound but below the CE bound
  converges, and ``check_trainability(loss="softmax_cross_entropy")`` is quiet,
  while the default check warns with the MSE bound *labelled* as such;
* ``metrics.max_stable_lr``, ``check_trainability``, the monitor's
  ``max_stable_lr`` and ``step_size_guard`` (kernel and Lanczos) give one number;
* the MSE names keep their exact values; unknown losses, missing or mismatched
  logits and traced kernels are refused with errors naming the argument.
"""

from __future__ import annotations

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import scipy.linalg

import ntklayers
import ntklayers.metrics as nm
import ntklayers.optax as nopt
from ntklayers import TrainabilityWarning

CE, CE_SUM = "softmax_cross_entropy", "softmax_cross_entropy_sum"
N, D, C, W = 16, 4, 3, 32
RTOL = 1e-10


def to_layout(mat, n, c):
  return mat.reshape(n, c, n, c).transpose(0, 2, 1, 3)


def np_hessian(logits, mean=True):
  """Block-diagonal Hessian of Σ_n CE(softmax(z_n), y_n) (/N for the mean), [N·C, N·C]."""
  z = logits - logits.max(-1, keepdims=True)
  p = np.exp(z) / np.exp(z).sum(-1, keepdims=True)
  blocks = [np.diag(q) - np.outer(q, q) for q in p]
  return scipy.linalg.block_diag(*blocks) / (len(p) if mean else 1)


def np_ce_bound(mat, logits, mean=True):
  """``2 / λmax(H^{1/2} Θ H^{1/2})``, the PSD square root by ``scipy.linalg.eigh``."""
  w, v = scipy.linalg.eigh(np_hessian(logits, mean))
  h_half = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
  return 2 / scipy.linalg.eigvalsh(h_half @ mat @ h_half)[-1]


@jax.jit
def ce_bounds(K, logits):
  return [nm.max_stable_lr(K, loss=loss, outputs=logits) for loss in (CE, CE_SUM)]


@pytest.mark.parametrize("n,c,rank,seed", [(4, 3, None, 0), (5, 2, None, 1), (6, 4, 5, 2),
                                           (3, 10, None, 3), (1, 3, None, 4)])
def test_ce_bound_matches_numpy_reference(n, c, rank, seed):
  rng = np.random.default_rng(seed)
  b = rng.normal(size=(n * c, rank or n * c))
  mat = b @ b.T
  logits = 2 * rng.normal(size=(n, c))
  K = jnp.asarray(to_layout(mat, n, c))
  got = ce_bounds(K, jnp.asarray(logits))
  for value, mean in zip(got, (True, False)):
    np.testing.assert_allclose(value, np_ce_bound(mat, logits, mean), rtol=1e-8)
  if seed == 0:  # eagerly too (op by op)
    np.testing.assert_allclose(nm.max_stable_lr(K, loss=CE, outputs=logits), got[0],
                               rtol=1e-12)
  # The CE curvature never exceeds half the MSE one: the CE bound is >= 2x the MSE bound.
  assert got[0] >= 2 * nm.max_stable_lr(K) * (1 - 1e-12)


def test_hessian_formula_is_optax_softmax_cross_entropy():
  rng = np.random.default_rng(5)
  logits = rng.normal(size=(4, 3))
  onehot = np.eye(3)[rng.integers(0, 3, 4)]
  for reduce, mean in ((jnp.mean, True), (jnp.sum, False)):
    h = jax.hessian(lambda z, r=reduce: r(optax.softmax_cross_entropy(z, onehot)))(logits)
    np.testing.assert_allclose(np.asarray(h).reshape(12, 12), np_hessian(logits, mean),
                               rtol=1e-12, atol=1e-14)


def test_mse_losses_keep_their_exact_values():
  rng = np.random.default_rng(7)
  b = rng.normal(size=(15, 15))
  K = jnp.asarray(to_layout(b @ b.T, 5, 3))
  lam = nm.lambda_max(K)
  for loss, scale in (("mean", 5), ("sum", 1), ("elementwise_mean", 15)):
    want = 2 * scale / lam
    assert nm.max_stable_lr(K, loss=loss) == want
    assert nm.max_stable_lr(K, loss=loss, outputs=jnp.zeros((5, 3))) == want
  assert nm.max_stable_lr(K) == 2 * 5 / lam


def test_refusals():
  rng = np.random.default_rng(8)
  b = rng.normal(size=(12, 12))
  K = jnp.asarray(to_layout(b @ b.T, 4, 3))
  with pytest.raises(ValueError, match="`outputs`.*logits"):
    nm.max_stable_lr(K, loss=CE)
  with pytest.raises(ValueError, match=r"`outputs`.*\(4, 4\).*\(4, 4, 3, 3\)"):
    nm.max_stable_lr(K, loss=CE, outputs=jnp.zeros((4, 4)))
  with pytest.raises(ValueError, match=r"`outputs`.*\[N, C\].*\(4, 3, 1\)"):
    nm.max_stable_lr(K, loss=CE, outputs=jnp.zeros((4, 3, 1)))
  for loss in (CE, "mean"):  # a traced [N, N] kernel of a model with 3 outputs
    with pytest.raises(ValueError, match="trace_axes"):
      nm.max_stable_lr(jnp.eye(4), loss=loss, outputs=jnp.zeros((4, 3)))
  with pytest.raises(ValueError, match=r"`outputs`.*\(4, 2\).*\(4, 4, 3, 3\)"):
    nm.max_stable_lr(K, outputs=jnp.zeros((4, 2)))
  for bad in ("cross_entropy", "mse", "l1", None):
    with pytest.raises(ValueError, match="`loss`.*softmax_cross_entropy"):
      nm.max_stable_lr(K, loss=bad)


def test_nan_logits_give_nan():
  K = jnp.asarray(to_layout(np.eye(12), 4, 3))
  for bad in (np.nan, np.inf, -np.inf):
    z = jnp.zeros((4, 3)).at[1, 2].set(bad)
    assert jnp.isnan(nm.max_stable_lr(K, loss=CE, outputs=z))


# --- dynamics -----------------------------------------------------------------------

def ce_problem(seed):
  net = hk.without_apply_rng(hk.transform(
      lambda x: ntklayers.Linear(C)(jnp.tanh(ntklayers.Linear(W)(x)))))
  x = jax.random.normal(jax.random.key(seed), (N, D))
  labels = jnp.argmax(x[:, :C] + 0.3 * x[:, C:C + 1], -1)
  params = net.init(jax.random.key(seed + 100), x)
  return net, x, labels, params


def tree_axpy(a, x, y):
  return jax.tree.map(lambda u, v: a * u + v, x, y)


@pytest.mark.parametrize("seed", [0, 1])
def test_gd_on_the_linearized_ce_dynamics(seed):
  """Second-order model of CE(f0 + J δ): GD converges at 0.9x the bound, diverges at 1.1x."""
  net, x, labels, params = ce_problem(seed)
  onehot = jax.nn.one_hot(labels, C, dtype=jnp.float64)
  ce = lambda z: optax.softmax_cross_entropy(z, onehot).mean()
  f0, jvp = jax.linearize(lambda p: net.apply(p, x), params)
  g, H = jax.grad(ce)(f0), jax.hessian(ce)(f0)               # [N, C], [N, C, N, C]
  bound = float(nm.max_stable_lr(ntklayers.ntk_fn(net.apply)(params, x), loss=CE,
                                 outputs=f0))

  def q(delta):
    d = jvp(delta)
    return jnp.vdot(g, d) + 0.5 * jnp.einsum("ij,ijkl,kl->", d, H, d)

  @jax.jit
  def run(lr):
    step = lambda d, _: (tree_axpy(-lr, jax.grad(q)(d), d), q(d))
    zero = jax.tree.map(jnp.zeros_like, params)
    return jax.lax.scan(step, zero, None, length=400)[1]

  good, bad = np.asarray(run(0.9 * bound)), np.asarray(run(1.1 * bound))
  assert np.all(np.diff(good) <= 1e-12) and good[-1] < good[1] < 0
  assert bad[-1] > 1e6 * abs(bad[1])
  # The MSE bound (2N/λmax) is far from this threshold: the CE bound is not it.
  assert bound > 2.5 * float(nm.max_stable_lr(ntklayers.ntk_fn(net.apply)(params, x)))


def test_ce_training_between_the_bounds_converges_and_the_check_is_quiet():
  net, x, labels, params = ce_problem(0)
  onehot = jax.nn.one_hot(labels, C, dtype=jnp.float64)
  mse_bound = float(nm.max_stable_lr(ntklayers.ntk_fn(net.apply)(params, x)))
  ce_bound = float(nm.max_stable_lr(ntklayers.ntk_fn(net.apply)(params, x), loss=CE,
                                    outputs=net.apply(params, x)))
  lr = 0.8 * ce_bound
  assert lr > 2 * mse_bound
  loss = lambda p: optax.softmax_cross_entropy(net.apply(p, x), onehot).mean()

  @jax.jit
  def train(p):
    step = lambda p, _: (tree_axpy(-lr, jax.grad(loss)(p), p), loss(p))
    return jax.lax.scan(step, p, None, length=300)

  final, losses = train(params)
  losses = np.asarray(losses)
  assert np.all(np.isfinite(losses)) and np.all(np.diff(losses) <= 1e-12)
  assert losses[-1] < 0.2 * losses[0]
  report = ntklayers.check_trainability(net.apply, params, x, lr=lr, loss=CE)  # no warning
  assert report.ok and report.loss == CE and report.max_stable_lr == pytest.approx(ce_bound)
  assert "softmax cross-entropy" in str(report)
  with pytest.warns(TrainabilityWarning, match="MSE.*loss='mean'.*default.*"
                    "loss='softmax_cross_entropy'"):
    report = ntklayers.check_trainability(net.apply, params, x, lr=lr)
  assert not report.ok and report.loss == "mean" and "MSE" in str(report)
  assert "default" in str(report)
  # The check after training: still below the bound of the final params.
  assert ntklayers.check_trainability(net.apply, final, x, lr=lr, loss=CE).ok


# --- one number everywhere --------------------------------------------------------

def test_metric_check_monitor_and_guard_agree():
  net, x, labels, params = ce_problem(2)
  logits = net.apply(params, x)
  K = ntklayers.ntk_fn(net.apply)(params, x)
  for loss in (CE, CE_SUM, "sum"):
    want = float(nm.max_stable_lr(K, loss=loss, outputs=logits))
    report = ntklayers.check_trainability(net.apply, params, x, lr=1e-6, loss=loss)
    np.testing.assert_allclose(report.max_stable_lr, want, rtol=RTOL)
    mon = nopt.monitor(net.apply, x, metrics=("max_stable_lr",), loss=loss)
    state = jax.jit(mon.update)(params, mon.init(params), params)[1]
    np.testing.assert_allclose(nopt.monitor_values(state)["max_stable_lr"], want, rtol=RTOL)
    if loss != CE:
      continue
    for method, rtol in (("kernel", RTOL), ("lanczos", 1e-6)):
      guard = nopt.step_size_guard(net.apply, x, lr=1.0, loss=loss, method=method,
                                   num_iters=N * C)
      state = jax.jit(guard.update)(params, guard.init(params), params)[1]
      np.testing.assert_allclose(state.stable_lr, want, rtol=rtol, err_msg=method)
      np.testing.assert_allclose(state.scale, min(1.0, 0.5 * want), rtol=rtol)


def test_guard_does_not_scale_a_ce_step_below_the_ce_bound():
  net, x, _, params = ce_problem(0)
  K = ntklayers.ntk_fn(net.apply)(params, x)
  ce_bound = float(nm.max_stable_lr(K, loss=CE, outputs=net.apply(params, x)))
  lr = 0.4 * ce_bound
  assert lr > float(nm.max_stable_lr(K))  # the MSE guard would scale it down
  guard = nopt.step_size_guard(net.apply, x, lr=lr, loss=CE)
  assert float(guard.update(params, guard.init(params), params)[1].scale) == 1


@pytest.mark.parametrize("make", [
    lambda net, p, x, loss: nopt.monitor(net.apply, x, loss=loss, metrics=("max_stable_lr",)),
    lambda net, p, x, loss: nopt.step_size_guard(net.apply, x, lr=0.1, loss=loss),
    lambda net, p, x, loss: ntklayers.check_trainability(net.apply, p, x, lr=0.1, loss=loss),
])
def test_unknown_losses_are_refused_everywhere(make):
  net, x, _, params = ce_problem(0)
  for bad in ("cross_entropy", "hinge"):
    with pytest.raises(ValueError, match="`loss`.*softmax_cross_entropy"):
      make(net, params, x, bad)


def test_ce_on_outputs_that_are_not_logits_is_refused():
  """Sequence outputs [N, T, C]: the softmax axis and the reduction are ambiguous."""
  net = hk.without_apply_rng(hk.transform(
      lambda x: ntklayers.Linear(C)(x).reshape(x.shape[0], 1, C)))
  x = jax.random.normal(jax.random.key(0), (4, D))
  params = net.init(jax.random.key(1), x)
  with pytest.raises(ValueError, match=r"\[N, C\]"):
    ntklayers.check_trainability(net.apply, params, x, lr=0.1, loss=CE)
  guard = nopt.step_size_guard(net.apply, x, lr=0.1, loss=CE)
  with pytest.raises(ValueError, match=r"\[N, C\]"):
    guard.init(params)


# --- the monitor infers the classes of integer labels ------------------------------

@pytest.mark.parametrize("trace_axes", [(), (-1,)])
def test_monitor_infers_num_classes_from_the_outputs(trace_axes):
  net, x, labels, params = ce_problem(3)
  mon = nopt.monitor(net.apply, x, metrics=("alignment", "centered_alignment"),
                     probe_y=labels, trace_axes=trace_axes)
  values = nopt.monitor_values(mon.update(params, mon.init(params), params)[1])
  K = ntklayers.ntk_fn(net.apply, trace_axes=trace_axes)(params, x)
  for name, centered in (("alignment", False), ("centered_alignment", True)):
    np.testing.assert_allclose(values[name], nm.alignment(K, labels, centered,
                                                          num_classes=C), rtol=RTOL)
  report = ntklayers.check_trainability(net.apply, params, x, lr=1e-6, y=labels)
  np.testing.assert_allclose(report.alignment, nm.alignment(
      ntklayers.ntk_fn(net.apply)(params, x), labels, num_classes=C), rtol=RTOL)
