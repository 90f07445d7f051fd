"""Matrix-free spectral estimators against dense float64 references (NumPy ``eigh``
of ``J Jᵀ`` from ``jax.jacrev``, tests/reference.py).

Measured errors (float64, the MLP below, N·O = 90): top-5 eigenvalues by block
Lanczos ~1e-15 relative (LOBPCG ~1e-14), eigenvectors ``1 − |⟨u, u_ref⟩|`` ~1e-15;
Hutchinson/Hutch++ within a few standard errors of the exact trace, and on a
low-rank-ish kernel Hutch++'s spread over seeds 500x below Hutchinson's at equal
cost (30 products); SLQ moments exact per probe (Gauss quadrature) to ~1e-14 and
within a few standard errors of ``tr Kᵖ``.
"""

from __future__ import annotations

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ntklayers
import ntklayers.metrics as nm
from ntklayers.metrics._estimators import probes as _probes
from reference import flat_jacobian

N, O = 30, 3


def mlp(x):
  h = jnp.tanh(ntklayers.Linear(24, name="hidden")(x))
  return ntklayers.Linear(O, name="out")(h)


@pytest.fixture(scope="module")
def model():
  net = hk.without_apply_rng(hk.transform(mlp))
  x = jax.random.normal(jax.random.key(0), (N, 4))
  params = net.init(jax.random.key(1), x)
  jac = flat_jacobian(net.apply, params, x).reshape(N * O, -1)
  kernel = jac @ jac.T
  return net.apply, params, x, kernel


def rel(a, b):
  return np.abs(np.asarray(a) - np.asarray(b)) / np.abs(np.asarray(b))


def dense_operator(kernel):
  k = jnp.asarray(kernel)
  return lambda v: k @ v


def check_pairs(pairs, kernel, k):
  evals, evecs = np.linalg.eigh(kernel)
  evals, evecs = evals[::-1][:k], evecs[:, ::-1][:, :k]
  assert pairs.eigenvectors.shape == (kernel.shape[0], k)
  assert bool(pairs.converged.all()), pairs.residuals
  assert rel(pairs.eigenvalues, evals).max() < 1e-8
  overlap = np.abs(np.sum(np.asarray(pairs.eigenvectors) * evecs, axis=0))
  assert (1 - overlap).max() < 1e-8
  # The reported residuals are true ones, and bound the eigenvalue errors.
  u, t = np.asarray(pairs.eigenvectors), np.asarray(pairs.eigenvalues)
  np.testing.assert_allclose(pairs.residuals, np.linalg.norm(kernel @ u - u * t, axis=0),
                             rtol=1e-6, atol=1e-12 * evals[0])
  assert (np.abs(t - evals) <= np.asarray(pairs.residuals) + 1e-12 * evals[0]).all()


def test_top_eigenpairs_match_eigh(model):
  f, params, x, kernel = model
  pairs = nm.top_eigenpairs(f, params, x, 5, max_vectors=60)
  assert pairs.method == "lanczos" and pairs.matvecs == pairs.iterations * 5 + 5
  check_pairs(pairs, kernel, 5)
  dense = nm.top_eigenpairs(f, params, x, 3)  # dim 90 <= default max_vectors: formed
  assert dense.method == "dense" and dense.matvecs == N * O + 3
  check_pairs(dense, kernel, 3)


def test_lobpcg_matches_eigh(model):
  kernel = model[3]
  pairs = nm.operator_top_eigenpairs(dense_operator(kernel), N * O, 5, method="lobpcg")
  assert pairs.method == "lobpcg"
  check_pairs(pairs, kernel, 5)


@pytest.mark.slow
def test_top_eigenpairs_tiles_and_lobpcg_on_a_model(model):
  f, params, x, kernel = model
  tiled = nm.top_eigenpairs(f, params, x, 3, block_size=7, max_vectors=45, matvec_batch=2)
  assert tiled.method == "lanczos"
  check_pairs(tiled, kernel, 3)
  check_pairs(nm.top_eigenpairs(f, params, x, 4, method="lobpcg"), kernel, 4)


