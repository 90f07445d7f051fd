"""Tiled NTK-vector products decide from the program, never from values (issue 17,
class 5), and the matrix-free functions refuse bad requests by name (class 6).

Under the user's ``jax.jit`` the values are tracers, so a check on concrete values
cannot run: on main the same call that is refused eagerly silently tiled a
batch-centered model there (``lambda_max`` 9-16 % off).
"""

from __future__ import annotations

import functools

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import models
import ntklayers
import ntklayers.metrics as nm

N, B = 7, 3


def _net(fn):
  return hk.without_apply_rng(hk.transform(fn))


def _centered(x):
  h = ntklayers.Linear(4)(x)
  return ntklayers.Linear(2)(jnp.tanh(h - h.mean(0, keepdims=True)))


def _mlp(x):
  return ntklayers.Linear(2)(jnp.tanh(ntklayers.Linear(5)(x)))


@functools.lru_cache(maxsize=None)
def _built(name):
  fn = {"centered": _centered, "mlp": _mlp}[name]
  net = _net(fn)
  x = jax.random.normal(jax.random.key(0), (N, 3), jnp.float64)
  return net.apply, net.init(jax.random.key(1), x), x


def _exact(f, params, x):
  return float(nm.lambda_max(ntklayers.ntk_fn(f)(params, x)))


def _calls(f):
  """The two entry points, eagerly and under the user's jit."""
  lam = lambda p, x: nm.lambda_max_matrix_free(f, p, x, num_iters=2 * N, block_size=B)
  mv = lambda p, x: nm.ntk_matvec(f, p, x, block_size=B)[0](jnp.ones(2 * N))
  return {"lambda_eager": lam, "lambda_jit": jax.jit(lam),
          "matvec_eager": mv, "matvec_jit": jax.jit(mv)}


@pytest.mark.parametrize("call", ["lambda_eager", "lambda_jit", "matvec_eager", "matvec_jit"])
def test_batch_centered_model_is_refused_eagerly_and_under_jit(call):
  f, params, x = _built("centered")
  with pytest.raises(ntklayers.InteractingExamplesError, match=r"block_size`=3.*interact"):
    _calls(f)[call](params, x)
  # The whole batch at once stays exact for interacting examples.
  lam = jax.jit(lambda p, x: nm.lambda_max_matrix_free(f, p, x, num_iters=2 * N))(params, x)
  assert abs(float(lam) / _exact(f, params, x) - 1) < 1e-10


def _batch_size_models():
  return {
      "divided_by_n": lambda p, x: _built("mlp")[0](p, x) / x.shape[0],
      "reduced_ones": lambda p, x: _built("mlp")[0](p, x) * jnp.ones(x.shape[0]).sum(),
      "position": lambda p, x: _built("mlp")[0](p, x) * jnp.linspace(1., 2., x.shape[0])[:, None],
      "dropout_fixed_key": lambda p, x: _built("mlp")[0](p, x) * jax.random.bernoulli(
          jax.random.key(3), 0.5, (x.shape[0], 2)).astype(x.dtype),
  }


@pytest.mark.parametrize("name", sorted(_batch_size_models()))
@pytest.mark.parametrize("jit", [False, True])
def test_batch_size_and_position_dependence_is_refused(name, jit):
  """Rows depend on their example only, but the function changes with the batch
  size or the position in it: tiles would compute another model's kernel."""
  f = _batch_size_models()[name]
  _, params, x = _built("mlp")
  call = _calls(f)["lambda_jit" if jit else "lambda_eager"]
  with pytest.raises(ntklayers.InteractingExamplesError):
    call(params, x)


@jax.custom_vjp
def _center_grad(h):
  return h


_center_grad.defvjp(lambda h: (h, None), lambda _, g: (g - g.mean(0, keepdims=True),))


@jax.custom_jvp
def _center_tangent(h):
  return h


_center_tangent.defjvp(lambda p, t: (p[0], t[0] - t[0].mean(0, keepdims=True)))


def test_custom_derivative_rules_that_mix_rows_are_refused_under_jit():
  """The forward pass keeps rows apart; the derivative rule does not."""
  f0, params, x = _built("mlp")
  f = lambda p, x: _center_grad(f0(p, x))
  with pytest.raises(ntklayers.InteractingExamplesError, match="custom_lin"):
    _calls(f)["lambda_jit"](params, x)
  f = lambda p, x: _center_tangent(f0(p, x))
  with pytest.raises(ntklayers.InteractingExamplesError, match="reduce_sum"):
    _calls(f)["lambda_jit"](params, x)
  lam = nm.lambda_max_matrix_free(f, params, x, num_iters=2 * N)  # whole batch: exact
  assert abs(float(lam) / _exact(f, params, x) - 1) < 1e-10


