"""``ntklayers.metrics`` against NumPy/SciPy on random PSD matrices and real kernels."""

from __future__ import annotations

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.linalg

import ntklayers
import ntklayers.metrics as nm
from reference import flat_jacobian

RTOL = 1e-10
N, O = 5, 3


def psd(m, rank=None, seed=0):
  b = np.random.default_rng(seed).normal(size=(m, rank or m))
  return b @ b.T


def to_layout(mat, n, *outs):
  """``[n·A·C, n·A·C]`` matrix -> interleaved ``[n, n, A, A, C, C]`` kernel."""
  k = mat.reshape((n, *outs, n, *outs))
  r = 1 + len(outs)
  return np.transpose(k, [i for a in range(r) for i in (a, r + a)])


def np_eff_rank(mat):
  ev = np.clip(scipy.linalg.eigvalsh(mat), 0, None)
  p = ev[ev > 0] / ev.sum()
  return np.exp(-np.sum(p * np.log(p)))


def np_alignment(k, t, centered=False):
  if centered:
    h = np.eye(len(k)) - 1 / len(k)
    k, t = h @ k @ h, h @ t @ h
  return np.sum(k * t) / (np.linalg.norm(k) * np.linalg.norm(t))


@pytest.fixture(scope="module")
def mlp():
  """A tiny Haiku MLP with ``ntklayers.Linear`` layers and its ``[N, N, O, O]`` kernel."""
  def fn(x):
    return ntklayers.Linear(O, name="out")(jnp.tanh(ntklayers.Linear(6, name="hidden")(x)))

  net = hk.without_apply_rng(hk.transform(fn))
  x = jax.random.normal(jax.random.key(1), (N, 4))
  params = net.init(jax.random.key(0), x)
  kernel = ntklayers.ntk_fn(net.apply)(params, x)
  return net.apply, params, x, kernel


@pytest.mark.parametrize("outs", [(), (3,), (2, 3)])
def test_flatten_and_spectrum_match_scipy(outs):
  m = N * int(np.prod(outs))
  mat = psd(m, seed=len(outs))
  K = jnp.asarray(to_layout(mat, N, *outs))
  np.testing.assert_array_equal(nm.flatten(K), mat)
  ev = scipy.linalg.eigvalsh(mat)
  np.testing.assert_allclose(nm.eigvalsh(K), ev, rtol=RTOL, atol=1e-12)
  np.testing.assert_allclose(nm.lambda_max(K), ev[-1], rtol=RTOL)
  np.testing.assert_allclose(nm.lambda_min(K), ev[0], rtol=1e-8)
  np.testing.assert_allclose(nm.condition_number(K), ev[-1] / ev[0], rtol=1e-8)
  np.testing.assert_allclose(nm.trace(K), np.trace(mat), rtol=RTOL)
  np.testing.assert_allclose(nm.effective_rank(K), np_eff_rank(mat), rtol=RTOL)


def test_flatten_rectangular_and_symmetrization():
  k = np.random.default_rng(0).normal(size=(4, 2, 3, 3))  # N1 = 4, N2 = 2
  flat = np.asarray(nm.flatten(k))
  assert flat.shape == (12, 6)
  assert flat[1 * 3 + 2, 1 * 3 + 0] == k[1, 1, 2, 0]  # row n·O + o
  a = np.random.default_rng(1).normal(size=(6, 6))
  np.testing.assert_allclose(nm.eigvalsh(a), scipy.linalg.eigvalsh((a + a.T) / 2),
                             rtol=RTOL, atol=1e-12)
  with pytest.raises(ValueError, match="square"):
    nm.eigvalsh(k)


@pytest.mark.parametrize("shape", [(5, 3, 3), (5, 5, 3), (5, 5, 2, 3), (5,)])
def test_non_full_layouts_are_rejected(shape):
  with pytest.raises(ValueError, match="diagonal_axes"):
    nm.flatten(jnp.ones(shape))
  with pytest.raises(ValueError, match="condition_number"):
    nm.condition_number(jnp.ones(shape))


def test_explicit_diagonal_axes_rejected_even_if_shape_fits():
  with pytest.raises(ValueError, match="full matrix"):
    nm.lambda_max(jnp.ones((4, 4, 2, 2)), diagonal_axes=(1, 2))