def test_multiplicity_found_by_the_block():
  # A linear model with 3 outputs: K = (x xᵀ + 1) ⊗ I_3, every eigenvalue thrice.
  net = hk.without_apply_rng(hk.transform(lambda x: ntklayers.Linear(3)(x)))
  x = jax.random.normal(jax.random.key(2), (60, 5))
  params = net.init(jax.random.key(3), x)
  gram = np.asarray(x) @ np.asarray(x).T + 1
  top = np.linalg.eigvalsh(gram)[::-1][:2]
  pairs = nm.top_eigenpairs(net.apply, params, x, 4, max_vectors=60)
  assert pairs.method == "lanczos" and bool(pairs.converged.all())
  np.testing.assert_allclose(pairs.eigenvalues, [top[0]] * 3 + [top[1]], rtol=1e-8)


def test_low_rank_operator_breaks_down_and_restarts():
  rng = np.random.default_rng(0)
  b = rng.normal(size=(200, 3))
  a = b @ b.T  # rank 3, top-6 asked for
  pairs = nm.operator_top_eigenpairs(dense_operator(a), 200, 6, max_vectors=60)
  expected = np.linalg.eigvalsh(a)[::-1][:6]
  np.testing.assert_allclose(pairs.eigenvalues, expected, rtol=1e-8, atol=1e-10 * expected[0])
  assert bool(pairs.converged.all())


def test_hutchinson_layerwise_sums_and_matches_exact(model):
  f, params, x, kernel = model
  whole = nm.trace_estimate(f, params, x, method="hutchinson", num_probes=40)
  parts = nm.trace_estimate(f, params, x, method="hutchinson", num_probes=40,
                            layerwise=True)
  exact_parts = {k: float(nm.trace(v))
                 for k, v in ntklayers.ntk_fn(f, layerwise=True)(params, x).items()}
  assert sorted(parts) == sorted(exact_parts) == ["hidden", "out"]
  # The same probes for every layer: the layers' estimates sum to the whole one.
  assert abs(sum(p.estimate for p in parts.values()) - whole.estimate) < 1e-10 * whole.estimate
  for name, est in [*parts.items(), ("all", whole)]:
    exact = np.trace(kernel) if name == "all" else exact_parts[name]
    assert est.samples.shape == (40,) and est.matvecs == 40
    assert abs(est.estimate - exact) < 4 * est.std_error, (name, est, exact)
  # Samples are zᵀ K z of Rademacher probes: check against the dense kernel.
  z = np.asarray(_probes(jax.random.key(0), np.arange(40), N * O, np.float64))
  np.testing.assert_allclose(whole.samples, np.einsum("pi,ij,pj->p", z, kernel, z),
                             rtol=1e-10)


def test_hutch_plus_plus_beats_hutchinson():
  # A low-rank-ish kernel: a smooth model of 2-d inputs (eigenvalues 1, 0.48,
  # 0.23, 0.016, ... of the largest).
  net = hk.without_apply_rng(hk.transform(
      lambda x: ntklayers.Linear(1)(jnp.tanh(ntklayers.Linear(32)(x)))))
  x = jax.random.normal(jax.random.key(0), (90, 2))
  jac = flat_jacobian(net.apply, net.init(jax.random.key(1), x), x).reshape(90, -1)
  kernel = jac @ jac.T
  matvec, dim = dense_operator(kernel), 90
  exact = np.trace(kernel)
  runs = {m: [nm.operator_trace_estimate(matvec, dim, method=m, num_probes=30,
                                         key=jax.random.key(s), matvec_batch=None)
              for s in range(8)] for m in ("hutchinson", "hutch++")}
  spread = {m: np.std([r.estimate for r in rs], ddof=1) for m, rs in runs.items()}
  reported = {m: np.mean([r.std_error for r in rs]) for m, rs in runs.items()}
  assert spread["hutch++"] < 0.01 * spread["hutchinson"], spread  # measured: 0.002
  for m in runs:  # the reported standard errors describe the spread over seeds
    assert 0.4 < reported[m] / spread[m] < 2.5, (m, reported, spread)
    assert abs(np.mean([r.estimate for r in runs[m]]) - exact) < 4 * spread[m] / 8 ** 0.5


