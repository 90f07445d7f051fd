"""``ntk_blocked`` and ``ntk_trace`` options that crashed or were unchecked (issue 17,
class 6): each works exactly (against ``ntklayers.ntk``) or raises an error that
names the argument and the shapes.

- ``trace_axes`` containing the batch axis (``(0,)``, ``(0, -1)``, ``(-2,)``, with
  and without ``x2`` of equal ``N``, outputs of rank 1 to 3, float32, masks, model
  kwargs, pytree inputs): the mean of the per-example kernels; refused with ``x2``
  of another ``N`` and with ``out=`` (the kernel has no batch axis);
- a model whose output shape depends on the batch size (``[N, N]``, ``[N, 2N]``):
  an ``InteractingExamplesError`` naming ``f`` and the shapes it returned for two
  batch sizes (exact when one tile holds the whole batch);
- ``diagonal_axes=(0,)`` with ``x2`` of another ``N``; ``ntk_trace`` with masks,
  model kwargs and pytree inputs.
"""

from __future__ import annotations

import functools
import os

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import blocked_worker as worker
import models
import ntklayers
import ntklayers.metrics
from reference import TOL32, TOL64, assert_rel_close

N, N2, B = 10, 7, 3
F, P, X, X2 = worker.problem(N, N2)
X_SAME = worker.inputs(N, seed=2)
OTHER = {None: None, "same_n": X_SAME}


def same(k, expected, tol=TOL64) -> None:
  k, expected = np.asarray(k), np.asarray(expected)
  assert k.shape == expected.shape, (k.shape, expected.shape)
  assert_rel_close(k, expected, tol)


# ---------------------------------------------------- the batch axis traced ---


@pytest.mark.parametrize("x2", [None, "same_n"])
@pytest.mark.parametrize("axes", [dict(trace_axes=(0,)), dict(trace_axes=(0, -1)),
                                  dict(trace_axes=(-2,)), dict(trace_axes=0),
                                  dict(trace_axes=(0,), diagonal_axes=(-1,))],
                         ids=["0", "0,-1", "-2", "int0", "0+diag-1"])
def test_batch_axis_traced(x2, axes):
  k = ntklayers.ntk_blocked(F, P, X, OTHER[x2], block_size=B, **axes)
  assert type(k) is np.ndarray and k.dtype == np.float64
  same(k, ntklayers.ntk(F, P, X, OTHER[x2], **axes))


@functools.lru_cache(maxsize=None)
def scalar_model():
  net = hk.without_apply_rng(hk.transform(lambda x: ntklayers.Linear(1)(x)[:, 0]))
  return net.apply, jax.tree.map(np.asarray, models.init_params(net.init, jnp.float64, X))


@pytest.mark.parametrize("x2", [None, "same_n"])
def test_batch_axis_traced_rank1_outputs(x2):
  f, params = scalar_model()
  k = ntklayers.ntk_blocked(f, params, X, OTHER[x2], block_size=B, trace_axes=0)
  assert k.shape == ()
  same(k, ntklayers.ntk(f, params, X, OTHER[x2], trace_axes=0))


@pytest.mark.parametrize("axes", [dict(trace_axes=(0, 1)), dict(trace_axes=(0, -1)),
                                  dict(trace_axes=(0,), diagonal_axes=(1,))])
def test_batch_axis_traced_rank3_outputs(axes):
  built = models.build("conv1d_seq")  # [N, T, C], N = 3
  params = jax.tree.map(np.asarray, built.params)
  k = ntklayers.ntk_blocked(built.f, params, built.x1, block_size=2, **axes)
  same(k, ntklayers.ntk(built.f, params, built.x1, **axes))


def test_batch_axis_traced_float32():
  f, p32, x32, _ = worker.problem(N, None, "float32")
  k = ntklayers.ntk_blocked(f, p32, x32, block_size=B, trace_axes=(0, -1))
  assert k.dtype == np.float32
  same(k, ntklayers.ntk(F, P, X, trace_axes=(0, -1)), TOL32)


