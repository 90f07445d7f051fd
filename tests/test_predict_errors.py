"""Bad inputs to ``ntklayers.predict`` get clear errors naming the argument and the shapes."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ntklayers.predict as npr

N, NT, O = 5, 3, 2


def psd(m: int, seed: int = 0) -> jax.Array:
  a = np.random.default_rng(seed).standard_normal((m, m + 3))
  return jnp.asarray(a @ a.T / m)


@pytest.fixture(scope="module")
def d():
  rng = np.random.default_rng(0)
  return {"k": psd(N), "k4": psd(N * O).reshape(N, O, N, O).transpose(0, 2, 1, 3),
          "ktd": jnp.asarray(rng.standard_normal((NT, N))),
          "y": jnp.asarray(rng.standard_normal((N, O))),
          "f0": jnp.zeros((N, O)), "ft0": jnp.zeros((NT, O))}


MSE = lambda fx, y: 0.5 * jnp.mean((fx - y) ** 2)


def test_kernel_shapes(d):
  with pytest.raises(ValueError, match=r"`k_train_train` has shape \[5, 4\], expected \[5, 5\]"):
    npr.gradient_descent_mse(d["k"][:, :4], d["y"])
  with pytest.raises(ValueError, match=r"expected \[6, 6\]"):
    npr.gradient_descent_mse(d["k"], jnp.zeros((6, O)))
  with pytest.raises(ValueError, match=r"trace_axes=\(\)"):  # full kernel, default trace_axes
    npr.gradient_descent_mse(d["k4"], d["y"])
  with pytest.raises(ValueError, match=r"\[5, 5\]"):
    npr.gradient_descent_mse(d["k"], d["y"], trace_axes=())
  with pytest.raises(ValueError, match="batch axis 0"):
    npr.gradient_descent_mse(d["k"], d["y"], trace_axes=(0,))
  with pytest.raises(ValueError, match="must be axes of `y_train`"):
    npr.gradient_descent_mse(d["k"], d["y"], trace_axes=(3,))
  with pytest.raises(ValueError, match="batch axis"):
    npr.gradient_descent_mse(d["k"], jnp.float64(1.0))
  fn = npr.gradient_descent_mse(d["k"], d["y"])
  with pytest.raises(ValueError,
                     match=r"`k_test_train` has shape \[3, 4\], expected \[N_test, 5\]"):
    fn(1.0, d["f0"], d["ft0"], d["ktd"][:, :4])
  with pytest.raises(ValueError, match=r"`fx_train_0` of shape \[4, 2\] does not broadcast"):
    fn(1.0, jnp.zeros((4, O)))
  with pytest.raises(ValueError, match=r"`fx_test_0` of shape \[2, 2\]"):
    fn(1.0, d["f0"], jnp.zeros((2, O)), d["ktd"])


def test_symmetry_and_definiteness(d):
  bad = d["k"].at[0, 1].add(1.0)
  with pytest.raises(ValueError, match="not symmetric"):
    npr.gradient_descent_mse(bad, d["y"])
  indefinite = jnp.diag(jnp.array([1.0, 2.0, -1.0, 3.0, 4.0]))
  fn = npr.gradient_descent_mse(indefinite, d["y"])
  with pytest.raises(npr.NotPositiveSemidefiniteError, match="smallest eigenvalue .*-1"):
    fn(1.0, d["f0"])
  with pytest.raises(npr.NotPositiveSemidefiniteError, match="not positive semidefinite"):
    fn(None, d["f0"], d["ft0"], d["ktd"])
  # round-off negatives are accepted; a rank-deficient kernel works at finite t ...
  v = np.random.default_rng(1).standard_normal((N, 2))
  low = jnp.asarray(v @ v.T)
  out = npr.gradient_descent_mse(low, d["y"])(jnp.array([1.0, jnp.inf]), d["f0"], d["ft0"],
                                              d["ktd"])
  assert all(bool(jnp.isfinite(o).all()) for o in out)
  # ... but has no inverse at t=None without diag_reg
  with pytest.raises(npr.NotPositiveSemidefiniteError, match="diag_reg"):
    npr.gradient_descent_mse(low, d["y"])(None, d["f0"], d["ft0"], d["ktd"])
  ok = npr.gradient_descent_mse(low, d["y"], diag_reg=1e-3)(None, d["f0"], d["ft0"], d["ktd"])
  assert bool(jnp.isfinite(ok[1]).all())
  with pytest.raises(npr.NotPositiveSemidefiniteError):
    npr.gp_inference(indefinite, d["y"])("nngp", d["ktd"])


def test_times(d):
  fn = npr.gradient_descent_mse(d["k"], d["y"])
  with pytest.raises(ValueError, match=r"`t` must be >= 0.*-1"):
    fn(jnp.array([1.0, -1.0]), d["f0"])
  with pytest.raises(ValueError, match="NaN"):
    fn(jnp.nan, d["f0"])
  ode = npr.gradient_descent(MSE, d["k"], d["y"])
  with pytest.raises(ValueError, match=">= 0"):
    ode(-0.5, d["f0"])
  with pytest.raises(ValueError, match="infinite time"):
    ode(None, d["f0"])
  with pytest.raises(ValueError, match="finite"):
    ode(jnp.inf, d["f0"])


@pytest.mark.parametrize("lr", [0.0, -1.0, float("nan"), float("inf")])
def test_learning_rate_values(d, lr):
  with pytest.raises(ValueError, match="`learning_rate`"):
    npr.gradient_descent_mse(d["k"], d["y"], learning_rate=lr)
  with pytest.raises(ValueError, match="`learning_rate`"):
    npr.gradient_descent(MSE, d["k"], d["y"], learning_rate=lr)


def test_bad_scalars(d):
  for lr in ("1", True, None, jnp.ones(2)):
    with pytest.raises(TypeError, match="`learning_rate` must be a real scalar"):
      npr.gradient_descent_mse(d["k"], d["y"], learning_rate=lr)
  with pytest.raises(ValueError, match="`diag_reg` must be >= 0"):
    npr.gradient_descent_mse(d["k"], d["y"], diag_reg=-1.0)
  with pytest.raises(ValueError, match=r"`momentum` must be in \[0, 1\)"):
    npr.gradient_descent(MSE, d["k"], d["y"], momentum=1.0)
  with pytest.raises(ValueError, match="`y_train_size`"):
    npr.max_learning_rate(d["k"], y_train_size=0)
  with pytest.raises(ValueError, match="not square"):
    npr.max_learning_rate(jnp.ones((3, 4)))


def test_losses(d):
  with pytest.raises(ValueError, match=r"`loss` must return a scalar, got \[5, 2\]"):
    npr.gradient_descent(lambda fx, y: (fx - y) ** 2, d["k"], d["y"])
  with pytest.raises(TypeError, match="not differentiable|failed"):
    npr.gradient_descent(lambda fx, y: float(np.asarray(fx).sum()), d["k"], d["y"])
  with pytest.raises(TypeError, match="real float scalar"):
    npr.gradient_descent(lambda fx, y: jnp.argmax(fx), d["k"], d["y"])
  with pytest.raises(TypeError, match="failed on fx_train"):
    npr.gradient_descent(lambda fx: jnp.sum(fx), d["k"], d["y"])
  with pytest.raises(TypeError, match="callable"):
    npr.gradient_descent("mse", d["k"], d["y"])


def test_requested_outputs(d):
  fn = npr.gradient_descent_mse(d["k"], d["y"])
  with pytest.raises(ValueError, match="Both `fx_train_0` and `fx_test_0` are None"):
    fn(1.0, None)
  with pytest.raises(ValueError, match="needs the test-train kernel|`k_test_train` is None"):
    fn(1.0, d["f0"], d["ft0"])
  ode = npr.gradient_descent(MSE, d["k"], d["y"])
  with pytest.raises(ValueError, match="`fx_test_0` must be None when an ODEState"):
    ode(1.0, npr.ODEState(d["f0"]), d["ft0"], d["ktd"])
  with pytest.raises(ValueError, match="momentum"):
    ode(1.0, npr.ODEState(d["f0"], qx_train=d["f0"]))


def test_gp_errors(d):
  fn = npr.gp_inference(d["k"], d["y"])
  with pytest.raises(ValueError, match="needs both NTK and NNGP"):
    fn("ntk", d["ktd"], jnp.eye(NT))
  with pytest.raises(ValueError, match="`get` entries must be among"):
    fn("gp", d["ktd"])
  with pytest.raises(ValueError, match="unique"):
    fn(("ntk", "ntk"), d["ktd"])
  with pytest.raises(ValueError, match=r"`k_test_test` has shape \[2, 2\], expected \[3, 3\]"):
    fn("nngp", d["ktd"], jnp.eye(2))
  with pytest.raises(ValueError, match="no 'nngp' kernel"):
    npr.gp_inference({"ntk": d["k"]}, d["y"])("nngp", {"ntk": d["ktd"]})