def test_slq_moments(model):
  f, params, x, kernel = model
  dim = N * O
  sd = nm.spectral_density(f, params, x, num_probes=12, num_steps=10)
  assert sd.nodes.shape == sd.weights.shape == (12, 10) and sd.matvecs == 120
  np.testing.assert_allclose(sd.weights.sum(axis=1), 1, rtol=1e-12)
  z = np.asarray(_probes(jax.random.key(0), np.arange(12), dim, np.float64))
  evals = np.linalg.eigvalsh(kernel)
  for p in range(5):
    est = sd.trace(lambda t, p=p: t ** p)
    # Gauss quadrature with 10 nodes is exact for degree < 20: per probe, zᵀ Kᵖ z.
    kp = np.linalg.matrix_power(kernel, p)
    np.testing.assert_allclose(est.samples, np.einsum("pi,ij,pj->p", z, kp, z), rtol=1e-9)
    exact = np.sum(evals ** p)
    assert abs(est.estimate - exact) < 4 * est.std_error + 1e-9 * exact, (p, est, exact)
  assert abs(np.trapezoid(sd.density, sd.grid) - 1) < 1e-3


def test_slq_density_against_exact_smoothed():
  rng = np.random.default_rng(1)
  evals = np.concatenate([rng.uniform(0, 1, 150), rng.uniform(3, 4, 50)])
  matvec = dense_operator(np.diag(evals))
  grid = np.linspace(-0.5, 4.5, 101)
  sd = nm.operator_spectral_density(matvec, 200, num_probes=40, num_steps=30, grid=grid,
                                    sigma=0.2, key=jax.random.key(5))
  exact = np.exp(-0.5 * ((grid[:, None] - evals) / 0.2) ** 2).sum(1) / (200 * 0.2 * np.sqrt(
      2 * np.pi))
  assert sd.sigma == 0.2 and sd.density.shape == (101,)
  l1 = np.trapezoid(np.abs(sd.density - exact), grid)
  assert l1 < 0.1, l1
  np.testing.assert_allclose(sd.smoothed(grid, 0.2), sd.density)


def test_nonfinite_operator_gives_nan():
  bad = lambda v: v * jnp.nan
  assert np.isnan(nm.operator_trace_estimate(bad, 40, num_probes=6).estimate)
  assert np.isnan(nm.operator_spectral_density(bad, 40, num_probes=2).nodes).all()
  pairs = nm.operator_top_eigenpairs(bad, 40, 2, max_vectors=10)
  assert np.isnan(pairs.eigenvalues).all() and not bool(pairs.converged.any())


@pytest.mark.slow
def test_float32_model_converges_at_its_default_tol():
  net = hk.without_apply_rng(hk.transform(mlp))
  x = jax.random.normal(jax.random.key(0), (100, 4), jnp.float32)
  params = net.init(jax.random.key(1), x)
  pairs = nm.top_eigenpairs(net.apply, params, x, 3, max_vectors=60)
  assert pairs.eigenvalues.dtype == jnp.float32 and pairs.tol == pytest.approx(3.45e-4, 0.01)
  assert bool(pairs.converged.all())
  k = np.asarray(nm.flatten(ntklayers.ntk_fn(net.apply)(params, x)), np.float64)
  assert rel(pairs.eigenvalues, np.linalg.eigvalsh(k)[::-1][:3]).max() < 1e-4


