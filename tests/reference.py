"""An independent reference NTK: ``jax.jacrev`` of ``f`` and NumPy (no ntklayers code).

``reference_ntk(f, params, x1, x2)`` differentiates the *whole* batch
(``f(params, x1)``, so samples that interact, e.g. BatchNorm in training mode,
are handled by definition), contracts the Jacobians over all (trainable)
parameters into the full kernel ``[*out1_shape, *out2_shape]``, then applies the
neural-tangents conventions with its own code:

* the kernel of outputs ``[N, A, C]`` is ``[N1, N2, A, A, C, C]`` (axes paired);
* traced axes are contracted and divided by their size (averaged);
* diagonal axes keep ``i1 == i2`` and appear once, in place of the pair.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

# The one tolerance policy of the suite (``rel_err = max|K - K_ref| / max|K_ref|``):
#
# * ``TOL64``: float64 parameters and inputs. ntklayers computes the same quantity as
#   the reference by another contraction order, so only float64 rounding separates
#   the two (observed: <= 1e-15).
# * ``TOL32``: a float32 kernel against the float64 reference of the *same*
#   parameters and inputs upcast to float64: a few hundred float32 ulps
#   (2**-23 ~ 1.2e-7) accumulated over contractions of a few hundred terms, with
#   margin. Well-conditioned models only.
TOL64 = 1e-10
TOL32 = 1e-4

# Every value of ``ntk_fn(..., implementation=...)``.
IMPLEMENTATIONS = ("auto", "structured", "ntk_vp", "jacobian")


def flat_jacobian(f, params: Any, x: Any, mask: Any = None) -> np.ndarray:
  """``[*out_shape, P]``: Jacobian of ``f(params, x)`` w.r.t. the masked-in leaves.

  Args:
    f: ``f(params, x) -> array``.
    params: parameter pytree.
    x: one batch.
    mask: ``None`` (all leaves) or a pytree of bools with the structure of
      ``params``.
  """
  leaves, treedef = jax.tree.flatten(params)
  if mask is None:
    keep = [True] * len(leaves)
  else:
    keep = jax.tree.leaves(mask)
    assert len(keep) == len(leaves), (mask, params)
  idx = [i for i, k in enumerate(keep) if k]
  sub = [leaves[i] for i in idx]

  def g(sub_leaves):
    new = list(leaves)
    for i, v in zip(idx, sub_leaves):
      new[i] = v
    return f(jax.tree.unflatten(treedef, new), x)

  out_shape = jax.eval_shape(g, sub).shape
  jac = jax.jit(jax.jacrev(g))(sub)  # per leaf: [*out_shape, *leaf_shape]
  parts = [np.asarray(j).reshape(out_shape + (-1,)) for j in jac]
  return np.concatenate(parts, axis=-1)


_JACOBIANS: dict[Any, tuple[np.ndarray, np.ndarray]] = {}


def batch_jacobians(f, params: Any, x1: Any, x2: Any, *, coupled: bool,
                    cache_key: Any = None) -> tuple[np.ndarray, np.ndarray]:
  """Reference Jacobians ``(J(x1), J(x2))`` w.r.t. all leaves of ``params``.

  ``coupled``: examples interact inside ``f``, so each batch is differentiated
  whole. Otherwise both batches go through one Jacobian of the concatenated batch
  (one compilation instead of two). ``cache_key`` (e.g. a registry model's name):
  the result is kept for the rest of the process, so that test files checking the
  same model share one reference (compilation dominates the suite's run time).
  """
  if cache_key is not None:
    if cache_key not in _JACOBIANS:
      _JACOBIANS[cache_key] = batch_jacobians(f, params, x1, x2, coupled=coupled)
    return _JACOBIANS[cache_key]
  if coupled:
    return flat_jacobian(f, params, x1), flat_jacobian(f, params, x2)
  x12 = jax.tree.map(lambda a, b: jnp.concatenate([a, b]), x1, x2)
  j = flat_jacobian(f, params, x12)
  n1 = jax.tree.leaves(x1)[0].shape[0]
  return j[:n1], j[n1:]


def mask_columns(params: Any, mask: Any) -> np.ndarray:
  """Boolean selector of the columns of ``flat_jacobian(f, params, x)`` (all leaves)
  that belong to the masked-in leaves of ``mask`` (a pytree of bools like ``params``)."""
  sizes = [int(np.size(leaf)) for leaf in jax.tree.leaves(params)]
  keep = jax.tree.leaves(mask)
  assert len(keep) == len(sizes), (mask, params)
  return np.concatenate([np.full(n, bool(k)) for n, k in zip(sizes, keep)])


def full_kernel(j1: np.ndarray, j2: np.ndarray) -> np.ndarray:
  """``[*out1, P] x [*out2, P] -> [*out1, *out2]``."""
  return np.tensordot(j1, j2, axes=([-1], [-1]))


def apply_axes(full: np.ndarray, ndim: int, trace_axes: Sequence[int] = (),
               diagonal_axes: Sequence[int] = ()) -> np.ndarray:
  """Full kernel ``[*out1, *out2]`` (outputs of rank ``ndim``) -> NT layout."""
  trace = {a % ndim for a in trace_axes}
  diag = {a % ndim for a in diagonal_axes}
  assert not trace & diag
  # Interleave: [a0_1, a0_2, a1_1, a1_2, ...].
  k = np.transpose(full, [i for a in range(ndim) for i in (a, ndim + a)])
  # Process the last pair first so that the positions of earlier pairs stay put.
  for a in reversed(range(ndim)):
    p = 2 * a
    if a in trace:
      k = np.trace(k, axis1=p, axis2=p + 1) / k.shape[p]
    elif a in diag:
      k = np.moveaxis(np.diagonal(k, axis1=p, axis2=p + 1), -1, p)
  return k


def reference_ntk(f, params: Any, x1: Any, x2: Any = None, *,
                  trace_axes: Sequence[int] = (), diagonal_axes: Sequence[int] = (),
                  mask: Any = None) -> np.ndarray:
  """The exact empirical NTK in neural-tangents' layout (float64 NumPy if x64)."""
  j1 = flat_jacobian(f, params, x1, mask)
  j2 = j1 if x2 is None else flat_jacobian(f, params, x2, mask)
  ndim = j1.ndim - 1
  return apply_axes(full_kernel(j1, j2), ndim, trace_axes, diagonal_axes)


def rel_err(a: Any, b: Any) -> float:
  """``max|a - b| / max|b|`` (``b`` is the reference)."""
  a = np.asarray(a, np.float64)
  b = np.asarray(b, np.float64)
  assert a.shape == b.shape, (a.shape, b.shape)
  scale = np.max(np.abs(b))
  assert scale > 0, "reference kernel is identically zero"
  return float(np.max(np.abs(a - b)) / scale)


def assert_rel_close(actual: Any, expected: Any, tol: float) -> None:
  """Asserts ``rel_err(actual, expected) <= tol`` with a short failure message."""
  err = rel_err(actual, expected)
  assert err <= tol, (f"relative error {err:.3e} > tolerance {tol:.0e} "
                      f"(shape {np.shape(expected)}, max|ref| "
                      f"{np.max(np.abs(np.asarray(expected, np.float64))):.3e})")