def test_real_kernel_is_j_jt_and_metrics_agree(mlp):
  f, params, x, K = mlp
  assert K.shape == (N, N, O, O)
  j = flat_jacobian(f, params, x).reshape(N * O, -1)  # rows n·O + o
  np.testing.assert_allclose(nm.flatten(K), j @ j.T, rtol=1e-10, atol=1e-12)
  ev = scipy.linalg.eigvalsh(j @ j.T)
  np.testing.assert_allclose(nm.lambda_max(K), ev[-1], rtol=1e-10)
  np.testing.assert_allclose(nm.condition_number(K), ev[-1] / ev[0], rtol=1e-6)
  np.testing.assert_allclose(nm.effective_rank(K), np_eff_rank(j @ j.T), rtol=1e-8)
  # Traces of the other layouts of the same kernel.
  k_diag = ntklayers.ntk_fn(f, diagonal_axes=(0,))(params, x)    # [N, O, O]
  k_out = ntklayers.ntk_fn(f, diagonal_axes=(-1,))(params, x)    # [N, N, O]
  k_tr = ntklayers.ntk_fn(f, trace_axes=(-1,))(params, x)        # [N, N], mean over O
  np.testing.assert_allclose(nm.trace(k_diag, diagonal_axes=(0,)), np.trace(j @ j.T),
                             rtol=1e-10)
  np.testing.assert_allclose(nm.trace(k_out, diagonal_axes=-1), np.trace(j @ j.T),
                             rtol=1e-10)
  np.testing.assert_allclose(O * nm.trace(k_tr), np.trace(j @ j.T), rtol=1e-10)
  with pytest.raises(ValueError, match="out of range"):
    nm.trace(k_out, diagonal_axes=(2,))


def test_jittable(mlp):
  K = mlp[3]
  for fn in (nm.eigvalsh, nm.lambda_max, nm.lambda_min, nm.condition_number, nm.trace,
             nm.effective_rank, nm.max_stable_lr, nm.flatten):
    np.testing.assert_allclose(jax.jit(fn)(K), fn(K), rtol=1e-12)
  labels = jnp.arange(N) % O
  aligned = jax.jit(nm.alignment, static_argnames=("centered", "num_classes"))
  np.testing.assert_allclose(aligned(K, labels, True, num_classes=O),
                             nm.alignment(K, labels, True, num_classes=O), rtol=1e-12)
  rel = jax.jit(nm.relative_change)({"a": K}, {"a": 2 * K})
  np.testing.assert_allclose(rel["a"], 0.5, rtol=1e-12)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64])
def test_condition_number_singular_is_inf(dtype):
  for ev in ([4., 1., 0.], [4., 1., -1e-9], [0., 0., 0.]):
    assert nm.condition_number(jnp.diag(jnp.asarray(ev, dtype))) == jnp.inf
  mat2 = psd(6, rank=2)
  rank2 = to_layout(mat2, 3, 2)  # [3, 3, 2, 2], rank 2
  kappa = nm.condition_number(jnp.asarray(rank2, dtype))
  assert kappa == jnp.inf or kappa > 1e4  # round-off may leave λmin > 0
  assert jnp.isnan(nm.condition_number(jnp.full((2, 2), jnp.nan, dtype)))
  np.testing.assert_allclose(nm.effective_rank(jnp.asarray(rank2, dtype)),
                             np_eff_rank(mat2), rtol=1e-4)
  assert nm.effective_rank(jnp.zeros((3, 3), dtype)) == 0
  assert nm.condition_number(jnp.eye(3, dtype=dtype)).dtype == dtype


def test_alignment_one_hot_labels():
  labels = np.array([0, 2, 1, 0, 2])
  y = np.eye(3)[labels]
  k = psd(N, seed=3)
  expected = np_alignment(k, y @ y.T)
  np.testing.assert_allclose(nm.alignment(k, labels, num_classes=3), expected, rtol=RTOL)
  np.testing.assert_allclose(nm.alignment(k, y), expected, rtol=RTOL)
  np.testing.assert_allclose(nm.alignment(y @ y.T, labels, num_classes=3), 1.0, rtol=RTOL)
  np.testing.assert_allclose(nm.alignment(k, labels, centered=True, num_classes=3),
                             np_alignment(k, y @ y.T, centered=True), rtol=RTOL)
  # Full [N, N, O, O] kernel: targets vec(Y), row n·O + o.
  kf = psd(N * 3, seed=4)
  u = y.reshape(-1, 1)
  for centered in (False, True):
    np.testing.assert_allclose(
        nm.alignment(to_layout(kf, N, 3), labels, centered, num_classes=3),
        np_alignment(kf, u @ u.T, centered), rtol=RTOL)
  with pytest.raises(ValueError, match="num_classes"):
    nm.alignment(k, labels)
  with pytest.raises(ValueError, match="batch size"):
    nm.alignment(k, labels[:3], num_classes=3)
  assert jnp.isnan(nm.alignment(k, np.zeros(N, int), centered=True, num_classes=2))


