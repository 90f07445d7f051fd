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

from ntklayers._axes import OutputSpec, contract_full


def restrict(f: Callable, params: Any, leaf_indices: Sequence[int]):
  """Splits ``params`` into the chosen leaves and the rest.

  Returns ``(f_sub, sub, rest)`` with ``f_sub(sub, rest, x)``; the ``rest`` leaves
  pass through ``stop_gradient``, so they may be traced (see ``trace_params``)
  without adding to any derivative.
  """
  leaves, treedef = jax.tree.flatten(params)
  idx = tuple(leaf_indices)
  rest_idx = tuple(i for i in range(len(leaves)) if i not in set(idx))
  sub = [leaves[i] for i in idx]
  rest = [leaves[i] for i in rest_idx]

  def f_sub(sub_leaves, rest_leaves, x):
    new = list(leaves)
    for i, v in zip(idx, sub_leaves):
      new[i] = v
    for i, v in zip(rest_idx, rest_leaves):
      new[i] = jax.lax.stop_gradient(v)
    return f(jax.tree.unflatten(treedef, new), x)

  return f_sub, sub, rest


def jacobians(f: Callable, params: Any, x: Any, leaf_indices: Sequence[int],
              independent: bool, n_out: int, trace_params: bool = False) -> list[jnp.ndarray]:
  """Per-example Jacobians ``[N, O, P_leaf]`` for each chosen leaf.

  ``trace_params`` traces every leaf at the innermost level (needed by
  frameworks that check trace levels, e.g. flax.nnx lifted transforms).
  """
  f_sub, sub, rest = restrict(f, params, leaf_indices)
  n = jax.tree.leaves(x)[0].shape[0]
  n_params = sum(leaf.size for leaf in sub)

  def jac_of(xb, rows):
    if trace_params:
      out, vjp_fn = jax.vjp(lambda s, r: f_sub(s, r, xb), sub, rest)
      basis = jnp.eye(rows * n_out, dtype=out.dtype).reshape((rows * n_out, *out.shape))
      (js, _) = jax.vmap(vjp_fn)(basis)
      return [j.reshape(rows, n_out, -1) for j in js]
    jac = jax.jacfwd if n_params < n_out else jax.jacrev
    js = jac(lambda s: f_sub(s, rest, xb))(sub)
    return [j.reshape(rows, n_out, -1) for j in js]

  if independent:
    js = jax.vmap(lambda xn: jac_of(jax.tree.map(lambda a: a[None], xn), 1))(x)
    return [j.reshape(n, n_out, -1) for j in js]
  return jac_of(x, n)


def ntk_vp_kernel(spec: OutputSpec, f: Callable, params1: Any, x1: Any, params2: Any,
                  x2: Any, leaf_indices: Sequence[int], trace_params: bool = False) -> jnp.ndarray:
  """Kernel of the chosen leaves by NTK-vector products, in ``spec``'s working layout."""
  f1, sub1, rest1 = restrict(f, params1, leaf_indices)
  f2, sub2, rest2 = restrict(f, params2, leaf_indices)
  if trace_params:
    out2, vjp_full = jax.vjp(lambda s, r: f2(s, r, x2), sub2, rest2)
    vjp2 = lambda ct: vjp_full(ct)[:1]  # noqa: E731
    zeros = jax.tree.map(jnp.zeros_like, rest1)

    def push(v):
      return jax.jvp(lambda s, r: f1(s, r, x1), (sub1, rest1), (v, zeros))[1]
  else:
    out2, vjp2 = jax.vjp(lambda s: f2(s, rest2, x2), sub2)

    def push(v):
      return jax.jvp(lambda s: f1(s, rest1, x1), (sub1,), (v,))[1]
  size2 = math.prod(out2.shape)

  def column(ct):
    (v,) = vjp2(ct)
    return push(v)

  basis = jnp.eye(size2, dtype=out2.dtype).reshape((size2, *out2.shape))
  cols = jax.vmap(column)(basis)  # [*shape2, *shape1]
  cols = cols.reshape(tuple(out2.shape) + tuple(spec.shape1))
  nd = len(spec.shape1)
  full = jnp.moveaxis(cols, tuple(range(nd)), tuple(range(nd, 2 * nd)))
  return contract_full(spec, full)


def estimate_jacobian_bytes(n: int, n_out: int, n_params: int, itemsize: int) -> int:
  return n * n_out * n_params * itemsize


def choose(n: int, n_out: int, n_params: int, itemsize: int, flops_per_example: float,
           budget_bytes: int = 1 << 30) -> str:
  """``"jacobian"`` or ``"ntk_vp"`` for a fallback group of ``n_params`` parameters.

  Costs (paper, Table 2, with ``N1 = N2 = N``): Jacobian contraction
  ``~3 N O F + N^2 O^2 P`` FLOPs and ``N O P`` memory per batch; NTK-vector
  products ``~5 N^2 O F`` FLOPs and ``O(N O)`` memory. The Jacobian route is kept
  while its factors fit ``budget_bytes``.
  """
  jac_flops = 3.0 * n * n_out * flops_per_example + (n * n_out) ** 2 * n_params
  vp_flops = 5.0 * n * n * n_out * flops_per_example
  too_big = estimate_jacobian_bytes(n, n_out, n_params, itemsize) > budget_bytes
  return "ntk_vp" if too_big or vp_flops < jac_flops else "jacobian"
