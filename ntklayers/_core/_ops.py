"""Canonical structures (*ops*) and how their factors contract into kernel blocks.

Every annotated layer is reduced (by its rule, see ``_rules.py``) to canonical
factors of one :class:`Op`, which holds in one place its per-example Jacobian,
its activation-space kernel, its cost model and its parameter roles:

* ``affine``: ``y[t, g, j] = sum_i x[t, g, i] w[g, i, j] (+ b[g, j])`` shared over
  positions ``t`` (sequence positions, conv patches, repeated calls) and split into
  ``g`` groups (grouped convolutions; ``g = 1`` for dense layers).
  ``x: [Nx, T, G, I]``, ``g: [N, O, T, G, J]``.
* ``scale``: ``y[t, c] = x[t, c] * s[c] (+ b[c])`` (LayerNorm's scale and offset).
  ``x: [Nx, T, C]``, ``g: [N, O, T, C]``.

``Nx`` is ``N`` when layer rows are the model's examples, or ``1`` when the batch
was folded into the sharing axis ``T`` (samples that interact, e.g. BatchNorm in
training mode); the letters below handle both. ``O`` is the flattened non-batch
output; it is unflattened here into the output axes named by ``OutputSpec``.

Two exact ways to contract an affine layer (paper, §3.4 and Eq. 9 / 13):

* activation space: ``K = sum_{t,s,g} (x1[t,g] . x2[s,g] + 1_b) (g1[o,t,g] . g2[q,s,g])``;
* parameter space: per-example Jacobians ``J[n,o] = sum_t x[n,t] (x) g[n,o,t]`` then
  ``K = J1 . J2``.

:func:`affine_costs` estimates both so that the cheaper one is used.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable

import jax.numpy as jnp
from jax import lax

from ntklayers._core._axes import OutputSpec

def _unflatten(g: jnp.ndarray, out_rest: tuple[int, ...]) -> jnp.ndarray:
  """``[N, O, ...] -> [N, *out_rest, ...]``."""
  return g.reshape(g.shape[:1] + out_rest + g.shape[2:])


def _batch_x(x: jnp.ndarray, n: int, letter: str, rest: str):
  """Letters for a primal ``x`` of leading size ``N`` (per example) or ``1`` (shared)."""
  if x.shape[0] == n:
    return x, letter + rest
  return x[0], rest


# ------------------------------------------------------------- Jacobians ---


def affine_jacobian(x: jnp.ndarray, g: jnp.ndarray, with_w: bool,
                    with_b: bool, precision: str = "highest") -> jnp.ndarray:
  """Per-example parameter Jacobian of an affine layer, ``[N, O, P]``."""
  n, o = g.shape[:2]
  parts = []
  if with_w:
    # One batched matrix product per example (and group): [O*J, T] @ [T, I].
    _, _, t, groups, j = g.shape
    gt = jnp.transpose(g, (0, 3, 1, 4, 2)).reshape(n, groups, o * j, t)
    if x.shape[0] == n:
      jw = lax.dot_general(gt, jnp.transpose(x, (0, 2, 1, 3)),
                           (((3,), (2,)), ((0, 1), (0, 1))), precision=precision)
    else:  # one primal shared by every example (interacting samples)
      jw = lax.dot_general(gt, jnp.transpose(x[0], (1, 0, 2)),
                           (((3,), (1,)), ((1,), (0,))), precision=precision)
      jw = jnp.swapaxes(jw, 0, 1)
    jw = jw.reshape(n, groups, o, -1)  # [N, G, O, J * I]
    if groups > 1:
      jw = jnp.swapaxes(jw, 1, 2)
    parts.append(jw.reshape(n, o, -1))
  if with_b:
    parts.append(g.sum(axis=2).reshape(n, o, -1))
  return parts[0] if len(parts) == 1 else jnp.concatenate(parts, axis=-1)


def scale_jacobian(x: jnp.ndarray, g: jnp.ndarray, with_scale: bool,
                   with_offset: bool, precision: str = "highest") -> jnp.ndarray:
  """Per-example parameter Jacobian of an elementwise scale/offset, ``[N, O, P]``."""
  n = g.shape[0]
  parts = []
  if with_scale:
    xx, xl = _batch_x(x, n, "n", "tc")
    parts.append(jnp.einsum(f"{xl},notc->noc", xx, g, precision=precision))
  if with_offset:
    parts.append(g.sum(axis=2))
  return parts[0] if len(parts) == 1 else jnp.concatenate(parts, axis=-1)


def pair_product(spec: OutputSpec, a1: jnp.ndarray, a2: jnp.ndarray) -> jnp.ndarray:
  """``sum_p a1[n, o.., p] a2[m, q.., p]`` in the working layout of ``spec``.

  ``a: [N, O, P]`` (``O`` flattened). Without diagonal axes this is one matrix
  product ``[N1*O1, P] @ [P, N2*O2]`` (traced output axes are moved next to
  ``P`` and contracted with it); otherwise an ``einsum``.
  """
  out_rest = spec.shape1[1:]
  if not spec.diagonal_axes and 0 not in spec.trace_axes:
    traced = [a for a in spec.trace_axes]
    kept = [a for a in range(1, spec.ndim) if a not in traced]
    perm = [0, *kept, *traced, spec.ndim]

    def flat(a):
      a = _unflatten(a, out_rest)
      if perm != sorted(perm):
        a = jnp.transpose(a, perm)
      rows = a.shape[0] * math.prod(a.shape[1:1 + len(kept)])
      return a.reshape(rows, -1)

    k = lax.dot_general(flat(a1), flat(a2), (((1,), (1,)), ((), ())), precision=spec.precision)
    kept_shape = tuple(spec.shape1[a] for a in kept)
    return k.reshape((spec.shape1[0], *kept_shape, spec.shape2[0], *kept_shape))
  s1, s2, res = spec.letters()
  return jnp.einsum(f"{s1}p,{s2}p->{res}", _unflatten(a1, out_rest),
                    _unflatten(a2, out_rest), precision=spec.precision)


def jacobian_kernel(spec: OutputSpec, j1: jnp.ndarray, j2: jnp.ndarray) -> jnp.ndarray:
  """``K = J1 . J2`` over parameters. ``j: [N, O, P]`` -> working layout of ``spec``."""
  return pair_product(spec, j1, j2)


# ------------------------------------------------------ activation space ---


def affine_activation_kernel(spec: OutputSpec, x1: jnp.ndarray, g1: jnp.ndarray,
                             x2: jnp.ndarray, g2: jnp.ndarray, with_w: bool,
                             with_b: bool) -> jnp.ndarray:
  """Kernel of an affine layer contracted in activation space (no Jacobians)."""
  out_rest = spec.shape1[1:]
  s1, s2, res = spec.letters()
  g1 = _unflatten(g1, out_rest)
  g2 = _unflatten(g2, out_rest)
  x1, x1l = _batch_x(x1, g1.shape[0], s1[0], "tgi")
  x2, x2l = _batch_x(x2, g2.shape[0], s2[0], "sgi")
  gram_letters = "".join(dict.fromkeys(x1l[:-3] + x2l[:-3])) + "tsg"
  if not with_w:  # bias only: sum over positions first
    return jnp.einsum(f"{s1}gj,{s2}gj->{res}", g1.sum(axis=-3), g2.sum(axis=-3),
                      precision=spec.precision)
  if (x1.shape[-3:-1] == (1, 1) and x2.shape[-3:-1] == (1, 1)
      and 0 not in spec.trace_axes):
    # No sharing axis and one group (dense layers): a plain matrix product of
    # cotangents, scaled by the input Gram matrix. (A traced batch axis pairs the
    # Gram matrix with the cotangents inside the sum: the general einsum below.)
    gram_letters = gram_letters[:-3]
    gram = jnp.einsum(f"{x1l[:-3]}i,{x2l[:-3]}i->{gram_letters}", x1[..., 0, 0, :],
                      x2[..., 0, 0, :], precision=spec.precision)
    n1, n2 = g1.shape[0], g2.shape[0]
    gg = pair_product(spec, g1[..., 0, 0, :].reshape(n1, -1, g1.shape[-1]),
                      g2[..., 0, 0, :].reshape(n2, -1, g2.shape[-1]))
    return jnp.einsum(f"{gram_letters},{res}->{res}", gram + 1 if with_b else gram, gg)
  gram = jnp.einsum(f"{x1l},{x2l}->{gram_letters}", x1, x2, precision=spec.precision)
  if with_b:
    gram = gram + 1
  return jnp.einsum(f"{gram_letters},{s1}tgj,{s2}sgj->{res}", gram, g1, g2,
                    precision=spec.precision, optimize="optimal")


# ------------------------------------------------------------------ cost ---


def affine_costs(spec: OutputSpec, calls1: list, calls2: list,
                 same: bool) -> tuple[float, float]:
  """FLOP estimates ``(activation, jacobian)`` for one affine layer.

  Args:
    spec: output layout.
    calls1: ``[(x_shape, g_shape), ...]`` per call for the first batch, with
      ``x: [Nx, T, G, I]`` and ``g: [N, O, T, G, J]``.
    calls2: the same for the second batch.
    same: whether both batches are the same cache (Jacobians formed once).
  """
  n1, n2 = spec.shape1[0], spec.shape2[0]
  nn = n1 if 0 in spec.trace_axes + spec.diagonal_axes else n1 * n2
  pairs = spec.output_pairs
  act = 0.0
  for (xs1, gs1) in calls1:
    for (xs2, _) in calls2:
      t, groups, i = xs1[1:]
      s = xs2[1]
      j = gs1[-1]
      act += nn * t * s * groups * (i + pairs * j + pairs)
  def form(calls):
    return sum(g[0] * g[1] * g[2] * g[3] * x[3] * g[4] for x, g in calls)
  i = calls1[0][0][3]
  groups, j = calls1[0][1][3:]
  jac = form(calls1) + (0 if same else form(calls2)) + nn * pairs * groups * i * j
  return float(act), float(jac)


# ------------------------------------------------------------------- ops ---


@dataclasses.dataclass(frozen=True)
class Op:
  """One canonical structure: everything the contraction needs to know about it.

  Attributes:
    name: ``"affine"``, ``"scale"``, ...
    roles: ``(weight role, offset role)`` of its parameters.
    jacobian: ``(x, g, with_weight, with_offset, precision) -> [N, O, P]`` per-example
      parameter Jacobian from canonical factors (``P``: weight then offset).
    activation_kernel: ``(spec, x1, g1, x2, g2, with_weight, with_offset) -> K``
      without Jacobians, or ``None`` if the op has only the Jacobian route.
    costs: ``(spec, calls1, calls2, same) -> (activation, jacobian)`` FLOP
      estimates from the factor shapes (``None``: Jacobian route only).
  """

  name: str
  roles: tuple[str, str]
  jacobian: Callable[..., jnp.ndarray]
  activation_kernel: Callable[..., jnp.ndarray] | None = None
  costs: Callable[..., tuple[float, float]] | None = None

  def kernel(self, spec: OutputSpec, roles: tuple[str, ...], calls1: list, calls2: list,
             same: bool) -> jnp.ndarray:
    """The kernel block of one parameter group on the cheaper route.

    ``calls`` are ``[(x, g), ...]`` canonical factors of every call that reads the
    group's parameters (weight sharing: cross terms between all calls).
    """
    with_w, with_b = self.roles[0] in roles, self.roles[1] in roles
    activation = self.activation_kernel
    use_jacobians = activation is None or self.costs is None or not with_w
    if activation is not None and self.costs is not None and not use_jacobians:
      shapes1 = [(x.shape, g.shape) for x, g in calls1]
      shapes2 = [(x.shape, g.shape) for x, g in calls2]
      act, jac = self.costs(spec, shapes1, shapes2, same)
      use_jacobians = jac < act
    if use_jacobians or activation is None:
      p = spec.precision

      def total(calls: list) -> jnp.ndarray:
        js = [self.jacobian(x, g, with_w, with_b, p) for x, g in calls]
        return functools.reduce(jnp.add, js)

      j1 = total(calls1)
      return jacobian_kernel(spec, j1, j1 if same else total(calls2))
    return functools.reduce(jnp.add, [activation(spec, x1, g1, x2, g2, with_w, with_b)
                                      for x1, g1 in calls1 for x2, g2 in calls2])


AFFINE = Op("affine", ("w", "b"), affine_jacobian, affine_activation_kernel, affine_costs)
SCALE = Op("scale", ("scale", "offset"), scale_jacobian)