def test_batch_axis_traced_with_masks_and_kwargs():
  mask = jax.tree.map(lambda a: a.ndim == 2, P)  # weights only
  k = ntklayers.ntk_blocked(F, P, X, X_SAME, block_size=B, trace_axes=(0,), trainable=mask)
  same(k, ntklayers.ntk(F, P, X, X_SAME, trace_axes=(0,), trainable=mask))
  k = ntklayers.ntk_blocked(F, P, X, block_size=B, trace_axes=(0, -1),
                            trainable=lambda p: mask)
  same(k, ntklayers.ntk(F, P, X, trace_axes=(0, -1), trainable=mask))

  def scaled(p, x, *, scale, act):
    return {"tanh": jnp.tanh, "sin": jnp.sin}[act](F(p, x) * scale)
  kwargs = dict(scale=np.asarray(1.7), act="sin")
  k = ntklayers.ntk_blocked(scaled, P, X, X_SAME, block_size=B, trace_axes=(0,),
                            model_kwargs=kwargs)
  same(k, ntklayers.ntk(lambda p, x: scaled(p, x, **kwargs), P, X, X_SAME, trace_axes=(0,)))


def test_batch_axis_traced_pytree_inputs():
  model = models.BY_NAME["cross_attention_mask"]
  built = models.build("cross_attention_mask")
  params = jax.tree.map(np.asarray, built.params)
  with models.expect_fallback_warning(model):
    k = ntklayers.ntk_blocked(built.f, params, built.x1, block_size=2, trace_axes=(0,))
    t = ntklayers.ntk_trace(built.f, params, built.x1, block_size=2)
  same(k, ntklayers.ntk(built.f, params, built.x1, trace_axes=(0,)))
  expected = float(ntklayers.metrics.trace(ntklayers.ntk(built.f, params, built.x1)))
  assert abs(t - expected) <= TOL64 * abs(expected)


@pytest.mark.parametrize("axes", [dict(trace_axes=(0,)), dict(trace_axes=(0, -1)),
                                  dict(diagonal_axes=(0,))])
def test_batch_axis_with_another_n_is_refused(axes):
  with pytest.raises(ValueError, match=r"`trace_axes`=.*`diagonal_axes`=.*batch axis 0.*"
                     r"N1=10 \(`x1`\) and N2=7 \(`x2`\)"):
    ntklayers.ntk_blocked(F, P, X, X2, block_size=B, **axes)


def test_batch_axis_traced_with_out_is_refused(tmp_path):
  path = tmp_path / "k.npy"
  with pytest.raises(ValueError, match=r"`trace_axes`=\(0,\) contracts the batch axis.*"
                     r"\[10, 3\].*`out`="):
    ntklayers.ntk_blocked(F, P, X, block_size=B, trace_axes=(0,), out=path)
  assert not os.listdir(tmp_path)


# ---------------------------------------- output shape depends on the batch ---


def _n_by_n(x):
  """``[N, N]``: every column the same function of its own example."""
  return ntklayers.Linear(2)(x)[:, :1] * jnp.ones((1, x.shape[0]), x.dtype)


def _n_by_2n(x):
  """``[N, 2N]``."""
  return jnp.tile(ntklayers.Linear(2)(x), (1, x.shape[0]))


@functools.lru_cache(maxsize=None)
def batch_dependent(fn):
  net = hk.without_apply_rng(hk.transform(fn))
  return net.apply, jax.tree.map(np.asarray, models.init_params(net.init, jnp.float64, X))


@pytest.mark.parametrize("fn,shape", [(_n_by_n, r"\[10, 10\] for `x1`.*\[(3, 3|7, 7)\]"),
                                      (_n_by_2n, r"\[10, 20\] for `x1`.*\[(3, 6|7, 14)\]")],
                         ids=["NxN", "Nx2N"])
def test_output_shape_depending_on_the_batch_is_refused(tmp_path, fn, shape):
  f, params = batch_dependent(fn)
  match = rf"output shape of `f` depends on the batch size: `f` returned {shape}"
  for call in (
      lambda: ntklayers.ntk_blocked(f, params, X, block_size=B),
      lambda: ntklayers.ntk_blocked(f, params, X, X2, block_size=B),
      lambda: ntklayers.ntk_blocked(f, params, X, block_size=B, independent_samples=True),
      lambda: ntklayers.ntk_blocked(f, params, X, block_size=B, diagonal_axes=(0,)),
      lambda: ntklayers.ntk_trace(f, params, X, block_size=B),
      lambda: ntklayers.ntk_blocked(f, params, X, block_size=B, out=tmp_path / "k.npy")):
    with pytest.raises(ntklayers.InteractingExamplesError, match=match):
      call()


