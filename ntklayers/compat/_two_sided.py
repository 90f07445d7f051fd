"""Kernels of two *different* functions: ``J1(x1) J2(x2)^T`` and ``f1(x1) f2(x2)^T``.

neural-tangents calls ``f(params, x1, **kwargs1)`` and ``f(params, x2, **kwargs2)``
with kwargs split per side (its ``rng`` rule gives ``x2`` another dropout key; a
2-tuple kwarg gives each side its own value). ntklayers' kernels have one model,
so when the two sides' kwargs differ this module computes the kernel directly:
whole-batch Jacobians (``jax.jacrev``, exact whatever the examples do) contracted
over the parameters, in the layout of :class:`ntklayers._core.OutputSpec`.
Memory: ``N * O * P`` per side.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from ntklayers import _core


def kernels(f: Callable, names: tuple[str, ...], trace_axes: tuple[int, ...],
            diagonal_axes: tuple[int, ...], params: Any, x1: Any, x2: Any,
            kw1: dict[str, Any], kw2: dict[str, Any]) -> list[dict[str, jax.Array]]:
  """Per output leaf of ``f``, ``{name: kernel}`` for ``names`` (``"nngp"``, ``"ntk"``)."""
  d1, s1 = _core.split_kwargs(kw1)
  d2, s2 = _core.split_kwargs(kw2)
  return _jitted(f, names, tuple(trace_axes), tuple(diagonal_axes), s1, s2, params, x1, x2,
                 d1, d2)


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3, 4, 5))
def _jitted(f, names, trace_axes, diagonal_axes, s1, s2, params, x1, x2, d1, d2):
  kw1, kw2 = s1.merge(d1), s2.merge(d2)

  def side(x, kw, i):
    return lambda p: jax.tree.leaves(f(p, x, **kw))[i]

  n_out = len(jax.tree.leaves(jax.eval_shape(lambda p: f(p, x1, **kw1), params)))
  out = []
  for i in range(n_out):
    f1, f2 = side(x1, kw1, i), side(x2, kw2, i)
    o1, o2 = f1(params), f2(params)
    spec = _core.OutputSpec.create(o1.shape, o2.shape, trace_axes, diagonal_axes)
    values = {}
    if "nngp" in names:
      values["nngp"] = _core.nngp_contract(spec, o1, o2)
    if "ntk" in names:
      values["ntk"] = _ntk(spec, jax.jacrev(f1)(params), jax.jacrev(f2)(params))
    out.append(values)
  return out


def _ntk(spec: Any, j1: Any, j2: Any) -> jax.Array:
  """``sum over parameter leaves of J1 J2^T`` in ``spec``'s final layout."""
  l1, l2, working = spec.letters()
  total = None
  for a, b in zip(jax.tree.leaves(j1), jax.tree.leaves(j2)):
    a = a.reshape(spec.shape1 + (math.prod(a.shape[len(spec.shape1):]),))
    b = b.reshape(spec.shape2 + (math.prod(b.shape[len(spec.shape2):]),))
    k = jnp.einsum(f"{l1}z,{l2}z->{working}", a, b, precision=spec.precision)
    total = k if total is None else total + k
  if total is None:
    raise ValueError("`params` has no leaves: there is nothing to differentiate.")
  return spec.finalize(total)
