"""The one independence guard of tiled kernels and tiled products (issue 17, 18).

``ntk_blocked``/``ntk_trace`` and ``ntk_matvec(block_size=b)`` decide whether a
batch may be cut into tiles with the same guard (``_large._independence``). A
model whose rows are per-example functions but that depends on the batch *size*
(``f / x.shape[0]``, a sum over a batch-sized constant, a position-dependent
term) passes a row proof of the tile's program alone, yet its tile Jacobians are
not the rows of the whole batch's: both must refuse (``InteractingExamplesError``)
or be exact, never silently differ. On 46b6203 ``ntk_blocked`` returned the first
one 84 % off and ``ntk_trace`` 8.03 for 1.29.
"""

from __future__ import annotations

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import models
import ntklayers
import ntklayers.metrics as nm
from reference import TOL64, assert_rel_close, reference_ntk

N, B = 7, 3


def _mlp(x):
  return ntklayers.Linear(2)(jnp.tanh(ntklayers.Linear(5)(x)))


NET = hk.without_apply_rng(hk.transform(_mlp))
X = jnp.asarray(np.random.default_rng(0).normal(size=(N, 4)))
PARAMS = jax.tree.map(np.asarray, models.init_params(NET.init, jnp.float64, X))

SIZE_DEPENDENT = {
    "divided_by_n": lambda p, x: NET.apply(p, x) / x.shape[0],
    "times_n": lambda p, x: NET.apply(p, x) * x.shape[0],
    "reduced_ones": lambda p, x: NET.apply(p, x) * jnp.ones(x.shape[0]).sum(),
}


@pytest.mark.parametrize("name", sorted(SIZE_DEPENDENT))
def test_blocked_refuses_or_is_exact(name):
  f = SIZE_DEPENDENT[name]
  expected = reference_ntk(f, PARAMS, X)
  try:
    k = ntklayers.ntk_blocked(f, PARAMS, X, block_size=B)
  except ntklayers.InteractingExamplesError as e:
    assert "ntk_blocked" in str(e)
  else:
    assert_rel_close(k, expected, TOL64)
  try:
    t = ntklayers.ntk_trace(f, PARAMS, X, block_size=B)
  except ntklayers.InteractingExamplesError:
    pass
  else:
    assert abs(t - float(nm.trace(expected))) <= 1e-10 * abs(t)


@pytest.mark.parametrize("name", sorted(SIZE_DEPENDENT))
def test_matvec_refuses_eagerly_and_under_jit(name):
  f = SIZE_DEPENDENT[name]
  with pytest.raises(ntklayers.InteractingExamplesError, match="block_size"):
    nm.ntk_matvec(f, PARAMS, X, block_size=B)
  with pytest.raises(ntklayers.InteractingExamplesError, match="block_size"):
    jax.jit(lambda p, x: nm.lambda_max_matrix_free(f, p, x, block_size=B))(PARAMS, X)


def test_independent_model_is_tiled_by_both():
  expected = reference_ntk(NET.apply, PARAMS, X)
  assert_rel_close(ntklayers.ntk_blocked(NET.apply, PARAMS, X, block_size=B), expected,
                   TOL64)
  matvec, dim, _ = nm.ntk_matvec(NET.apply, PARAMS, X, block_size=B)
  v = np.linspace(-1.0, 1.0, dim)
  assert_rel_close(matvec(v), nm.flatten(expected) @ v, TOL64)