def _permuted(x):
  """Independent examples, but through a permutation that the proof cannot follow."""
  perm = jnp.arange(x.shape[0])[::-1]
  return _mlp(x[perm])[jnp.argsort(perm)]


def test_independent_samples_true_skips_the_proof_and_false_refuses():
  net = _net(_permuted)
  f, (_, params, x) = net.apply, _built("mlp")
  with pytest.raises(ntklayers.InteractingExamplesError, match="independent_samples=True"):
    nm.lambda_max_matrix_free(f, params, x, block_size=B)

  @jax.jit
  def promised(p, x):
    return nm.lambda_max_matrix_free(f, p, x, num_iters=2 * N, block_size=B,
                                     independent_samples=True)

  assert abs(float(promised(params, x)) / _exact(f, params, x) - 1) < 1e-10
  g = _built("mlp")[0]
  with pytest.raises(ntklayers.InteractingExamplesError, match="independent_samples=False"):
    nm.ntk_matvec(g, params, x, block_size=B, independent_samples=False)
  nm.ntk_matvec(g, params, x, independent_samples=False)  # whole batch: allowed
  nm.ntk_matvec(g, params, x, block_size=N, independent_samples=False)  # one tile
  with pytest.raises(TypeError, match="`independent_samples`"):
    nm.ntk_matvec(g, params, x, block_size=B, independent_samples="yes")


def test_declared_coupling_is_named():
  built = models.build("batchnorm_train")
  x = jnp.concatenate([built.x1, built.x2, built.x1])
  with pytest.raises(ntklayers.InteractingExamplesError, match="BatchNorm.*batch_norm"):
    jax.jit(lambda p, x: nm.lambda_max_matrix_free(built.f, p, x, block_size=B))(
        built.params, x)


def _layer_stack(x):
  h = ntklayers.Linear(6)(x)
  h = hk.layer_stack(2)(lambda h: jnp.tanh(hk.Linear(6)(h)))(h)
  return hk.Linear(2)(h)


def _transformer(x):
  seq = ntklayers.Linear(8)(x).reshape(x.shape[0], 2, 4)
  seq = hk.LayerNorm(-1, True, True)(seq)
  seq = seq + hk.MultiHeadAttention(2, 2, w_init=hk.initializers.VarianceScaling())(seq, seq, seq)
  return hk.Linear(2)(seq.reshape(x.shape[0], -1))


def _conv(x):
  img = ntklayers.Linear(16)(x).reshape(x.shape[0], 4, 4, 1)
  img = hk.max_pool(jax.nn.relu(hk.Conv2D(2, 3)(img)), 2, 1, "SAME")
  pool = lambda h: jax.lax.reduce_window(h, 0.0, jax.lax.add, (1, 2, 2, 1), (1, 2, 2, 1),
                                         "VALID")
  return hk.Linear(2)(hk.remat(pool)(img).reshape(x.shape[0], -1))


def _rnn(x):
  cell, inp = hk.Linear(4, name="cell"), hk.Linear(4, name="inp")
  xs = jnp.stack([x, 2 * x])  # time-major

  def step(h, xt):
    h = jnp.tanh(cell(h) + inp(xt))
    return h, h

  h, _ = hk.scan(step, jnp.zeros((x.shape[0], 4), x.dtype), xs)
  return hk.Linear(2)(hk.vmap(lambda r: jnp.tanh(r), split_rng=False)(h))


def _embed(x):
  ids = jnp.clip(jnp.abs(x * 3).astype(jnp.int32), 0, 4)
  return hk.Linear(2)(hk.Embed(5, 3)(ids).reshape(x.shape[0], -1))


INDEPENDENT = {"layer_stack": _layer_stack, "transformer": _transformer, "conv": _conv,
               "rnn_vmap": _rnn, "embed": _embed}


@pytest.mark.parametrize("name", sorted(INDEPENDENT))
def test_common_independent_models_are_tiled_exactly_under_jit(name):
  net = _net(INDEPENDENT[name])
  x = jax.random.normal(jax.random.key(0), (N, 3), jnp.float64)
  params = jax.tree.map(lambda a: a.astype(jnp.float64), net.init(jax.random.key(1), x))
  f = jax.jit(net.apply)  # a jitted f is unwrapped
  K = nm.flatten(ntklayers.ntk_fn(net.apply)(params, x))
  v = jnp.linspace(-1.0, 1.0, K.shape[0])
  got = jax.jit(lambda p, x, v: nm.ntk_matvec(f, p, x, block_size=B)[0](v))(params, x, v)
  np.testing.assert_allclose(got, K @ v, rtol=1e-10, atol=1e-12)


# ------------------------------------------------------------ class 6 ---


