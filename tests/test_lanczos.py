"""Matrix-free ``λmax`` (Lanczos on NTK-vector products) against ``eigh``."""

from __future__ import annotations

import functools

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.linalg

import ntklayers
import ntklayers.metrics as nm
from ntklayers.metrics._lanczos import symmetric_eigenvalues
from reference import flat_jacobian

REL = 1e-6
N, O = 6, 3


def rel_err(a, b):
  return abs(float(a) - float(b)) / abs(float(b))


def dense(a):
  a = jnp.asarray(a)
  return jax.jit(functools.partial(nm.lanczos_lambda_max, lambda v: a @ v, a.shape[0],
                                   return_bound=True),
                 static_argnames=("num_iters",))


@pytest.mark.parametrize("kind", ["psd", "low_rank", "indefinite"])
def test_dense_operator_matches_eigh(kind):
  rng = np.random.default_rng(0)
  b = rng.normal(size=(30, 4 if kind == "low_rank" else 30))
  a = b @ b.T if kind != "indefinite" else (b + b.T) / 2
  expected = scipy.linalg.eigh(a, eigvals_only=True)[-1]
  lam, bound = dense(a)(num_iters=30)  # k = dim: exact up to round-off
  assert np.isfinite(lam) and rel_err(lam, expected) < 1e-10
  assert bound < 1e-6 * abs(expected)
  lam_few, bound_few = dense(a)(num_iters=12)
  assert float(lam_few) <= expected * (1 + 1e-12)  # a Rayleigh quotient: never above
  assert abs(float(lam_few) - expected) <= float(bound_few) * (1 + 1e-6) + 1e-9


@pytest.mark.parametrize("dtype,tol", [(np.float64, 1e-13), (np.float32, 1e-5)])
@pytest.mark.parametrize("dim", [1, 2, 17, 90])
def test_symmetric_eigenvalues_match_scipy(dim, dtype, tol):
  rng = np.random.default_rng(dim)
  b = rng.normal(size=(dim, max(dim // 2, 1)))  # PSD, rank-deficient beyond dim 2
  a = (b @ b.T + (rng.normal(size=(dim, dim)) if dim % 2 else 0)).astype(dtype)
  a = (a + a.T) / 2
  expected = scipy.linalg.eigh(a.astype(np.float64), eigvals_only=True)
  got = np.asarray(jax.jit(symmetric_eigenvalues)(jnp.asarray(a)))
  assert got.dtype == dtype
  np.testing.assert_allclose(got, expected, rtol=0, atol=tol * np.abs(expected).max())
  # The tangent is that of eigh: dλ_i = v_iᵀ dA v_i.
  grad = jax.grad(lambda m: jnp.sum(symmetric_eigenvalues(m) ** 2))(jnp.asarray(a))
  ref = jax.grad(lambda m: jnp.sum(jnp.linalg.eigvalsh(m, symmetrize_input=False) ** 2))(
      jnp.asarray(a))
  np.testing.assert_allclose(grad, ref, rtol=0, atol=tol * 10 * np.abs(ref).max())


def test_converges_before_dim():
  ev = np.concatenate([[10.0], np.linspace(0.0, 5.0, 199)])
  q = np.linalg.qr(np.random.default_rng(1).normal(size=(200, 200)))[0]
  lam = dense((q * ev) @ q.T)(num_iters=25)[0]
  assert rel_err(lam, 10.0) < REL


def test_argument_errors():
  with pytest.raises(ValueError, match="dim"):
    nm.lanczos_lambda_max(lambda v: v, 0)
  with pytest.raises(ValueError, match="num_iters"):
    nm.lanczos_lambda_max(lambda v: v, 3, num_iters=0)
  with pytest.raises(ValueError, match=r"map \[3\]"):
    nm.lanczos_lambda_max(lambda v: v[:2], 3)


def _mlp(x):
  h = jnp.tanh(ntklayers.Linear(8, name="l1")(x))
  h = jnp.tanh(ntklayers.Linear(8, name="l2")(h))
  return ntklayers.Linear(O, name="l3")(h)


@pytest.fixture(scope="module")
def model():
  net = hk.without_apply_rng(hk.transform(_mlp))
  x = jax.random.normal(jax.random.key(1), (N, 5))
  params = net.init(jax.random.key(0), x)
  return net.apply, params, x


@functools.partial(jax.jit, static_argnums=(0,), static_argnames=("num_iters", "trainable"))
def jit_lambda(f, params, x, num_iters=N * O, trainable=None):
  return nm.lambda_max_matrix_free(f, params, x, num_iters=num_iters, trainable=trainable,
                                   return_bound=True)


def test_matches_eigvalsh_of_the_kernel(model):
  f, params, x = model
  K = ntklayers.ntk_fn(f)(params, x)
  expected = nm.eigvalsh(K)[-1]
  lam, bound = jit_lambda(f, params, x)
  assert lam.dtype == jnp.float64
  assert rel_err(lam, expected) < REL
  assert bound < REL * expected
  lam_eager = nm.lambda_max_matrix_free(f, params, x, num_iters=12)
  assert rel_err(lam_eager, expected) < REL


def test_trainable_mask(model):
  f, params, x = model
  mask = {"l1": {"w": False, "b": False}, "l2": {"w": True, "b": False},
          "l3": {"w": True, "b": True}}
  prefix = {"l1": False, "l2": True, "l3": True}
  expected = nm.lambda_max(ntklayers.ntk_fn(f, trainable=mask)(params, x))
  assert rel_err(jit_lambda(f, params, x)[0], expected) > 1e-3  # the mask matters
  lam = nm.lambda_max_matrix_free(f, params, x, num_iters=N * O, trainable=mask)
  assert rel_err(lam, expected) < REL
  lam_prefix = nm.lambda_max_matrix_free(f, params, x, num_iters=N * O,
                                         trainable=lambda p: prefix)
  expected_prefix = nm.lambda_max(ntklayers.ntk_fn(f, trainable=prefix)(params, x))
  assert rel_err(lam_prefix, expected_prefix) < REL
  with pytest.raises(ValueError, match="No trainable"):
    nm.lambda_max_matrix_free(f, params, x, trainable=False)
  with pytest.raises(ValueError, match="prefix"):
    nm.lambda_max_matrix_free(f, params, x, trainable={"l1": True})


def test_exact_when_examples_interact(model):
  """The operator differentiates the whole batch: batch centering couples examples."""
  _, params, x = model
  net = hk.without_apply_rng(hk.transform(lambda x: _mlp(x - jnp.mean(x, 0, keepdims=True))))
  j = flat_jacobian(net.apply, params, x).reshape(N * O, -1)
  expected = scipy.linalg.eigvalsh(j @ j.T)[-1]
  assert rel_err(jit_lambda(net.apply, params, x)[0], expected) < REL


def test_float32_and_random_key(model):
  f, params, x = model
  p32, x32 = jax.tree.map(lambda a: a.astype(jnp.float32), (params, x))
  expected = nm.lambda_max(ntklayers.ntk_fn(f)(params, x))
  lam = nm.lambda_max_matrix_free(f, p32, x32, num_iters=N * O, key=jax.random.key(7))
  assert lam.dtype == jnp.float32
  assert rel_err(lam, expected) < 1e-4
