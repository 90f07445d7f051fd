"""The static row proof (``_rowproof.why_not``), in both directions.

Accepted programs keep row ``n`` of the output and of its Jacobian a function of
example ``n`` only (and, with a twin size, do not depend on the batch size);
refused programs mix rows, hide a derivative rule that may, or read the batch
size. A refusal only costs a runtime check (``ntk_fn``) or an error that asks for
``independent_samples=True`` (``ntk_matvec`` with ``block_size``): a rule that
accepted a row-mixing primitive would give a silently wrong kernel.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ntklayers._core import _rowproof

N, D = 5, 4
X = jnp.asarray(np.random.default_rng(0).standard_normal((N, D)))
W = jnp.asarray(np.random.default_rng(1).standard_normal((D, D)))


def _ln(h):
  m = h.mean(-1, keepdims=True)
  return (h - m) / jnp.sqrt(((h - m) ** 2).mean(-1, keepdims=True) + 1e-5)


def _attention(x, w):
  seq = (x @ w).reshape(x.shape[0], 2, 2)  # [N, T, d]
  a = jax.nn.softmax(jnp.einsum("ntd,nsd->nts", seq, seq), axis=-1)
  return jnp.einsum("nts,nsd->ntd", a, seq).reshape(x.shape[0], -1)


def _conv_pool(x, w):
  img = jnp.tanh(x @ w).reshape(x.shape[0], 2, 2, 1)
  k = w[:1, :2].reshape(1, 1, 1, 2)
  y = jax.lax.conv_general_dilated(img, k, (1, 1), "SAME",
                                   dimension_numbers=("NHWC", "HWIO", "NHWC"))
  y = jax.lax.reduce_window(y, -jnp.inf, jax.lax.max, (1, 2, 2, 1), (1, 1, 1, 1), "SAME")
  return jax.lax.reduce_window(y, 0.0, jax.lax.add, (1, 2, 2, 1), (1, 1, 1, 1),
                               "VALID").reshape(x.shape[0], -1)


def _layer_scan(x, w):
  ws = jnp.stack([w, 2 * w, -w])  # scanned over layers, carry batched
  return jax.lax.scan(lambda h, wl: (jnp.tanh(h @ wl), None), x, ws)[0]


def _rnn(x, w):
  h0 = jnp.zeros((x.shape[0], D), x.dtype)  # starts shared, becomes batched
  xs = jnp.stack([x, x * 2, -x])  # [T, N, D]
  return jax.lax.scan(lambda h, xt: (jnp.tanh(h @ w + xt),) * 2, h0, xs)[0]


def _map(x, w):
  return jax.lax.map(lambda xi: jnp.tanh(xi @ w), x)  # a scan over examples, no carry


def _fori(x, w):
  return jax.lax.fori_loop(0, jnp.int32(3), lambda i, h: jax.nn.relu(h @ w), x)


def _cond(x, w):
  return jax.lax.cond(w[0, 0] > 0, lambda h: h @ w, lambda h: jnp.sin(h @ w), x)


def _misc(x, w):
  h = jax.checkpoint(lambda h: jax.nn.gelu(h @ w))(x)
  h = jnp.concatenate([h, jnp.cumsum(h, 1), jnp.sort(h, 1),
                       jnp.take_along_axis(h, jnp.argsort(h, 1), 1)], 1)
  top, _ = jax.lax.top_k(h, 3)
  return jax.jit(lambda t: t * jnp.arange(3.0)[None])(top)


def _embed(x, w):
  ids = jnp.clip(jnp.abs(x[:, :2] * 2).astype(jnp.int32), 0, D - 1)
  return w[ids].reshape(x.shape[0], -1)


ACCEPTED = {
    "mlp": lambda x, w: jnp.tanh(x @ w) @ w.T,
    "layernorm": lambda x, w: _ln(x @ w),
    "attention": _attention,
    "conv_pool": _conv_pool,
    "layer_scan": _layer_scan,
    "rnn": _rnn,
    "lax_map": _map,
    "fori_loop": _fori,
    "cond": _cond,
    "remat_cumsum_sort_topk_jit": _misc,
    "embedding": _embed,
}


@jax.custom_vjp
def _mixing_bwd(h):
  return h


_mixing_bwd.defvjp(lambda h: (h, None), lambda _, g: (g - g.mean(0, keepdims=True),))


@jax.custom_jvp
def _mixing_jvp(h):
  return h


_mixing_jvp.defjvp(lambda p, t: (p[0], t[0] - t[0].mean(0, keepdims=True)))


def _dropout(x, w):
  keep = jax.random.bernoulli(jax.random.key(0), 0.5, (x.shape[0], D))
  return jnp.where(keep, x @ w, 0.0)


REFUSED = {
    "batch_mean": lambda x, w: x @ w - (x @ w).mean(0, keepdims=True),
    "gram": lambda x, w: (x @ w) @ (x @ w).T,
    "cumsum_batch": lambda x, w: jnp.cumsum(x @ w, 0),
    "sort_batch": lambda x, w: jnp.sort(x @ w, 0),
    "roll": lambda x, w: jnp.roll(x @ w, 1, 0),
    "reverse": lambda x, w: (x @ w)[::-1],
    "permute": lambda x, w: (x @ w)[jnp.array([1, 0, 2, 3, 4])],
    "scan_batch_carry": lambda x, w: jax.lax.scan(lambda c, r: (c + r, c + r), 0.0 * x[0],
                                                  x @ w)[1],
    "map_position": lambda x, w: jax.lax.map(lambda a: a[0] @ w * a[1],
                                             (x, jnp.arange(x.shape[0], dtype=x.dtype))),
    "custom_vjp_mixing": lambda x, w: _mixing_bwd(x @ w),
    "custom_jvp_mixing": lambda x, w: _mixing_jvp(x @ w),
    "while_on_batch": lambda x, w: jax.lax.while_loop(lambda h: jnp.any(h > 1), lambda h: h / 2,
                                                      x @ w),
    "cond_on_batch": lambda x, w: jax.lax.cond(jnp.sum(x) > 0, jnp.sin, jnp.cos, x @ w),
    "dropout_fixed_key": _dropout,
    "position": lambda x, w: x @ w + jnp.arange(x.shape[0], dtype=x.dtype)[:, None],
}


def _why(fun, twin_size=None, wrt=(False, True)):
  return _rowproof.why_not(fun, X, W, twin_size=twin_size, wrt=wrt)


@pytest.mark.parametrize("name", sorted(ACCEPTED))
def test_accepts_models_whose_rows_are_examples(name):
  fun = ACCEPTED[name]
  assert _rowproof.rows_are_examples(fun, X, W)
  assert _why(fun) is None
  assert _why(fun, twin_size=2) is None
  assert _why(fun, wrt=(True, True)) is None
  # The premise: a tile's Jacobian rows are those of the whole batch.
  jac = jax.jacobian(lambda w: fun(X, w))(W)
  tile = jax.jacobian(lambda w: fun(X[2:4], w))(W)
  np.testing.assert_allclose(tile, jac[2:4], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", sorted(REFUSED))
def test_refuses_programs_that_may_mix_rows(name):
  fun = REFUSED[name]
  fun(X, W)  # a valid program
  assert not _rowproof.rows_are_examples(fun, X, W)
  why = _why(fun, twin_size=2)
  assert why is not None and "could not be traced" not in why, why


@pytest.mark.parametrize("fun", [
    lambda x, w: x @ w / x.shape[0],                                # a literal
    lambda x, w: x @ w * jnp.ones(x.shape[0], x.dtype).sum(),       # a reduced broadcast
    lambda x, w: x @ w * (jnp.ones((1, x.shape[0]), x.dtype) @ jnp.ones((x.shape[0], D),
                                                                         x.dtype)),
    lambda x, w: x @ w * jnp.linspace(0.0, 1.0, x.shape[0])[:, None],
    lambda x, w: x @ w * (jnp.ones((D, x.shape[0]), x.dtype) @ jnp.ones((x.shape[0], 1),
                                                                        x.dtype)).T,
    lambda x, w: jnp.tanh(x @ w) if x.shape[0] > 3 else x @ w,      # another program
])
def test_twin_refuses_batch_size_dependence(fun):
  """Rows are examples on each batch, but the function changes with the batch size:
  a tile of 2 would not hold the whole batch's rows."""
  fun(X, W)  # a valid program
  why = _why(fun, twin_size=2)
  assert why is not None and "batch size" in why, why


