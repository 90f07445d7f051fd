"""Blocked NTK-vector products ``v ↦ J (Jᵀ v)`` against the formed kernel."""

from __future__ import annotations

import functools

import haiku as hk
import jax
import jax.numpy as jnp
import pytest

import ntklayers
import ntklayers.metrics as nm
from ntklayers._large import ntk_matvec
from reference import TOL64

N, O, H = 7, 2, 11  # H: a hidden width that no other axis has (see the jaxpr test)


def _mlp(x, scale=1.0):
  h = jnp.concatenate([x["a"], x["b"].reshape(x["b"].shape[0], -1)], axis=1)
  h = jnp.tanh(ntklayers.Linear(H, name="l1")(h))
  h = jnp.tanh(hk.Linear(H, name="l2")(h))
  return ntklayers.Linear(O, name="l3")(h) * scale


def _batch(n):
  ka, kb = jax.random.split(jax.random.key(1))
  return {"a": jax.random.normal(ka, (n, 3)), "b": jax.random.normal(kb, (n, 2, 2))}


@pytest.fixture(scope="module")
def model():
  net = hk.without_apply_rng(hk.transform(_mlp))
  x = _batch(N)
  params = net.init(jax.random.key(0), x)
  return net.apply, params, x


def flat_kernel(K):
  """``[N1, N2, O, O] -> [N1·O, N2·O]``, row ``n·O + o`` (independent of metrics)."""
  n1, n2, o1, o2 = K.shape
  return jnp.transpose(K, (0, 2, 1, 3)).reshape(n1 * o1, n2 * o2)


@pytest.fixture(scope="module")
def kernel(model):
  f, params, x = model
  return flat_kernel(ntklayers.ntk_fn(f)(params, x))


def rel_err(a, b):
  return float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(b)))


def vectors(k=3):
  return jax.random.normal(jax.random.key(2), (k, N * O))


@pytest.mark.parametrize("block_size", [None, 1, 3, 7, 10])
def test_matches_the_kernel_under_jit(model, kernel, block_size):
  f, params, x = model
  matvec, dim, dtype = ntk_matvec(f, params, x, block_size=block_size)
  assert (dim, dtype) == (N * O, jnp.float64)
  mv = jax.jit(matvec)
  for v in vectors():
    got = mv(v)
    assert got.shape == (dim,) and got.dtype == jnp.float64
    assert rel_err(got, kernel @ v) <= TOL64


def test_eager_trainable_mask_and_model_kwargs(model):
  f, params, x = model
  mask = {"l1": {"w": False, "b": False}, "l2": {"w": True, "b": False},
          "l3": {"w": True, "b": True}}
  K = flat_kernel(ntklayers.ntk_fn(f, trainable=mask)(params, x, scale=2.0))
  matvec, _, _ = ntk_matvec(f, params, x, block_size=3, trainable=mask,
                            model_kwargs={"scale": 2.0})
  v = vectors(1)[0]
  assert rel_err(matvec(v), K @ v) <= TOL64  # eager: no outer jit
  # The scale enters the kernel squared, and the mask matters.
  full, _, _ = ntk_matvec(f, params, x, block_size=3)
  assert rel_err(matvec(v), 4 * full(v)) > 1e-3


def test_lambda_max_matrix_free_blocked(model, kernel):
  f, params, x = model

  @functools.partial(jax.jit, static_argnames=("block_size",))
  def lam(params, x, block_size):
    return nm.lambda_max_matrix_free(f, params, x, num_iters=N * O, block_size=block_size)

  expected = nm.lambda_max(ntklayers.ntk_fn(f)(params, x))
  assert abs(float(lam(params, x, block_size=3)) / float(expected) - 1) < 1e-8
  assert nm.ntk_matvec is ntk_matvec  # one implementation


def _activation_shapes(jaxpr, n):
  """Shapes of the intermediates (sub-jaxprs included) with a batch axis >= n and H."""
  found = set()
  for eqn in jaxpr.eqns:
    for var in eqn.outvars:
      shape = getattr(var.aval, "shape", ())
      if H in shape and any(d >= n for d in shape if d != H):
        found.add(tuple(shape))
    for param in eqn.params.values():
      for sub in param if isinstance(param, (tuple, list)) else (param,):
        inner = getattr(sub, "jaxpr", sub)
        if hasattr(inner, "eqns"):
          found |= _activation_shapes(inner, n)
  return found


