"""Exact generic kernels for parameters that no annotated layer owns.

Both routes differentiate ``f`` with respect to a *subset* of the ``params``
leaves only (the others are held fixed), so structured blocks plus fallback
blocks add up to the exact NTK:

* Jacobian contraction: per-example Jacobians ``[N, O, P]`` (``vmap`` over
  examples when samples are independent, one batched ``jacrev`` otherwise),
  contracted like any other parameter-space factor;
* NTK-vector products: ``jvp(f(x1), vjp(f(x2))(e))`` over a one-hot basis ``e``
  of the second batch's outputs; no ``[N, O, P]`` array is ever formed.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from ntklayers._core._axes import OutputSpec, contract_full
from ntklayers._core._replay import agree, check_cotangent, check_tolerance


def restrict(f: Callable, params: Any, leaf_indices: Sequence[int]):
  """Returns ``(f_sub, sub)``: ``f`` as a function of the chosen leaves only."""
  leaves, treedef = jax.tree.flatten(params)
  idx = tuple(leaf_indices)
  sub = [leaves[i] for i in idx]

  def f_sub(sub_leaves, x):
    new = list(leaves)
    for i, v in zip(idx, sub_leaves):
      new[i] = v
    return f(jax.tree.unflatten(treedef, new), x)

  return f_sub, sub


def jacobians(f: Callable, params: Any, x: Any, leaf_indices: Sequence[int],
              independent: bool, n_out: int) -> list[jnp.ndarray]:
  """Per-example Jacobians ``[N, O, P_leaf]`` for each chosen leaf."""
  f_sub, sub = restrict(f, params, leaf_indices)
  n_params = sum(leaf.size for leaf in sub)
  jac = jax.jacfwd if n_params < n_out else jax.jacrev
  if independent:
    def one(xn):
      xb = jax.tree.map(lambda a: a[None], xn)
      return jac(lambda s: f_sub(s, xb)[0])(sub)
    js = jax.vmap(one)(x)
  else:
    js = jac(lambda s: f_sub(s, x))(sub)
  n = jax.tree.leaves(x)[0].shape[0]
  return [j.reshape(n, n_out, -1) for j in js]


def check_jacobians(f: Callable, params: Any, x: Any, leaf_indices: Sequence[int],
                    jacs: Sequence[jnp.ndarray], out_shape: tuple[int, ...],
                    dtype: Any) -> jnp.ndarray:
  """Whether per-example Jacobians ``[N, O, P]`` are those of the whole batch.

  One VJP of the whole batch with the random cotangent ``r`` must equal
  ``sum_{n, o} r[n, o] J[n, o, :]``; it differs (for all ``r`` outside a set of
  measure zero) when examples interact. Returns a scalar bool array.
  """
  f_sub, sub = restrict(f, params, leaf_indices)
  r = check_cotangent(out_shape, dtype)
  _, vjp = jax.vjp(lambda s: f_sub(s, x), sub)
  (grads,) = vjp(r)
  r = r.reshape(out_shape[0], -1)
  tol = check_tolerance(dtype)
  ok = jnp.asarray(True)
  for g, j in zip(grads, jacs):
    pred = jnp.einsum("no,nop->p", r, j, precision="highest")
    ok = ok & agree(g.reshape(-1), pred, tol)
  return ok


def ntk_vp_kernel(spec: OutputSpec, f: Callable, params1: Any, x1: Any, params2: Any,
                  x2: Any, leaf_indices: Sequence[int]) -> jnp.ndarray:
  """Kernel of the chosen leaves by NTK-vector products, in ``spec``'s working layout."""
  f1, sub1 = restrict(f, params1, leaf_indices)
  f2, sub2 = restrict(f, params2, leaf_indices)
  out2, vjp2 = jax.vjp(lambda s: f2(s, x2), sub2)
  size2 = math.prod(out2.shape)

  def column(ct):
    (v,) = vjp2(ct)
    return jax.jvp(lambda s: f1(s, x1), (sub1,), (v,))[1]

  basis = jnp.eye(size2, dtype=out2.dtype).reshape((size2, *out2.shape))
  cols = jax.vmap(column)(basis)  # [*shape2, *shape1]
  cols = cols.reshape(tuple(out2.shape) + tuple(spec.shape1))
  nd = len(spec.shape1)
  full = jnp.moveaxis(cols, tuple(range(nd)), tuple(range(nd, 2 * nd)))
  return contract_full(spec, full)
