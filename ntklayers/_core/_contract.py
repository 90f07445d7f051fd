"""``contract``: assemble the kernel from two caches of factors.

Each structured group is contracted on the cheaper side of the paper's
``min(Y, P)`` (activation space vs per-example parameter Jacobians); fallback
leaves by Jacobian contraction or NTK-vector products; blocks are summed, or
returned per module with ``layerwise=True``.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import jax
import jax.numpy as jnp

from jax import lax

from ntklayers._core import _jax_compat
from ntklayers._core import _replay
from ntklayers._core import _ops as C
from ntklayers._core._axes import OutputSpec
from ntklayers._core._capture import Factors, recapture_coupled
from ntklayers._core._fallback import ntk_vp_kernel
from ntklayers._core._options import Options


def _group_kernel(spec: OutputSpec, group, calls1, calls2, same: bool) -> jax.Array:
  """One group's block: its op's kernel, summed over the stack axis ``S`` (one
  parameter slice per step of a scanned stack of layers)."""
  op = group.op
  if calls1[0][0].shape[0] == 1:
    def unstack(calls):
      return [(x[0], g[0]) for x, g in calls]
    c1 = unstack(calls1)
    return op.kernel(spec, group.roles, c1, c1 if same else unstack(calls2), same)
  blocks = jax.vmap(lambda c1, c2: op.kernel(spec, group.roles, c1, c2, same))(
      list(calls1), list(calls2))
  return blocks.sum(axis=0)


def _warn_nonfinite(ok) -> None:
  if not bool(ok):
    warnings.warn(
        "ntklayers: the kernel contains NaN or inf values (check the model's "
        "outputs and parameters, e.g. for overflow in float16/float32).",
        RuntimeWarning, stacklevel=2)


def report_nonfinite(ok: jax.Array) -> None:
  """Warns if ``ok`` is false, without making the caller wait for ``ok``.

  A concrete ``ok`` is reported by a host callback in a ``lax.cond`` branch
  that runs only when ``ok`` is false, in a small program of its own dispatched
  after the kernel. Under an outer trace (inside the user's ``jax.jit``) there
  is no report: a host callback there would take the user's whole program off
  jit's fast C++ dispatch path, about 0.7 ms on every call of a CPU train step
  even with the kernel in an untaken ``lax.cond`` branch
  (``benchmarks/bench_monitor.py``). The NaN or inf values stay in the kernel.
  """
  if not _jax_compat.is_tracer(ok):
    _report(ok)


@jax.jit
def _report(ok: jax.Array) -> None:
  lax.cond(ok, lambda: None, lambda: jax.debug.callback(_warn_nonfinite, ok))


def contract(cache1: Factors, cache2: Factors | None = None, *,
             trace_axes: int | Sequence[int] = (),
             diagonal_axes: int | Sequence[int] = (),
             layerwise: bool = False,
             precision: str = "highest") -> jax.Array | dict[str, jax.Array]:
  """Contracts two caches of factors into the NTK ``Theta(x1, x2)``.

  Glossary of shapes: ``N1``, ``N2`` batch sizes; model outputs ``[N, *rest]``.

  Args:
    cache1: factors of the first batch (:func:`ntklayers.capture`).
    cache2: factors of the second batch; ``None`` (or ``cache1``) for ``x2 = x1``.
    trace_axes: output axes contracted and averaged (neural-tangents convention).
    diagonal_axes: output axes on which only ``i1 == i2`` is kept.
    layerwise: return ``{module name: kernel}`` summing to the full kernel.
    precision: matrix-product precision, as in :func:`ntklayers.ntk_fn`.

  Returns:
    ``[N1, N2, O, O]`` for outputs ``[N, O]`` with the defaults; in general axes
    ordered ``(N1, N2, A1, A2, ...)`` with traced axes removed and diagonal axes
    once. A dict of such kernels with ``layerwise=True``.

  Example:
    >>> import haiku as hk, jax, jax.numpy as jnp, ntklayers
    >>> net = hk.without_apply_rng(hk.transform(lambda x: ntklayers.Linear(2)(x)))
    >>> params = net.init(jax.random.key(0), jnp.ones((3, 4)))
    >>> c1 = ntklayers.capture(net.apply, params, jnp.ones((3, 4)))
    >>> c2 = ntklayers.capture(net.apply, params, jnp.zeros((5, 4)))
    >>> ntklayers.contract(c1, c2, trace_axes=(-1,)).shape
    (3, 5)
  """
  options = Options.create(trace_axes=trace_axes, diagonal_axes=diagonal_axes,
                           layerwise=layerwise, precision=precision)
  result = contract_unchecked(cache1, cache2, options)
  report_nonfinite(all_finite(result))
  return result


def contract_unchecked(cache1: Factors, cache2: Factors | None,
                       options: Options) -> jax.Array | dict[str, jax.Array]:
  """:func:`contract` without the NaN/inf report (the caller reports it).

  Caches captured in ``"checked"`` mode carry a flag saying whether their rows
  and per-example Jacobians were confirmed to belong to their examples; unless
  both are confirmed, the kernel is computed from a recapture that treats each
  batch as one sample (``lax.cond``: only the branch taken runs).
  """
  for name, c in (("cache1", cache1), ("cache2", cache2)):
    if c is not None and not isinstance(c, Factors):
      raise TypeError(f"`{name}` must come from ntklayers.capture, got {type(c).__name__}.")
  same = cache2 is None or cache2 is cache1
  cache2 = cache1 if cache2 is None else cache2
  m1, m2 = cache1.meta, cache2.meta
  if m1.signature() != m2.signature():
    raise ValueError(
        "`cache1` and `cache2` were captured with different functions, options or "
        f"layer structure: outputs {cache1.out_shape} vs {cache2.out_shape}, structured "
        f"layers {[g.name for g in m1.plan.groups]} vs "
        f"{[g.name for g in m2.plan.groups]}, fallback "
        f"{[g.name for g in m1.plan.fallback]} vs {[g.name for g in m2.plan.fallback]}. "
        f"Use ntklayers.ntk_fn, which plans both batches together.")
  spec = OutputSpec.create(cache1.out_shape, cache2.out_shape, options.trace_axes,
                           options.diagonal_axes, options.precision)
  layerwise = options.layerwise
  if _replay.CHECKED not in (m1.mode, m2.mode):
    return contract_with_spec(spec, cache1, cache2, same, layerwise)

  def as_one_sample():
    r1 = recapture_coupled(cache1)
    r2 = r1 if same else recapture_coupled(cache2)
    return contract_with_spec(spec, r1, r2, same, layerwise)

  return lax.cond(jnp.logical_and(cache1.verified, cache2.verified),
                  lambda: contract_with_spec(spec, cache1, cache2, same, layerwise),
                  as_one_sample)


def contract_with_spec(spec: OutputSpec, cache1: Factors, cache2: Factors, same: bool,
              layerwise: bool):
  m1 = cache1.meta
  blocks: dict[str, jax.Array] = {}

  def add(name, k):
    blocks[name] = blocks[name] + k if name in blocks else k

  for group, calls1, calls2 in zip(m1.plan.groups, cache1.layers, cache2.layers):
    add(group.name, _group_kernel(spec, group, calls1, calls2, same))
  fallback = m1.plan.fallback
  if fallback:
    if m1.method == "jacobian":
      pos, off = {}, 0
      for g in fallback:
        pos[g.name] = (off, off + len(g.leaves))
        off += len(g.leaves)
      spans = list(pos.items()) if layerwise else [("fallback", (0, off))]
      for name, (lo, hi) in spans:
        j1 = jnp.concatenate(cache1.fallback_jacobians[lo:hi], axis=-1)
        j2 = j1 if same else jnp.concatenate(cache2.fallback_jacobians[lo:hi], axis=-1)
        add(name, C.jacobian_kernel(spec, j1, j2))
    else:
      parts: list[tuple[str, tuple[int, ...]]] = (
          [(g.name, g.leaves) for g in fallback] if layerwise else
          [("fallback", tuple(i for g in fallback for i in g.leaves))])
      for name, leaves in parts:
        add(name, ntk_vp_kernel(spec, m1.f, cache1.params, cache1.inputs,
                                cache2.params, cache2.inputs, leaves))
  if not blocks:
    raise ValueError(
        "No trainable parameters: every leaf of `params` is masked out by `trainable`.")
  blocks = {k: spec.finalize(v) for k, v in blocks.items()}
  return blocks if layerwise else sum(blocks.values())


def all_finite(result) -> jax.Array:
  return jnp.all(jnp.stack([jnp.all(jnp.isfinite(v)) for v in jax.tree.leaves(result)]))