def test_output_shape_depending_on_the_batch_x1_vs_x2():
  f, params = batch_dependent(_n_by_n)
  with pytest.raises(ntklayers.InteractingExamplesError,
                     match=r"`f` returned \[10, 10\] for `x1` and \[7, 7\] for `x2`"):
    ntklayers.ntk_blocked(f, params, X, X2, block_size=N)


def test_output_shape_depending_on_the_batch_in_one_tile_is_exact():
  """One tile holds the whole batch: the kernel is the unblocked one."""
  f, params = batch_dependent(_n_by_n)
  same(ntklayers.ntk_blocked(f, params, X), ntklayers.ntk(f, params, X))


# ------------------------------------------------------------- ntk_trace ---


def test_ntk_trace_with_masks_and_kwargs():
  mask = jax.tree.map(lambda a: a.ndim == 2, P)
  t = ntklayers.ntk_trace(F, P, X, block_size=B, trainable=mask)
  expected = float(ntklayers.metrics.trace(ntklayers.ntk(F, P, X, trainable=mask)))
  assert abs(t - expected) <= TOL64 * abs(expected)

  def scaled(p, x, *, scale):
    return F(p, x) * scale
  t = ntklayers.ntk_trace(scaled, P, X, block_size=B, model_kwargs=dict(scale=np.asarray(2.0)))
  assert abs(t - 4 * float(ntklayers.metrics.trace(ntklayers.ntk(F, P, X)))) <= 1e-9 * abs(t)


# ------------------------------------------------ a batch padded to its tile ---


def _batch_softmax(x):
  """Examples coupled by a softmax over the batch of inputs."""
  return hk.Linear(2)(jnp.tanh(ntklayers.Linear(3)(jax.nn.softmax(x, axis=0))))


@pytest.mark.parametrize("n1,n2,block_size", [(3, 4, None), (3, 4, 4), (4, 3, 6)])
def test_coupled_batch_padded_to_one_tile_is_refused_or_exact(n1, n2, block_size):
  """``x1`` and ``x2`` of different sizes share one tile size: the smaller batch is
  padded with copies of its last example, which a batch-coupled model sees. (The
  runtime row check refuses this model; one that it did not, found by
  tests/test_fuzz_blocked.py, returned a kernel 7 % off: its EXAMPLES[2].)"""
  f, params = batch_dependent(_batch_softmax)
  x1, x2 = X[:n1], X2[:n2]
  try:
    k = ntklayers.ntk_blocked(f, params, x1, x2, block_size=block_size)
  except ntklayers.InteractingExamplesError:
    return
  same(k, ntklayers.ntk(f, params, x1, x2))


# --------------------------------------------- layer rows are not examples ---


def _reversed_rows(x):
  """Independent examples, but the layer sees the batch reversed."""
  return hk.Linear(2)(jnp.tanh(ntklayers.Linear(3)(x[::-1])[::-1]))


@pytest.mark.parametrize("x2,block_size", [(None, 3), (None, 4), ("x2", 3), ("x2", None)])
def test_layer_rows_permuted_is_exact(x2, block_size):
  """The runtime row check sees that the layer's rows are not its examples; the
  examples are independent (checked in float64), so the tiles are captured as
  samples and the kernel is exact (it was refused as interacting, found by
  tests/test_fuzz_blocked.py)."""
  f, params = batch_dependent(_reversed_rows)
  other = X2 if x2 else None
  k = ntklayers.ntk_blocked(f, params, X, other, block_size=block_size)
  same(k, ntklayers.ntk(f, params, X, other))
  k = ntklayers.ntk_blocked(f, params, X, other, block_size=block_size, trace_axes=(-1,))
  same(k, ntklayers.ntk(f, params, X, other, trace_axes=(-1,)))
