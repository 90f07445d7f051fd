"""Dense ``ntklayers.predict`` against independent NumPy / SciPy references (float64).

Closed forms agree to 1e-10 (relative to the largest entry); ODE integrations
(``rtol = atol = 1.4e-8``) to 1e-6.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.integrate
import scipy.linalg

import ntklayers.predict as npr

N, NT, O = 7, 3, 2
EXACT, ODE_TOL = 1e-10, 1e-6
MSE = lambda fx, y: 0.5 * jnp.mean((fx - y) ** 2)


def rel(a, b) -> float:
  a, b = np.asarray(a), np.asarray(b)
  assert a.shape == b.shape, (a.shape, b.shape)
  return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-300))


@pytest.fixture(scope="module")
def full():
  """A joint PSD kernel over (train + test) x outputs, flattened ``[(N+NT)·O, (N+NT)·O]``."""
  rng = np.random.default_rng(7)
  a = rng.standard_normal(((N + NT) * O, 30)) / np.sqrt(30)
  k = a @ a.T + 0.05 * np.eye((N + NT) * O)
  m = N * O
  return {"k2": k[:m, :m], "ktd2": k[m:, :m], "ktt2": k[m:, m:],
          "y": rng.standard_normal((N, O)), "f0": rng.standard_normal((N, O)),
          "ft0": rng.standard_normal((NT, O))}


def interleave(k2, n1, n2):
  return k2.reshape(n1, O, n2, O).transpose(0, 2, 1, 3)


def reference_mse(k2, ktd2, y, f0, ft0, t, lr, reg=0.0):
  """``expm``-based flow on flattened ``[M, M]`` kernels (loss normalized by ``y.size``)."""
  kr = k2 + reg * np.eye(k2.shape[0])
  r = (f0 - y).reshape(-1)
  e = scipy.linalg.expm(-lr * t * kr / y.size)
  train = y.reshape(-1) + e @ r
  test = ft0.reshape(-1) - ktd2 @ np.linalg.solve(kr, (np.eye(k2.shape[0]) - e) @ r)
  return train.reshape(y.shape), test.reshape(ft0.shape)


def test_mse_full_kernel_against_expm(full):
  k = jnp.asarray(interleave(full["k2"], N, N))
  ktd = jnp.asarray(interleave(full["ktd2"], NT, N))
  fn = npr.gradient_descent_mse(k, full["y"], learning_rate=0.4, diag_reg=0.02,
                                diag_reg_absolute_scale=True, trace_axes=())
  ts = np.array([[0.0, 1.0, 7.5]])
  tr, te = fn(jnp.asarray(ts), full["f0"], full["ft0"], ktd)
  assert tr.shape == (1, 3, N, O) and te.shape == (1, 3, NT, O)
  for i, t in enumerate(ts[0]):
    want = reference_mse(full["k2"], full["ktd2"], full["y"], full["f0"], full["ft0"], t, 0.4,
                         reg=0.02)
    assert rel(tr[0, i], want[0]) < EXACT and rel(te[0, i], want[1]) < EXACT
  # t = inf through the eigenbasis equals t = None (Cholesky) on the test set
  assert rel(fn(jnp.inf, full["f0"], full["ft0"], ktd)[1], fn(None, full["f0"], full["ft0"],
                                                                  ktd)[1]) < EXACT


def test_mse_traced_kernel_is_kron(full):
  """``[N, N]`` with ``trace_axes=(-1,)`` is ``K ⊗ I`` on the full layout."""
  k = full["k2"][::O, ::O]  # one output's block: a PSD [N, N] kernel
  ktd = full["ktd2"][::O, ::O]
  fn = npr.gradient_descent_mse(jnp.asarray(k), full["y"], learning_rate=2.0)
  tr, te = fn(3.0, full["f0"], full["ft0"], jnp.asarray(ktd))
  want = reference_mse(np.kron(k, np.eye(O)), np.kron(ktd, np.eye(O)), full["y"], full["f0"],
                       full["ft0"], 3.0, 2.0)
  assert rel(tr, want[0]) < EXACT and rel(te, want[1]) < EXACT


def test_mse_general_trace_axes():
  """``y [N, A, B]`` with ``trace_axes=(1,)``: the kernel is ``[N, N, B, B]`` (``⊗ I_A``)."""
  rng = np.random.default_rng(3)
  a_, b_ = 2, 3
  a = rng.standard_normal((N * b_, 20))
  k2 = a @ a.T / 20 + 0.1 * np.eye(N * b_)
  y = rng.standard_normal((N, a_, b_))
  k = jnp.asarray(k2.reshape(N, b_, N, b_).transpose(0, 2, 1, 3))
  fn = npr.gradient_descent_mse(k, jnp.asarray(y), trace_axes=(1,))
  got = fn(jnp.array([0.5, 2.0]), jnp.zeros_like(jnp.asarray(y)))
  assert got.shape == (2, N, a_, b_)
  for i, t in enumerate((0.5, 2.0)):
    for j in range(a_):  # each traced slice evolves under the same [N·B, N·B] kernel
      e = scipy.linalg.expm(-t * k2 / y.size)
      want = y[:, j].reshape(-1) - e @ y[:, j].reshape(-1)
      assert rel(got[i, :, j], want.reshape(N, b_)) < EXACT


def test_mse_jit_and_shapes(full):
  k = jnp.asarray(full["k2"][::O, ::O])
  ktd = jnp.asarray(full["ktd2"][::O, ::O])
  fn = npr.gradient_descent_mse(k, full["y"])
  ts = jnp.arange(6.0).reshape(2, 1, 3)
  tr, te = jax.jit(fn)(ts, full["f0"], full["ft0"], ktd)
  assert tr.shape == (2, 1, 3, N, O) and te.shape == (2, 1, 3, NT, O)
  for idx in np.ndindex(ts.shape):
    one = fn(ts[idx], full["f0"], full["ft0"], ktd)
    assert rel(tr[idx], one[0]) < EXACT and rel(te[idx], one[1]) < EXACT
  np.testing.assert_array_equal(fn(0.0, full["f0"]), full["f0"])
  np.testing.assert_array_equal(fn(None, full["f0"]), full["y"])  # NT: y at t = None
  assert fn(1.0, 0.0).shape == (N, O)  # scalar initial outputs broadcast


@pytest.mark.slow
def test_ode_mse_equals_closed_form_any_order(full):
  k = jnp.asarray(full["k2"][::O, ::O])
  ktd = jnp.asarray(full["ktd2"][::O, ::O])
  ts = jnp.array([[2.0, 0.5], [0.0, 1.0]])  # unsorted, with 0
  ode = npr.gradient_descent(MSE, k, full["y"], learning_rate=0.8)
  exact = npr.gradient_descent_mse(k, full["y"], learning_rate=0.8)
  for g, w in zip(ode(ts, full["f0"], full["ft0"], ktd), exact(ts, full["f0"], full["ft0"], ktd)):
    assert rel(g, w) < ODE_TOL
  assert rel(ode(ts, None, full["ft0"], ktd), exact(ts, None, full["ft0"], ktd)) < ODE_TOL


def test_ode_momentum_against_solve_ivp_and_resume(full):
  k = full["k2"][::O, ::O]
  ktd = full["ktd2"][::O, ::O]
  lr, mom = 0.5, 0.9
  ode = npr.gradient_descent(MSE, jnp.asarray(k), full["y"], learning_rate=lr, momentum=mom)
  ts = np.array([0.5, 3.0])
  tr, te = ode(jnp.asarray(ts), full["f0"], full["ft0"], jnp.asarray(ktd))
  y, size = full["y"], full["y"].size

  def rhs(_, s):  # s = [f_train, f_test, v_train, v_test] in tau = sqrt(lr) t
    f, ft, v, vt = np.split(s, np.cumsum([N * O, NT * O, N * O]))
    g = (f.reshape(N, O) - y) / size
    fr = (mom - 1) / np.sqrt(lr)
    return np.concatenate([v, vt, (-k @ g).ravel() + fr * v, (-ktd @ g).ravel() + fr * vt])

  s0 = np.concatenate([full["f0"].ravel(), full["ft0"].ravel(), np.zeros((N + NT) * O)])
  sol = scipy.integrate.solve_ivp(rhs, (0, ts[-1] * np.sqrt(lr)), s0, t_eval=ts * np.sqrt(lr),
                                  rtol=1e-11, atol=1e-12)
  for i in range(2):
    assert rel(tr[i], sol.y[:N * O, i].reshape(N, O)) < ODE_TOL
    assert rel(te[i], sol.y[N * O:(N + NT) * O, i].reshape(NT, O)) < ODE_TOL
  # resuming from the ODEState at t = 0.5 reaches the same outputs at t = 3.0
  st = ode(0.5, npr.ODEState(full["f0"], full["ft0"]), None, jnp.asarray(ktd))
  assert isinstance(st, npr.ODEState) and st.qx_train is not None
  st2 = ode(2.5, st, None, jnp.asarray(ktd))
  assert rel(st2.fx_train, tr[1]) < ODE_TOL and rel(st2.fx_test, te[1]) < ODE_TOL


def test_gp_against_textbook_formulas(full):
  rng = np.random.default_rng(5)
  b = rng.standard_normal(full["k2"].shape)
  nngp2 = b @ b.T / b.shape[0] + 0.1 * np.eye(b.shape[0])
  k2, ktd2, ktt2 = full["k2"], full["ktd2"], full["ktt2"]
  ntd2 = rng.standard_normal(ktd2.shape) * 0.1
  ntt2 = np.eye(NT * O)
  il = lambda x, a, c: jnp.asarray(interleave(x, a, c))
  kdd = {"ntk": il(k2, N, N), "nngp": il(nngp2, N, N)}
  ktd = {"ntk": il(ktd2, NT, N), "nngp": il(ntd2, NT, N)}
  ktt = {"ntk": il(ktt2, NT, NT), "nngp": il(ntt2, NT, NT)}
  fn = npr.gp_inference(kdd, full["y"], diag_reg=0.01, diag_reg_absolute_scale=True,
                        trace_axes=())
  res = fn(None, ktd, ktt)
  yv = full["y"].reshape(-1)
  reg = 0.01 * np.eye(N * O)
  mean_nngp = ntd2 @ np.linalg.solve(nngp2 + reg, yv)
  cov_nngp = ntt2 - ntd2 @ np.linalg.solve(nngp2 + reg, ntd2.T)
  a = ktd2 @ np.linalg.inv(k2 + reg)
  cov_ntk = ntt2 + a @ nngp2 @ a.T - a @ ntd2.T - ntd2 @ a.T
  assert rel(res.nngp.mean, mean_nngp.reshape(NT, O)) < EXACT
  assert rel(res.nngp.covariance, interleave(cov_nngp, NT, NT)) < EXACT
  assert rel(res.ntk.mean, (a @ yv).reshape(NT, O)) < EXACT
  assert rel(res.ntk.covariance, interleave(cov_ntk, NT, NT)) < EXACT


def test_max_learning_rate_formula(full):
  k = jnp.asarray(full["k2"][::O, ::O])
  lam = np.linalg.eigvalsh(np.asarray(k))[-1]
  assert rel(npr.max_learning_rate(k, momentum=0.5), 2 * 1.5 * N / (lam + 1e-12)) < EXACT
  assert rel(npr.max_learning_rate(k, y_train_size=N * O), 2 * N * O / (lam + 1e-12)) < EXACT