def test_progress_bar(capsys):
  pytest.importorskip("tqdm")
  nm.operator_trace_estimate(dense_operator(np.eye(30)), 30, num_probes=6, progress=True)
  assert "hutch++ trace [30]" in capsys.readouterr().err


def _op(a=None):
  return dense_operator(np.eye(40) if a is None else a)


@pytest.mark.parametrize("call,match", [
    (lambda: nm.operator_top_eigenpairs(_op(), 40, 41), r"`k`=41 exceeds .* `dim`=40"),
    (lambda: nm.operator_top_eigenpairs(_op(), 40, 0), r"`k` must be a positive int"),
    (lambda: nm.operator_top_eigenpairs(_op(), 40, 2, method="power"), r"`method`"),
    (lambda: nm.operator_top_eigenpairs(_op(), 40, 2, tol=0.), r"`tol`"),
    (lambda: nm.operator_top_eigenpairs(_op(), 40, 4, max_vectors=3), r"`max_vectors`=3"),
    (lambda: nm.operator_top_eigenpairs(_op(), 40, 2, start_vectors=3),
     r"`start_vectors`=3 must be <= `k`=2"),
    (lambda: nm.operator_top_eigenpairs(_op(), 40, 8, method="lobpcg"), r"5·`k` < `dim`"),
    (lambda: nm.operator_top_eigenpairs(_op(), 40, 2, matvec_batch=0), r"`matvec_batch`"),
    (lambda: nm.operator_top_eigenpairs(lambda v: v[:3], 40, 2), r"`matvec` must map \[40\]"),
    (lambda: nm.operator_top_eigenpairs(_op(), 0, 1), r"`dim` must be a positive int"),
    (lambda: nm.operator_top_eigenpairs(_op(), 40, 1, dtype=jnp.int32), r"`dtype`"),
    (lambda: nm.operator_trace_estimate(_op(), 40, num_probes=0), r"`num_probes`"),
    (lambda: nm.operator_trace_estimate(_op(), 40, num_probes=-3), r"`num_probes`"),
    (lambda: nm.operator_trace_estimate(_op(), 40, num_probes=2), r"`num_probes` >= 3"),
    (lambda: nm.operator_trace_estimate(_op(), 40, method="exact"), r"`method`"),
    (lambda: nm.operator_spectral_density(_op(), 40, num_probes=0), r"`num_probes`"),
    (lambda: nm.operator_spectral_density(_op(), 40, num_steps=0), r"`num_steps`"),
    (lambda: nm.operator_spectral_density(_op(), 40, sigma=-1.), r"`sigma`"),
    (lambda: nm.operator_spectral_density(_op(), 40, grid=np.zeros((2, 2))), r"`grid`"),
    (lambda: nm.operator_spectral_density(lambda v: v[:3], 40), r"`matvec` must map"),
])
def test_bad_inputs_value_errors(call, match):
  with pytest.raises(ValueError, match=match):
    call()


def test_bad_inputs_type_errors(model):
  f, params, x, _ = model
  with pytest.raises(TypeError, match="`matvec` must be callable"):
    nm.operator_trace_estimate(None, 40)
  with pytest.raises(TypeError, match="`key` must be a PRNG key"):
    nm.operator_trace_estimate(_op(), 40, key=0)
  with pytest.raises(TypeError, match="`progress`"):
    nm.operator_trace_estimate(_op(), 40, progress="yes")
  with pytest.raises(TypeError, match="`layerwise` must be a bool"):
    nm.trace_estimate(f, params, x, layerwise=1)
  with pytest.raises(ValueError, match="`group_fn` names layers"):
    nm.trace_estimate(f, params, x, group_fn=ntklayers.init.module_path)
  with pytest.raises(ValueError, match=r"`k`=91 exceeds"):
    nm.top_eigenpairs(f, params, x, 91)
  with pytest.raises(ValueError, match="No trainable parameters"):
    nm.trace_estimate(f, params, x, layerwise=True, group_fn=lambda path: None)