def test_twin_accepts_broadcasts_along_the_batch_axis():
  def fun(x, w):
    bias = jnp.broadcast_to(w[0], (x.shape[0], D))  # shared, constant along the batch
    return jnp.concatenate([x @ w + bias, bias * 2], 1) @ jnp.ones((2 * D, 3), x.dtype)
  assert _why(fun, twin_size=2) is None
  assert _why(fun, twin_size=1) is None


def test_reasons_name_the_primitive():
  assert _why(REFUSED["batch_mean"]) == "`reduce_sum` may mix examples"
  assert "custom_lin" in _why(REFUSED["custom_vjp_mixing"])
  assert "differs at a literal" in _why(lambda x, w: x @ w / x.shape[0], twin_size=3)


@pytest.mark.parametrize("mix", [_mixing_bwd, _mixing_jvp], ids=["custom_vjp", "custom_jvp"])
def test_ntk_fn_is_exact_when_a_derivative_rule_mixes_rows(mix):
  """The forward pass keeps rows apart, the derivative rule does not: main's
  forward-only proof skipped ``ntk_fn``'s runtime check (a kernel 0.77 off)."""
  import haiku as hk  # pylint: disable=g-import-not-at-top
  import ntklayers  # pylint: disable=g-import-not-at-top

  net = hk.without_apply_rng(hk.transform(
      lambda x: ntklayers.Linear(2)(mix(jnp.tanh(ntklayers.Linear(4)(x))))))
  params = net.init(jax.random.key(1), X)
  K = ntklayers.ntk_fn(net.apply)(params, X)
  jac = jax.jacrev(lambda p: net.apply(p, X))(params)
  flat = jnp.concatenate([a.reshape(N * 2, -1) for a in jax.tree.leaves(jac)], 1)
  ref = (flat @ flat.T).reshape(N, 2, N, 2).transpose(0, 2, 1, 3)
  np.testing.assert_allclose(K, ref, rtol=1e-10, atol=1e-12)
