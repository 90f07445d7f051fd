"""LSUV rescales what it can see, per slice for stacked layers, and never reports a
layer it did not touch (issue 17, class 7).

On main ``lsuv`` crashed with ``UnexpectedTracerError`` on ``hk.layer_stack``,
``hk.remat`` and ``hk.fori_loop`` models (its interceptor kept tracers from inside
the loops) and with ``Need at least one array to stack`` on a jitted ``apply``.
"""

from __future__ import annotations

import warnings

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ntklayers
import ntklayers.init as ni

X = jax.random.normal(jax.random.key(1), (64, 8), jnp.float64) * 3.0


def _build(fn):
  net = hk.without_apply_rng(hk.transform(fn))
  return net, net.init(jax.random.key(0), X)


def _stack(x):
  x = hk.Linear(16)(x)
  x = hk.layer_stack(3)(lambda h: jnp.tanh(hk.Linear(16)(h)))(x)
  return hk.Linear(2)(x)


def _stack_two_per_step(x):
  x = hk.Linear(16)(x)

  def block(h):
    h = jnp.tanh(hk.Linear(16, name="a")(h))
    return jnp.tanh(hk.Linear(16, name="b")(h) * 3.0)

  return hk.Linear(2)(hk.layer_stack(2)(block)(x))


def _remat(x):
  x = hk.Linear(16)(x)
  x = hk.remat(lambda h: jnp.tanh(ntklayers.Linear(16)(h)))(x)
  return hk.Linear(2)(x)


def _rnn(x):
  cell, inp = hk.Linear(8, name="cell"), hk.Linear(8, name="inp")

  def step(h, xt):
    h = jnp.tanh(cell(h) + inp(xt))
    return h, h

  xs = jnp.swapaxes(x.reshape(x.shape[0], 4, 2), 0, 1)  # time-major [T, N, 2]
  h, _ = hk.scan(step, jnp.zeros((x.shape[0], 8), x.dtype), xs)
  return hk.Linear(2, name="out")(h)


def _vmapped(x):
  x = hk.vmap(lambda h: jnp.tanh(hk.Linear(16, name="inner")(h)), split_rng=False)(x)
  return hk.Linear(2, name="out")(x)


def _in_loop(x):
  lin = hk.Linear(8, name="looped")
  h = hk.fori_loop(0, jnp.int32(2), lambda i, h: jnp.tanh(lin(h)), hk.Linear(8)(x))
  return hk.Linear(2, name="out")(h)


def _check_report(net, new, var):
  """Every reported variance is the one measured on the returned params."""
  measured = ni.layer_variances(net.apply, new, X)
  assert list(measured) == list(var)
  for name, v in measured.items():
    np.testing.assert_allclose(float(v), var[name], rtol=1e-9, err_msg=name)


@pytest.mark.parametrize("fn", [_stack, _stack_two_per_step])
def test_layer_stack_is_rescaled_slice_by_slice(fn):
  net, params = _build(fn)
  new, var = ni.lsuv(net.apply, params, X, key=jax.random.key(2), return_variances=True)
  stacked = [k for k in params if "layer_stack" in k]
  per_step = [k.rsplit("/", 1)[-1] for k in stacked]
  slices = [f"{k}[{l}]" for l in range(len(params[stacked[0]]["w"])) for k in stacked]
  assert list(var) == ["linear", *slices, "linear_1"], (list(var), per_step)  # forward order
  for name, v in var.items():
    assert abs(v - 1.0) < 0.1, (name, v)
  _check_report(net, new, var)
  for k in stacked:  # each slice is a (differently) rescaled orthonormal matrix
    w = np.asarray(new[k]["w"])
    scales = []
    for w_l in w:
      gram = w_l.T @ w_l
      np.testing.assert_allclose(gram / gram[0, 0], np.eye(len(gram)), atol=1e-10)
      scales.append(gram[0, 0])
    assert len(set(np.round(scales, 6))) == len(scales)
    np.testing.assert_array_equal(new[k]["b"], params[k]["b"])


def test_jitted_apply_is_unwrapped():
  net, params = _build(_stack)
  a = ni.lsuv(jax.jit(net.apply), params, X, key=jax.random.key(2))
  b = ni.lsuv(net.apply, params, X, key=jax.random.key(2))
  jax.tree.map(np.testing.assert_array_equal, a, b)
  assert list(ni.layer_variances(jax.jit(net.apply), b, X)) == list(
      ni.layer_variances(net.apply, b, X))


@pytest.mark.parametrize("fn", [_remat, _vmapped])
def test_remat_and_vmap(fn):
  net, params = _build(fn)
  new, var = ni.lsuv(net.apply, params, X, key=jax.random.key(2), return_variances=True)
  assert len(var) == sum("w" in v for v in params.values())
  assert all(abs(v - 1.0) < 0.1 for v in var.values()), var
  _check_report(net, new, var)


def test_scan_over_a_shared_layer_is_judged_on_all_steps():
  """The cell's output at every step pooled; the recurrence feeds later layers back
  into it, so LSUV sweeps again until the final variances are within ``tol``."""
  net, params = _build(_rnn)
  new, var = ni.lsuv(net.apply, params, X, key=jax.random.key(2), return_variances=True)
  assert list(var) == ["cell", "inp", "out"]
  assert all(abs(v - 1.0) < 0.1 for v in var.values()), var
  _check_report(net, new, var)


def test_a_layer_it_cannot_see_is_refused_or_skipped_never_reported():
  net, params = _build(_in_loop)
  with pytest.raises(ValueError, match=r"cannot see the output.*`looped`.*while"):
    ni.lsuv(net.apply, params, X, key=jax.random.key(2))
  with pytest.raises(ValueError, match="skip_unsupported=True"):
    ni.layer_variances(net.apply, params, X)
  with pytest.warns(UserWarning, match=r"lsuv cannot see .*looped.*not rescaled"):
    new, var = ni.lsuv(net.apply, params, X, key=jax.random.key(2), return_variances=True,
                       skip_unsupported=True)
  assert "looped" not in var and set(var) == {"linear", "out"}
  jax.tree.map(np.testing.assert_array_equal, new["looped"], params["looped"])  # untouched
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", UserWarning)
    assert list(ni.layer_variances(net.apply, new, X, skip_unsupported=True)) == list(var)


def test_stacked_slices_ortho_keys_follow_forward_order():
  """Slice ``l`` of a stacked ``w`` gets ``fold_in(key, i)`` with ``i`` its place in
  forward order, like an unrolled model's layer ``i``."""
  net, params = _build(_stack)
  new = ni.lsuv(net.apply, params, X, key=jax.random.key(5), max_iters=1, tol=1e9)
  ortho = jax.nn.initializers.orthogonal()
  k = next(k for k in params if "layer_stack" in k)
  for l in range(3):
    expected = ortho(jax.random.fold_in(jax.random.key(5), 1 + l), (16, 16), jnp.float64)
    np.testing.assert_array_equal(new[k]["w"][l], expected)


def test_argument_errors():
  net, params = _build(_stack)
  for kw in ({"tol": 0.0}, {"max_iters": 0}, {"max_iters": True}):
    with pytest.raises(ValueError, match="tol > 0 and max_iters >= 1"):
      ni.lsuv(net.apply, params, X, key=jax.random.key(0), **kw)
  with pytest.raises(ValueError, match="empty batch"):
    ni.lsuv(net.apply, params, X[:0], key=jax.random.key(0))
