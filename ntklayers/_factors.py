"""``capture``: the cached factors of one batch, as a pytree.

The cache holds, per structured group, the canonical primals and cotangents of
each call; per fallback leaf its per-example Jacobian (when the Jacobian route
was chosen); and the ``params`` and inputs (for NTK-vector products). All
structure metadata is static (pytree aux data), so caches pass through
``jax.jit`` and can be contracted many times (``contract``).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from ntklayers import _checks
from ntklayers._capture import capture_cotangents, discover
from ntklayers._fallback import choose, jacobians
from ntklayers._plan import Plan, forward_flops, make_plan, resolve_trainable
from ntklayers._rules import get_rule

@dataclasses.dataclass(frozen=True)
class CaptureMeta:
  """Static part of a :class:`Factors` cache."""

  f: Callable
  plan: Plan
  out_shape: tuple[int, ...]
  fallback_method: str
  implementation: str

  def signature(self):
    return (self.f, self.plan.groups, self.plan.fallback, self.out_shape[1:],
            self.plan.coupled)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Factors:
  """Cached NTK factors of one batch; build with :func:`ntklayers.capture`.

  Attributes:
    layers: per structured group, per call, canonical ``(primal, cotangent)``:
      affine ``x: [Nx, T, G, I]``, ``g: [N, O, T, G, J]``; scale ``x: [Nx, T, C]``,
      ``g: [N, O, T, C]``.
    fallback_jacobians: per fallback leaf, ``[N, O, P]`` (empty when the fallback
      uses NTK-vector products).
    params: the parameters the factors were captured at.
    inputs: the batch.
    meta: static structure (plan, output shape, methods).
  """

  layers: tuple
  fallback_jacobians: tuple
  params: Any
  inputs: Any
  meta: CaptureMeta = dataclasses.field(metadata=dict(static=True))

  @property
  def batch_size(self) -> int:
    return self.meta.out_shape[0]

  @property
  def layer_names(self) -> tuple[str, ...]:
    return tuple(g.name for g in self.meta.plan.groups)


def capture(f: Callable[[Any, Any], jax.Array], params: Any, x: Any, *,
            implementation: str = "auto", trainable: Any = None,
            independent_samples: bool | None = None) -> Factors:
  """Captures the NTK factors of ``f`` at ``params`` on the batch ``x``.

  Args:
    f: ``f(params, x) -> [N, ...]``, e.g. ``hk.without_apply_rng(hk.transform(fn)).apply``.
    params: parameters of ``f``.
    x: a batch (array or pytree of arrays, all with leading axis ``N``).
    implementation: ``"auto"``, ``"structured"``, ``"ntk_vp"`` or ``"jacobian"``.
    trainable: optax-style mask (pytree of bools or callable); masked-out leaves
      are excluded from the kernel.
    independent_samples: ``None`` detects samples that interact (BatchNorm in
      training mode); ``False`` declares that they do; ``True`` that they do not.

  Returns:
    A :class:`Factors` pytree to pass to :func:`ntklayers.contract`.

  Example:
    >>> import haiku as hk, jax, jax.numpy as jnp, ntklayers
    >>> net = hk.without_apply_rng(hk.transform(lambda x: ntklayers.Linear(3)(x)))
    >>> params = net.init(jax.random.key(0), jnp.ones((4, 5)))
    >>> cache = ntklayers.capture(net.apply, params, jnp.ones((4, 5)))
    >>> ntklayers.contract(cache, cache).shape
    (4, 4, 3, 3)
  """
  _checks.check_implementation(implementation)
  _checks.check_params(params)
  _checks.check_batch(x, "x")
  disc = _checks.call_discover(discover, f, params, x)
  leaves = jax.tree.leaves(params)
  mask = resolve_trainable(trainable, params)
  coupled = bool(disc.coupled) or independent_samples is False
  structured = implementation in ("auto", "structured")
  plan = make_plan(disc, params, mask, structured, coupled)
  n = disc.out_shape[0]
  n_out = math.prod(disc.out_shape[1:])
  fb_leaves = tuple(i for g in plan.fallback for i in g.leaves)
  if implementation in ("jacobian", "structured"):
    method = "jacobian"
  elif implementation == "ntk_vp":
    method = "ntk_vp"
  else:
    n_fb = sum(leaves[i].size for i in fb_leaves)
    itemsize = jnp.dtype(disc.out_dtype).itemsize
    method = choose(n, n_out, n_fb, itemsize, forward_flops(disc, params))

  layers = ()
  if plan.groups:
    captured = capture_cotangents(f, params, x, plan.records, disc.out_shape,
                                  disc.out_dtype, coupled)
    by_record = {id(rec): (p, c) for rec, p, c in captured}
    layers = tuple(
        tuple(_canonical(plan.records[k], *by_record[id(plan.records[k])], n, n_out,
                         coupled) for k in g.calls)
        for g in plan.groups)
  fb_jac = ()
  if fb_leaves and method == "jacobian":
    fb_jac = tuple(jacobians(f, params, x, fb_leaves, not coupled, n_out))
  meta = CaptureMeta(f, plan, disc.out_shape, method, implementation)
  return Factors(layers, fb_jac, params, x, meta)


def _canonical(record, primal, cot, n: int, n_out: int, coupled: bool):
  """Canonical ``(x [Nx, T, ...], g [N, O, T, ...])`` of one call."""
  rule = get_rule(record.kind)
  xc, gc = rule.canonicalize(record.config, primal, cot)
  m, t = xc.shape[:2]
  if not coupled:  # gc: [O, N, T, ...] -> [N, O, T, ...]
    return xc, jnp.swapaxes(gc, 0, 1)
  # Samples interact: rows of the layer are a sharing axis of every example.
  xc = xc.reshape((1, m * t) + xc.shape[2:])
  gc = gc.reshape((n, n_out, m * t) + gc.shape[3:])
  return xc, gc
