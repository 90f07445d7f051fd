"""Matrix-free and out-of-core predictions (CG, Lanczos) against dense answers (float64).

Tolerances: solves run at ``tol=1e-12``; their answers agree with the dense
(eigendecomposition / Cholesky) ones to ``1e-8`` relative (the kernels here have
condition numbers below ~1e3). ``info`` reports the iterations and the achieved
(true) residual.
"""

from __future__ import annotations

import collections
import os

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.linalg

import ntklayers
import ntklayers.metrics as nm
import ntklayers.predict as npr

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures", "nt_predict.npz")
LAYOUTS = {"2d": (-1,), "4d": ()}
TIMES = np.array([[0.0, 0.3], [2.0, np.inf]])
TOL = 1e-12
AGREE = 1e-8
Kernel = collections.namedtuple("Kernel", "nngp ntk")


@pytest.fixture(scope="module")
def data() -> dict[str, dict[str, np.ndarray]]:
  with np.load(FIXTURES) as z:
    return {lay: {k.split("/")[-1]: z[k] for k in z.files if k.startswith(f"{lay}/in/")}
            for lay in LAYOUTS}


def rel(a, b) -> float:
  a, b = np.asarray(a), np.asarray(b)
  assert a.shape == b.shape, (a.shape, b.shape)
  return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-300))


def spd(m: int, seed: int = 0, cond: float = 100.) -> np.ndarray:
  rng = np.random.default_rng(seed)
  q, _ = np.linalg.qr(rng.standard_normal((m, m)))
  return (q * np.geomspace(1.0, cond, m)) @ q.T


def test_cg_block_against_solve():
  a = spd(60)
  b = np.random.default_rng(1).standard_normal((60, 3))
  x, info = npr.cg(npr.KernelOperator.from_array(a), b, shift=0.5, tol=TOL)
  want = np.linalg.solve(a + 0.5 * np.eye(60), b)
  assert rel(x, want) < AGREE
  assert info.method == "cg" and info.converged and info.residual <= TOL
  assert 0 < info.iterations <= 120 and info.matvecs >= info.iterations  # round-off: > 60
  true = np.linalg.norm(b - (a + 0.5 * np.eye(60)) @ x, axis=0) / np.linalg.norm(b, axis=0)
  assert np.isclose(true.max(), info.residual, rtol=1e-3, atol=1e-15)


def test_nystrom_preconditioner():
  """Rank-r Nyström PCG: the same solution in far fewer iterations on an ill-conditioned kernel."""
  rng = np.random.default_rng(2)
  q, _ = np.linalg.qr(rng.standard_normal((200, 200)))
  true = np.geomspace(1e3, 1.0, 30)
  a = (q * np.concatenate([true, np.geomspace(1.0, 0.5, 170)])) @ q.T
  op = npr.KernelOperator.from_array(a)
  b = rng.standard_normal((200, 2))
  x0, plain = npr.cg(op, b, tol=1e-10, maxiter=3000)
  pre = npr.NystromPreconditioner(op, rank=60, seed=1)
  assert pre.rank == 60 and np.isclose(pre.eigenvalues[0], 1e3, rtol=1e-2)
  assert np.all(pre.eigenvalues[:30] <= true * (1 + 1e-9))  # Nyström never overestimates
  x1, fast = npr.cg(op, b, tol=1e-10, preconditioner=pre)
  assert fast.converged and fast.iterations < plain.iterations / 3
  assert rel(x1, np.linalg.solve(a, b)) < AGREE and rel(x0, x1) < AGREE
  mf = npr.gradient_descent_mse_matrix_free(a, b, tol=1e-10, preconditioner_rank=60)
  ktd = rng.standard_normal((3, 200))
  got = mf(None, 0.0, 0.0, ktd)
  assert rel(got[1], ktd @ np.linalg.solve(a, b)) < AGREE
  with pytest.raises(ValueError, match="preconditioner_rank"):
    npr.gradient_descent_mse_matrix_free(a, b, preconditioner_rank=-1)


def test_cg_not_converged_warns():
  with pytest.warns(npr.ConvergenceWarning, match="maxiter"):
    _, info = npr.cg(npr.KernelOperator.from_array(spd(40, cond=1e4)), np.ones(40), tol=1e-12,
                     maxiter=3)
  assert not info.converged and info.iterations == 3 and info.residual > 1e-12


def test_cg_refuses_indefinite():
  a = np.diag([1.0, -2.0, 3.0])
  with pytest.raises(npr.NotPositiveSemidefiniteError, match="not positive definite"):
    npr.cg(npr.KernelOperator.from_array(a), np.ones(3), tol=1e-10)


