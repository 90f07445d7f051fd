"""The one independence guard of tiled kernels and tiled products.

Are the examples of a batch independent, so that a kernel (``ntk_blocked``) or
an NTK-vector product (``ntk_matvec(block_size=b)``) may be cut into tiles? A
tile's kernel is a block of the whole batch's kernel exactly when every tile's
parameter Jacobian equals the rows of the whole batch's: ``J_t = J[t]``.

* :func:`why_not_tileable` decides it from the program: the core's static row
  proof of the JVP of ``f`` on the batch, and that the program on a tile of ``b``
  examples is the same program but for the batch size (so ``f / x.shape[0]``, a
  mean over the batch or a position-dependent term are refused). The answer is
  the same eagerly and under ``jax.jit``; ``ntk_matvec`` relies on it alone.
* :func:`check_tiling` (eager only: ``ntk_blocked``, which never runs traced)
  settles what the proof cannot see: it compares ``sum_t J_t^T u_t``
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

from ntklayers import _core
from ntklayers._large._tiles import Tiles


class InteractingExamplesError(ValueError):
  """The model couples examples (BatchNorm in training, ``independent_samples=False``
  or a failed row check): a kernel cut into blocks would differ from the whole one."""


def why_not_tileable(f: Callable, params: Any, x: Any, b: int) -> str | None:
  """``None`` if it is proven, from the program of ``f(params, x)``, that tiles of
  ``b`` examples have the Jacobian rows of the whole batch; else why not.

  Also proven are the parameters' part of the JVP only: ``x`` is not
  differentiated (integer token ids are fine).
  """
  return _core.why_rows_not_examples(lambda xs, p: f(p, xs), x, params, twin_size=b,
                                     wrt=(False, True))


def coupled_layers(f: Callable, params: Any, x: Any) -> str | None:
  """Layers that declare their examples coupled (BatchNorm with batch statistics)."""
  try:
    coupled = _core.discover(f, params, x, _core.interceptors(), recognize_layers=False).coupled
  except Exception:  # pylint: disable=broad-except  # only for the message
    return None
  if not coupled:
    return None
  return (f"layers declare their examples coupled, e.g. BatchNorm with batch statistics: "
          f"{', '.join(coupled)}")


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