def test_alignment_regression_targets(mlp):
  rng = np.random.default_rng(5)
  y1 = rng.normal(size=N)
  k = psd(N, seed=6)
  for centered in (False, True):
    np.testing.assert_allclose(nm.alignment(k, y1, centered),
                               np_alignment(k, np.outer(y1, y1), centered), rtol=RTOL)
  K = mlp[3]
  y = rng.normal(size=(N, O))
  u = y.reshape(-1)
  np.testing.assert_allclose(nm.alignment(K, y),
                             np_alignment(np.asarray(nm.flatten(K)), np.outer(u, u)),
                             rtol=1e-10)
  with pytest.raises(ValueError, match="match neither"):
    nm.alignment(K, rng.normal(size=(N, O + 1)))


def test_relative_change_layerwise(mlp):
  f, params, x, K0 = mlp
  params_t = jax.tree.map(lambda p: 1.3 * p + 0.1, params)
  kernel_fn = ntklayers.ntk_fn(f, layerwise=True)
  d0, dt = kernel_fn(params, x), kernel_fn(params_t, x)
  rel = nm.relative_change(dt, d0)
  assert isinstance(rel, dict) and set(rel) == set(d0) and len(rel) >= 2
  for name in d0:
    a, b = np.asarray(dt[name]), np.asarray(d0[name])
    np.testing.assert_allclose(rel[name], np.linalg.norm(a - b) / np.linalg.norm(b),
                               rtol=RTOL)
  Kt = sum(dt.values())
  np.testing.assert_allclose(
      nm.relative_change(Kt, K0),
      np.linalg.norm(np.asarray(Kt) - np.asarray(K0)) / np.linalg.norm(K0), rtol=RTOL)
  with pytest.raises(ValueError, match="structure"):
    nm.relative_change(dt, {"other": K0})
  with pytest.raises(ValueError, match="shapes differ"):
    nm.relative_change(K0, K0[:2])


def test_max_stable_lr_formula():
  mat = psd(N * O, seed=7)
  K = to_layout(mat, N, O)
  lam = scipy.linalg.eigvalsh(mat)[-1]
  np.testing.assert_allclose(nm.max_stable_lr(K), 2 * N / lam, rtol=RTOL)
  np.testing.assert_allclose(nm.max_stable_lr(K, loss="sum"), 2 / lam, rtol=RTOL)
  np.testing.assert_allclose(nm.max_stable_lr(K, loss="elementwise_mean"),
                             2 * N * O / lam, rtol=RTOL)
  assert nm.max_stable_lr(jnp.zeros((N, N))) == jnp.inf
  with pytest.raises(ValueError, match="loss"):
    nm.max_stable_lr(K, loss="mse")


@pytest.mark.parametrize("loss", ["mean", "sum", "elementwise_mean"])
def test_max_stable_lr_is_the_gd_threshold(loss):
  """A linear model's kernel is constant: GD converges just below, diverges above."""
  net = hk.without_apply_rng(hk.transform(lambda x: ntklayers.Linear(O)(x)))
  x = jax.random.normal(jax.random.key(2), (N, 4))
  y = jax.random.normal(jax.random.key(3), (N, O))
  params = net.init(jax.random.key(4), x)
  bound = nm.max_stable_lr(ntklayers.ntk_fn(net.apply)(params, x), loss=loss)
  reduce = {"mean": lambda r: jnp.sum(r) / N, "sum": jnp.sum, "elementwise_mean": jnp.mean}
  loss_fn = lambda p: reduce[loss](0.5 * (net.apply(p, x) - y) ** 2)

  @jax.jit
  def final_loss(lr):
    step = lambda _, p: jax.tree.map(lambda a, g: a - lr * g, p, jax.grad(loss_fn)(p))
    return loss_fn(jax.lax.fori_loop(0, 300, step, params))

  start = loss_fn(params)
  assert final_loss(0.98 * bound) < start
  assert final_loss(1.05 * bound) > 1e3 * start
