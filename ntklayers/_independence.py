"""Are the examples of a batch independent, so that a kernel may be cut into tiles?

A tile's kernel is a block of the whole batch's kernel exactly when every tile's
parameter Jacobian equals the rows of the whole batch's: ``J_t = J[t]``. A static
proof (``_rowproof``: row ``n`` of the output is a function of example ``n``
only) settles it; otherwise :func:`check_tiling` compares ``sum_t J_t^T u_t``
for a random ``u`` under the tiling that will be used and under a second tiling
with another tile size. The map ``u -> sum_t (J_t - J[t])^T u_t`` vanishes only
when every ``J_t = J[t]``, so a random ``u`` exposes examples that interact
(batch means, rolls, batch-size dependence) with probability one, in ``O(b)``
memory (tiles one at a time). A batch smaller than its one tile is padded with
copies of its last example, which a batch-coupled model sees: that tile is
compared with the batch alone.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ntklayers._tiles import Tiles


def _pulled(f: Callable, params: Any, x: Any, u: np.ndarray, b: int) -> list:
  """``sum_t J_t^T u_t`` over tiles of ``b`` (last tile padded, zero cotangent)."""
  tiles = Tiles(u.shape[0], b)
  xs = tiles.stack(x)
  us = np.zeros((tiles.count * b,) + u.shape[1:], u.dtype)
  us[:u.shape[0]] = u
  us = us.reshape((tiles.count, b) + u.shape[1:])

  @jax.jit
  def run(params, xs, us):
    def step(acc, xu):
      t, c = xu
      _, vjp = jax.vjp(lambda p: f(p, t), params)
      (g,) = vjp(c.astype(acc_dtype(params)))
      return jax.tree.map(jnp.add, acc, g), None
    zeros = jax.tree.map(jnp.zeros_like, params)
    return jax.lax.scan(step, zeros, (xs, us))[0]

  return jax.tree.leaves(run(params, xs, us))


def acc_dtype(params: Any) -> Any:
  return jnp.result_type(*[leaf.dtype for leaf in jax.tree.leaves(params)])


def check_tiling(f: Callable, params: Any, x: Any, b: int) -> bool:
  """Whether tiles of ``b`` examples give the same ``J^T u`` as tiles of ``b + 1``;
  for ``b > N`` (one tile, padded with copies of the last example) whether it
  gives the same as the batch alone (``True`` when one tile is the batch)."""
  x = jax.tree.map(np.asarray, x)
  n = jax.tree.leaves(x)[0].shape[0]
  if b == n:
    return True
  out = jax.eval_shape(f, params, jax.tree.map(lambda a: a[:b], x))
  dtype = np.dtype(out.dtype)
  u = np.random.default_rng(0).standard_normal((n,) + tuple(out.shape[1:])).astype(dtype)
  g1 = _pulled(f, params, x, u, b)
  g2 = _pulled(f, params, x, u, n if b > n else b + 1)
  diff = sum(float(jnp.sum(jnp.square(a - c))) for a, c in zip(g1, g2))
  norm = sum(float(jnp.sum(jnp.square(a))) for a in g1)
  tol = 1e-4 if dtype.itemsize <= 4 else 1e-9
  return bool(np.isfinite(diff)) and diff <= tol ** 2 * max(norm, 1e-300) or not np.isfinite(
      norm)