def test_output_depending_on_the_batch_size_is_named():
  f0, params, x = _built("mlp")
  with pytest.raises(ValueError, match=r"tile of 3 examples.*\[7, 7\].*depends on the batch"):
    nm.ntk_matvec(lambda p, x: f0(p, x) @ f0(p, x).T, params, x, block_size=B)
  with pytest.raises(ValueError, match=r"`block_size`=3.*accept a tile of 3.*\[7, 3\]"):
    nm.lambda_max_matrix_free(lambda p, x: f0(p, x.reshape(N, 3)), params, x, block_size=B)
  with pytest.raises(TypeError, match=r"output of `f` must be floating.*int"):
    nm.ntk_matvec(lambda p, x: f0(p, x).astype(jnp.int32), params, x)
  with pytest.raises(ValueError, match="empty batch"):
    nm.ntk_matvec(f0, params, x[:0])


def test_lanczos_arguments_are_named():
  A = jnp.diag(jnp.arange(1.0, 5.0))
  mv = lambda v: A @ v
  assert float(nm.lanczos_lambda_max(mv, np.int64(4))) == pytest.approx(4.0)
  for name, kw in [("num_iters", {"num_iters": True}), ("num_iters", {"num_iters": 0}),
                   ("dim", {"dim": 0}), ("dim", {"dim": 2.0})]:
    with pytest.raises(ValueError, match=f"`{name}` must be a positive int"):
      nm.lanczos_lambda_max(mv, **{"dim": 4, **kw})
  for bad in (0, jnp.ones(2), jnp.ones(2, jnp.int32)):
    with pytest.raises(TypeError, match="`key` must be a PRNG key"):
      nm.lanczos_lambda_max(mv, 4, key=bad)
  nm.lanczos_lambda_max(mv, 4, key=jax.random.PRNGKey(0))  # raw keys are keys
  with pytest.raises(TypeError, match="`return_bound` must be a bool"):
    nm.lanczos_lambda_max(mv, 4, return_bound="no")
  with pytest.raises(TypeError, match="`matvec` must be callable"):
    nm.lanczos_lambda_max(A, 4)
  with pytest.raises(ValueError, match=r"`matvec` must map \[4\] \(`dim`\) to \[4\]"):
    nm.lanczos_lambda_max(lambda v: v[:3], 4)


def test_dim_that_does_not_match_the_operator_is_named():
  f, params, x = _built("mlp")
  matvec, dim, _ = nm.ntk_matvec(f, params, x, block_size=B)
  with pytest.raises(ValueError, match=r"`dim`=13.*operator's size"):
    nm.lanczos_lambda_max(matvec, dim - 1)


def test_vectors_and_model_kwargs():
  f0, params, x = _built("mlp")
  f = lambda p, x, scale=1.0: f0(p, x) * scale
  for block_size in (None, B):
    matvec, dim, _ = nm.ntk_matvec(f, params, x, block_size=block_size)
    with pytest.raises(TypeError, match="`v` must be a real vector"):
      matvec(jnp.ones(dim, jnp.complex128))
    np.testing.assert_allclose(matvec(list(np.ones(dim))), matvec(jnp.ones(dim)))
  lam1 = nm.lambda_max_matrix_free(f, params, x, num_iters=2 * N, block_size=B)
  lam2 = nm.lambda_max_matrix_free(f, params, x, num_iters=2 * N, block_size=B,
                                   model_kwargs={"scale": 2.0})
  assert float(lam2) == pytest.approx(4 * float(lam1), rel=1e-10)
  with pytest.raises(TypeError, match="`model_kwargs` must be a dict"):
    nm.lambda_max_matrix_free(f, params, x, model_kwargs=[("scale", 2.0)])


def test_non_finite_kernels_give_nan_never_a_finite_value():
  f, params, x = _built("mlp")
  bad = jax.tree.map(lambda a: a.at[(0,) * a.ndim].set(jnp.nan), params)
  for block_size in (None, B):
    lam, res = nm.lambda_max_matrix_free(f, bad, x, block_size=block_size, return_bound=True)
    assert np.isnan(float(lam)) and np.isnan(float(res))
  # NaN in a few products only: eigh of the partly NaN tridiagonal matrix would
  # return its largest finite eigenvalue.
  A = jnp.diag(jnp.arange(1.0, 9.0))
  flaky = lambda v: jnp.where(jnp.abs(v[0]) > 0.5, jnp.nan, 1.0) * (A @ v)
  lam, res = nm.lanczos_lambda_max(flaky, 8, return_bound=True)
  assert np.isnan(float(lam)) and np.isnan(float(res))
  zero = nm.lambda_max_matrix_free(lambda p, x: f(p, x) * 0.0, params, x, block_size=B)
  assert float(zero) == 0.0