def test_lanczos_against_expm():
  a = spd(50, seed=3, cond=30.) / 10
  v = np.random.default_rng(4).standard_normal((50, 2))
  ts = np.array([0.0, 0.5, 3.0, 20.0])
  (got,), info = npr.lanczos_apply(npr.KernelOperator.from_array(a), v,
                                   [lambda lam: np.exp(-np.outer(ts, lam))], tol=TOL)
  want = np.stack([scipy.linalg.expm(-t * a) @ v for t in ts])
  assert rel(got, want) < AGREE
  assert info.method == "lanczos" and info.converged and info.iterations < 50


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("reg,absolute", [(0.0, False), (0.1, False), (0.05, True)])
def test_mse_matrix_free_matches_dense(data, layout, reg, absolute):
  x = data[layout]
  kw = dict(learning_rate=0.7, diag_reg=reg, diag_reg_absolute_scale=absolute,
            trace_axes=LAYOUTS[layout])
  dense = npr.gradient_descent_mse(jnp.asarray(x["k"]), jnp.asarray(x["y"]), **kw)
  mf = npr.gradient_descent_mse_matrix_free(x["k"], x["y"], tol=TOL, **kw)
  for t in (TIMES, None, 1.5):
    want = dense(None if t is None else jnp.asarray(t), x["f0"], x["ft0"], x["ktd"])
    got = mf(t, x["f0"], x["ft0"], x["ktd"])
    for g, w in zip(got, want):
      assert isinstance(g, np.ndarray) and g.dtype == np.float64
      assert rel(g, w) < AGREE
    assert mf.info and all(i.converged and i.residual <= TOL for i in mf.info)
  assert rel(mf(TIMES, None, x["ft0"], x["ktd"]), dense(jnp.asarray(TIMES), None, x["ft0"],
                                                         x["ktd"])) < AGREE
  mf(None, x["f0"], x["ft0"], x["ktd"])
  assert mf.info == []  # the solve of this right-hand side is cached


@pytest.mark.parametrize("layout", LAYOUTS)
def test_gp_matrix_free_matches_dense(data, layout):
  x = data[layout]
  k_dd = Kernel(nngp=x["k_nngp"], ntk=x["k"])
  k_td = Kernel(nngp=x["ktd_nngp"], ntk=x["ktd"])
  k_tt = Kernel(nngp=x["ktt_nngp"], ntk=x["ktt"])
  j = lambda k: Kernel(*(jnp.asarray(v) for v in k))
  dense = npr.gp_inference(j(k_dd), jnp.asarray(x["y"]), diag_reg=1e-2,
                           trace_axes=LAYOUTS[layout])
  mf = npr.gp_inference_matrix_free(k_dd, x["y"], diag_reg=1e-2, trace_axes=LAYOUTS[layout],
                                    tol=TOL)
  want = dense(("nngp", "ntk", "ntkgp"), j(k_td), j(k_tt))
  got = mf(("nngp", "ntk", "ntkgp"), k_td, k_tt)
  for g in ("nngp", "ntk", "ntkgp"):
    assert rel(getattr(got, g).mean, getattr(want, g).mean) < AGREE
    assert rel(getattr(got, g).covariance, getattr(want, g).covariance) < AGREE
  assert all(i.converged for i in mf.info)
  assert rel(mf("nngp", x["ktd_nngp"]), want.nngp.mean) < AGREE


def test_kernel_on_disk(tmp_path, data):
  """A ``.npy`` path, and a memory map of it, read block by block, equal the in-memory kernel."""
  x = data["4d"]
  path = tmp_path / "k.npy"
  np.save(path, x["k"].astype(np.float32))
  mm = np.load(path, mmap_mode="r")
  k32 = x["k"].astype(np.float32).astype(np.float64)
  v = np.random.default_rng(0).standard_normal((k32.shape[0] * 3, 2))
  dense = nm.flatten(jnp.asarray(k32))
  ops = [npr.KernelOperator.from_npy(path, block_bytes=1000, symmetric=sym) for sym in (0, 1)]
  ops += [npr.KernelOperator.from_array(k, block_bytes=1000, symmetric=sym)
          for k in (mm, k32) for sym in (False, True)]  # symmetric: upper triangle only
  for op in ops:
    assert op.shape == (18, 18) and op.dtype in (np.float32, np.float64)
    assert rel(op @ v, np.asarray(dense) @ v) < 1e-14
    assert rel(op.rmatmat(v), np.asarray(dense).T @ v) < 1e-14
    assert np.isclose(op.trace(), np.trace(np.asarray(dense)))
  mf = npr.gradient_descent_mse_matrix_free(str(path), x["y"], trace_axes=(), tol=TOL,
                                            diag_reg=1e-3)
  ref = npr.gradient_descent_mse(jnp.asarray(k32), jnp.asarray(x["y"]), trace_axes=(),
                                 diag_reg=1e-3)
  np.save(tmp_path / "ktd.npy", x["ktd"])
  got = mf(None, x["f0"], x["ft0"], str(tmp_path / "ktd.npy"))
  assert got[1].dtype == np.float32  # outputs in the kernel's dtype, computed in float64
  assert rel(got[1], ref(None, x["f0"], x["ft0"], x["ktd"])[1]) < 1e-7