def test_memory_is_that_of_one_tile():
  """Structurally: the blocked program never holds a hidden activation of N examples
  (every intermediate of width ``H`` has ``b`` rows); the unblocked one does."""
  n, b = 24, 4
  net = hk.without_apply_rng(hk.transform(_mlp))
  x = _batch(n)
  params = net.init(jax.random.key(0), x)

  def program(block_size):
    def run(params, x, v):
      return ntk_matvec(net.apply, params, x, block_size=block_size)[0](v)
    return jax.make_jaxpr(run)(params, x, jnp.ones(n * O)).jaxpr

  assert (n, H) in _activation_shapes(program(None), n)
  assert not _activation_shapes(program(b), n)


def test_compiled_temp_memory_does_not_grow_with_n():
  """XLA's buffer assignment: with N 8x larger, the blocked program (linearization
  included, as under ``jit``) needs the same scratch memory; the unblocked one ~6x."""
  net = hk.without_apply_rng(hk.transform(
      lambda x: hk.Linear(1)(jnp.tanh(hk.Linear(128)(jnp.tanh(hk.Linear(128)(x)))))))
  params = net.init(jax.random.key(0), jnp.ones((1, 32)))

  def temp_bytes(n, block_size):
    run = jax.jit(lambda p, x, v: ntk_matvec(net.apply, p, x, block_size=block_size)[0](v))
    stats = run.lower(params, jnp.ones((n, 32)), jnp.ones(n)).compile().memory_analysis()
    if stats is None:
      pytest.skip("this backend has no memory analysis")
    return stats.temp_size_in_bytes

  blocked = temp_bytes(512, 16) / temp_bytes(64, 16)
  unblocked = temp_bytes(512, None) / temp_bytes(64, None)
  assert blocked < 1.5 and unblocked > 4, (blocked, unblocked)


def test_errors(model):
  f, params, x = model
  for bad in (0, -2, 2.5, True, "3"):
    with pytest.raises(ValueError, match=rf"`block_size`.*{bad!r}"):
      ntk_matvec(f, params, x, block_size=bad)
  for block_size in (None, 3):
    matvec, dim, _ = ntk_matvec(f, params, x, block_size=block_size)
    with pytest.raises(ValueError, match=rf"`v` must have shape \[{dim}\].*got shape \[2, 7\]"):
      matvec(jnp.ones((2, N)))
  with pytest.raises(ValueError, match="batch axis"):
    ntk_matvec(lambda p, x: f(p, x)[:1], params, x, block_size=3)
  with pytest.raises(ValueError, match=r"tile of 3 examples"):
    ntk_matvec(lambda p, x: jnp.broadcast_to(f(p, x)[:1], (N, O)), params, x,
               block_size=3)
  with pytest.raises(ValueError, match="disagree in batch size"):
    ntk_matvec(f, params, {"a": x["a"], "b": x["b"][:3]}, block_size=3)
  with pytest.raises(TypeError, match="model_kwargs"):
    ntk_matvec(f, params, x, model_kwargs=[("scale", 2.0)])


def test_blocked_refuses_interacting_examples():
  """Tiles are refused when examples interact: a batch mean changes the outputs
  with how the batch is cut (checked on two tilings)."""
  def coupled(x):
    h = ntklayers.Linear(4)(x)
    return ntklayers.Linear(2)(h - h.mean(0, keepdims=True))

  net = hk.without_apply_rng(hk.transform(coupled))
  x = jax.random.normal(jax.random.key(0), (7, 3))
  params = net.init(jax.random.key(1), x)
  with pytest.raises(ntklayers.InteractingExamplesError, match="cut into tiles"):
    ntk_matvec(net.apply, params, x, block_size=3)
  ntk_matvec(net.apply, params, x)  # whole batch: exact, allowed
