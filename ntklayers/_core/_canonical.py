"""Canonical factor layouts: the rule's ``(x, g)`` of one captured call, and their
shapes for the cost model of ``implementation="auto"`` (``_routes``).

A captured call gives a primal ``[*loops, M, ...]`` and cotangents
``[B, *loops, M, ...]``; its rule's ``canonicalize`` and the loop bookkeeping here
turn them into ``x [S, Nx, T, ...]`` and ``g [S, N, O, T, ...]`` (``S``: the loops
that slice the parameters; ``T``: positions sharing them, reusing loops included).
The cost model needs only their shapes, computed abstractly and cached.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import jax
import jax.numpy as jnp

from ntklayers._core import _cost
from ntklayers._core import _routes
from ntklayers._core._axes import OutputSpec
from ntklayers._core._options import Options
from ntklayers._core._plan import Plan
from ntklayers._core._rule import rule_of


def canonical(record, primal, cot, n: int, n_out: int, coupled: bool):
  """Canonical ``(x [S, Nx, T, ...], g [S, N, O, T, ...])`` of one call.

  ``primal`` is ``[*loops, M, ...]`` and ``cot`` ``[B, *loops, M, ...]``. Loops
  that slice the parameters become the stack axis ``S``; loops that reuse them
  are folded into the sharing axis ``T`` (cross terms between steps included).
  """
  rule = rule_of(record.kind)
  cfg = record.config
  loops = record.loops
  if not loops:
    xc, gc = rule.canonicalize(cfg, primal, cot)
    xc, gc = xc[None], gc[None]
  else:
    nl = len(loops)
    p = primal.reshape((record.steps,) + primal.shape[nl:])
    c = cot.reshape((cot.shape[0], record.steps) + cot.shape[1 + nl:])
    xc, gc = jax.vmap(lambda a, b: rule.canonicalize(cfg, a, b), in_axes=(0, 1))(p, c)
    xc = _split_loops(xc.reshape(loops + xc.shape[1:]), record, 0)
    gc = _split_loops(gc.reshape(loops + gc.shape[1:]), record, 1)
  m, t = xc.shape[1:3]
  s = xc.shape[0]
  if not coupled:  # gc: [S, O, N, T, ...] -> [S, N, O, T, ...]
    return xc, jnp.swapaxes(gc, 1, 2)
  # Samples interact: rows of the layer are a sharing axis of every example.
  xc = xc.reshape((s, 1, m * t) + xc.shape[3:])
  gc = gc.reshape((s, n, n_out, m * t) + gc.shape[4:])
  return xc, gc


def _split_loops(a: jax.Array, record, lead: int) -> jax.Array:
  """``[*loops, (B,) M, T, ...]`` -> ``[S, (B,) M, R * T, ...]``: slicing loops to
  the front (flattened), reusing loops ``R`` merged into the sharing axis ``T``."""
  nl = len(record.loops)
  stacked = list(record.stack)
  reused = [k for k in range(nl) if k not in stacked]
  rows = list(range(nl, nl + lead + 1))  # (B,) M
  rest = list(range(nl + lead + 1, a.ndim))  # T, ...
  a = jnp.transpose(a, stacked + rows + reused + rest)
  s = math.prod(record.loops[k] for k in stacked)
  r = math.prod(record.loops[k] for k in reused)
  shape = a.shape
  head = shape[len(stacked):len(stacked) + lead + 1]
  tail = shape[len(stacked) + lead + 1 + len(reused):]
  return a.reshape((s, *head, r * tail[0], *tail[1:]))


def route_shapes(options: Options, plan: Plan, traced: tuple, params: Any, mask: list,
                 xs: tuple, flops: float) -> _routes.Shapes:
  """What the cost model needs: batch and output sizes, parameter counts and each
  structured group's contraction FLOPs (from the canonical shapes of its calls,
  computed abstractly)."""
  leaves = jax.tree.leaves(params)
  out_rest = traced[0].out_shape[1:]
  n1, n2 = traced[0].out_shape[0], traced[-1].out_shape[0]
  spec = OutputSpec.create((n1, *out_rest), (n2, *out_rest), options.trace_axes,
                           options.diagonal_axes)
  n_out = math.prod(out_rest)
  nn = n1 if 0 in spec.trace_axes + spec.diagonal_axes else n1 * n2
  pairs = nn * spec.output_pairs
  same = len(xs) == 1
  groups = []
  for g in plan.groups:
    size = _routes.total_size(leaves, g.leaves)
    calls = [[canonical_shape(t.records[k], t.out_shape[0], n_out, plan.coupled)
              for k in g.calls] for t in (traced[0], traced[-1])]
    groups.append(_routes.group_flops(g.op, g.roles, spec, calls[0], calls[1], same, size,
                                      n_out, pairs)[1])
  fb_leaves = [i for g in plan.fallback for i in g.leaves]
  trainable = [i for i, t in enumerate(mask) if t]
  jaxpr, n_params = traced[0].jaxpr, traced[0].n_params
  after = tuple(_cost.flops_from_first_use(jaxpr, n_params, ls) / n1
                for ls in (trainable, [i for g in plan.groups for i in g.leaves], fb_leaves))
  return _routes.Shapes(n1, n2, same, n_out, pairs, jnp.dtype(traced[0].out_dtype).itemsize,
                        flops, _routes.total_size(leaves, trainable),
                        _routes.total_size(leaves, fb_leaves), tuple(groups), after)


@functools.lru_cache(maxsize=4096)
def canonical_shape(record, n: int, n_out: int, coupled: bool) -> tuple:
  """``(x shape, g shape)`` of ``_canonical`` for one call (abstract, cached)."""
  b = n * n_out if coupled else n_out
  primal = jax.ShapeDtypeStruct(record.loops + record.primal[0], record.primal[1])
  cot = jax.ShapeDtypeStruct((b,) + record.loops + record.out[0], record.out[1])
  x, g = jax.eval_shape(lambda p, c: canonical(record, p, c, n, n_out, coupled), primal, cot)
  return tuple(x.shape), tuple(g.shape)