N, O = 12, 2


@pytest.fixture(scope="module")
def mlp():
  def fn(z):
    h = jnp.tanh(ntklayers.Linear(16)(z))
    return ntklayers.Linear(O)(h)

  net = hk.without_apply_rng(hk.transform(fn))
  x = jax.random.normal(jax.random.key(0), (N, 5))
  x_test = jax.random.normal(jax.random.key(1), (4, 5))
  params = net.init(jax.random.key(2), x)
  return net.apply, params, x, x_test


def test_ntk_matvec_operator_light(mlp):
  """CG and Lanczos on ``ntk_matvec`` (the dense reference is the operator on the identity)."""
  f, params, x, x_test = mlp
  y = jax.random.normal(jax.random.key(3), (N, O))
  f0 = f(params, x)
  op = npr.KernelOperator.from_matvec(*nm.ntk_matvec(f, params, x))
  k2 = op @ np.eye(N * O)
  k = jnp.asarray(k2.reshape(N, O, N, O).transpose(0, 2, 1, 3))
  dense = npr.gradient_descent_mse(k, y, trace_axes=(), diag_reg=1e-4,
                                   diag_reg_absolute_scale=True)
  mf = npr.gradient_descent_mse_matrix_free(op, y, trace_axes=(), diag_reg=1e-4,
                                            diag_reg_absolute_scale=True, tol=TOL)
  ts = np.array([0.5, 4.0])
  assert rel(mf(ts, f0), dense(jnp.asarray(ts), f0)) < AGREE
  assert rel(mf(None, f0, 0.0, k)[1], dense(None, f0, 0.0, k)[1]) < AGREE
  assert {i.method for i in mf.info} == {"cg"} and op.matvecs > N * O


@pytest.mark.slow
def test_ntk_matvec_operator(mlp, tmp_path):
  """CG on ``ntk_matvec`` and on ``ntk_blocked(out=)`` equals the dense prediction."""
  f, params, x, x_test = mlp
  y = jax.random.normal(jax.random.key(3), (N, O))
  k = ntklayers.ntk(f, params, x)  # [N, N, O, O]
  k_td = ntklayers.ntk(f, params, x_test, x)
  f0, ft0 = f(params, x), f(params, x_test)
  dense = npr.gradient_descent_mse(k, y, trace_axes=(), diag_reg=1e-4)
  want = dense(None, f0, ft0, k_td)
  trace = ntklayers.ntk_trace(f, params, x, progress=False)
  triple = nm.ntk_matvec(f, params, x, block_size=5)
  op = npr.KernelOperator.from_matvec(*triple, trace=trace)
  cross = npr.KernelOperator.test_train(f, params, x_test, x, block_size=5)
  assert cross.shape == (4 * O, N * O)
  mf = npr.gradient_descent_mse_matrix_free(op, y, trace_axes=(), diag_reg=1e-4, tol=TOL)
  got = mf(None, f0, ft0, cross)
  assert rel(got[1], want[1]) < AGREE and rel(got[0], want[0]) == 0
  path = tmp_path / "k.npy"
  mm = ntklayers.ntk_blocked(f, params, x, out=path, block_size=5, progress=False)
  disk = npr.gradient_descent_mse_matrix_free(mm, y, trace_axes=(), diag_reg=1e-4, tol=TOL)
  assert rel(disk(None, f0, ft0, k_td)[1], want[1]) < AGREE
  ts = np.array([0.5, 4.0])
  assert rel(mf(ts, f0, ft0, cross)[1], dense(jnp.asarray(ts), f0, ft0, k_td)[1]) < AGREE
  with pytest.raises(ValueError, match="trace is unknown"):
    npr.gradient_descent_mse_matrix_free(triple, y, trace_axes=(), diag_reg=1e-4)


def test_progress_bar(capsys):
  op = npr.KernelOperator.from_array(spd(30))
  npr.cg(op, np.ones(30), tol=1e-10, progress=True, desc="solve-k")
  assert "solve-k" in capsys.readouterr().err
  npr.cg(op, np.ones(30), tol=1e-10, progress=False)
  assert capsys.readouterr().err == ""


def test_operator_shape_errors(data):
  x = data["2d"]
  with pytest.raises(ValueError, match=r"\[6, 6\]"):
    npr.gradient_descent_mse_matrix_free(np.eye(5), x["y"])
  with pytest.raises(TypeError, match="KernelOperator"):
    npr.gradient_descent_mse_matrix_free({1, 2}, x["y"])
  mf = npr.gradient_descent_mse_matrix_free(x["k"], x["y"])
  with pytest.raises(ValueError, match="k_test_train"):
    mf(None, x["f0"], x["ft0"], np.ones((4, 5)))
  with pytest.raises(ValueError, match=">= 0"):
    mf(-1.0, x["f0"])
