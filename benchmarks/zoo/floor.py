"""The floor of a kernel, and where a kernel's time goes (per-phase profile).

**Floor** (issue 19): the time of the factors alone plus the FLOPs of the cheapest
per-layer contractions at this machine's measured matmul rate:

* factors: ``jax.jit(lambda p, x: ntklayers.capture(f, p, x, implementation="structured"))``
  (structured groups' primals and cotangents, and per-example Jacobians of the
  leaves on the fallback), timed by the caller;
* contractions: per structured group the cheaper of the two estimates of its op's
  cost model (``Op.costs``: activation space ``~N^2 O^2 T^2 ...`` vs per-example
  Jacobians ``~N^2 O^2 P``, both from the factor shapes, times the stack size);
  ops without a cost model (``scale``) and fallback leaves: ``N^2 O^2 P``. The
  estimates count multiply-adds, so the time is ``2 * MACs / rate``;
* rate: GFLOP/s of a large float32 GEMM (``2 n^3`` FLOPs) on this machine.

**Profile** of ``auto``: the plan (structured groups, fallback leaves and route,
sample mode, row proof), the factors of ``auto``'s plan timed alone, each
structured group's block timed alone (``Op.kernel`` on the captured factors, its
contraction form as the op chooses it), and the rest (fallback contraction or
NTK-vector products, the ``checked`` recapture branch, finalizing) as the
difference from the whole kernel's median.

Only public API is used except ``ntklayers._core.OutputSpec`` (through the core's
door), which the ops' functions take.
"""

from __future__ import annotations

import dataclasses
import math
import statistics
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

import ntklayers
from ntklayers._core import OutputSpec


def matmul_rate(n: int = 2048, repeats: int = 5) -> float:
  """GFLOP/s of an ``[n, n] @ [n, n]`` float32 matmul (median of ``repeats`` calls)."""
  a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
  b = jax.random.normal(jax.random.key(1), (n, n), jnp.float32)
  mm = jax.jit(lambda a, b: a @ b)
  jax.block_until_ready(mm(a, b))
  ts = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(mm(a, b))
    ts.append(time.perf_counter() - t0)
  return 2.0 * n ** 3 / statistics.median(ts) / 1e9


@dataclasses.dataclass(frozen=True)
class Contraction:
  """One group's estimated contraction: ``form`` is ``activation`` or ``jacobian``."""

  name: str
  kind: str  # "structured" or "fallback"
  form: str
  macs: float
  params: int


def _spec(factors: ntklayers.Factors) -> OutputSpec:
  shape = factors.out_shape
  return OutputSpec.create(shape, shape, (), ())


def contractions(factors: ntklayers.Factors) -> list[Contraction]:
  """Per group of ``factors``' plan, the cheaper contraction and its multiply-adds
  (for ``x2 = x1``)."""
  spec = _spec(factors)
  plan = factors.meta.plan
  leaves = jax.tree.leaves(factors.params)
  n, n_out = factors.batch_size, math.prod(factors.meta.out_rest)
  pairs_all = float(n * n * n_out * n_out)
  out = []
  for group, calls in zip(plan.groups, factors.layers):
    size = sum(int(leaves[i].size) for i in group.leaves)
    jac = pairs_all * size
    form, macs = "jacobian", jac
    op = group.op
    if op.costs is not None and op.roles[0] in group.roles:
      stacks = calls[0][0].shape[0]
      shapes = [(tuple(x.shape[1:]), tuple(g.shape[1:])) for x, g in calls]
      act, jac = op.costs(spec, shapes, shapes, True)
      form, macs = ("jacobian", jac * stacks) if jac < act else ("activation", act * stacks)
    out.append(Contraction(group.name, "structured", form, float(macs), size))
  for group in plan.fallback:
    size = sum(int(leaves[i].size) for i in group.leaves)
    out.append(Contraction(group.name, "fallback", "jacobian", pairs_all * size, size))
  return out


def floor_seconds(factor_s: float, factors: ntklayers.Factors, rate_gflops: float
                  ) -> tuple[float, float, float]:
  """``(floor, factors part, contraction part)`` in seconds."""
  macs = sum(c.macs for c in contractions(factors))
  contraction_s = 2.0 * macs / (rate_gflops * 1e9)
  return factor_s + contraction_s, factor_s, contraction_s


def _median_time(fn: Callable, *args: Any, repeats: int = 5, budget_s: float = 5.0) -> float:
  jax.block_until_ready(fn(*args))
  ts: list[float] = []
  while len(ts) < repeats and (len(ts) < 2 or sum(ts) < budget_s):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    ts.append(time.perf_counter() - t0)
  return statistics.median(ts)


def _group_block(op, roles, spec: OutputSpec) -> Callable:
  """``op``'s kernel block of one group for ``x2 = x1``, summed over the stack axis
  (as ``contract`` does), jitted."""

  def block(calls):
    if calls[0][0].shape[0] == 1:
      c = [(x[0], g[0]) for x, g in calls]
      return op.kernel(spec, roles, c, c, True)
    return jax.vmap(lambda c: op.kernel(spec, roles, c, c, True))(list(calls)).sum(axis=0)

  return jax.jit(block)


def profile(f: Callable, params: Any, x: Any, total_s: float) -> dict[str, Any]:
  """Where ``auto``'s time goes on ``f(params, x)`` (see the module docstring).

  ``total_s`` is the measured median of ``auto``'s whole kernel. Returns the plan
  (``mode``, ``method``, ``rows_proven``, parameter counts), ``factors_s``, per
  group ``(name, form, seconds, estimated MACs)``, and ``rest_s``.
  """
  capture = jax.jit(lambda p, x: ntklayers.capture(f, p, x, implementation="auto"))
  factors = jax.block_until_ready(capture(params, x))
  meta = factors.meta
  leaves = jax.tree.leaves(params)
  structured = sum(int(leaves[i].size) for g in meta.plan.groups for i in g.leaves)
  fallback = sum(int(leaves[i].size) for g in meta.plan.fallback for i in g.leaves)
  factors_s = _median_time(capture, params, x)
  spec = _spec(factors)
  estimates = {c.name: c for c in contractions(factors)}
  groups = []
  for group, calls in zip(meta.plan.groups, factors.layers):
    fn = _group_block(group.op, group.roles, spec)
    est = estimates.get(group.name)
    groups.append((group.name, est.form if est else "?", _median_time(fn, calls, repeats=3),
                   est.macs if est else float("nan")))
  rest = total_s - factors_s - sum(g[2] for g in groups)
  return dict(mode=meta.mode, method=meta.method, rows_proven=meta.rows_proven,
              structured_params=structured, fallback_params=fallback,
              fallback_groups=[g.name for g in meta.plan.fallback],
              factors_s=factors_s, groups=groups, rest_s=rest, total_s=total_s)


def format_profile(p: dict[str, Any], top: int = 8) -> str:
  """A few lines: the plan, the phases, the slowest groups."""
  total = p["total_s"]
  pct = lambda s: f"{100 * s / total:.0f}%" if total > 0 else "-"
  lines = [
      f"plan: mode {p['mode']}, fallback route {p['method']}, rows proven "
      f"{p['rows_proven']}; {p['structured_params']:,} params structured, "
      f"{p['fallback_params']:,} on the fallback"
      + (f" ({', '.join(p['fallback_groups'][:6])}"
         f"{', ...' if len(p['fallback_groups']) > 6 else ''})" if p["fallback_groups"] else ""),
      f"phases of {total * 1e3:.1f} ms: factors {p['factors_s'] * 1e3:.1f} ms "
      f"({pct(p['factors_s'])}), "
      f"structured blocks {sum(g[2] for g in p['groups']) * 1e3:.1f} ms "
      f"({pct(sum(g[2] for g in p['groups']))}, {len(p['groups'])} groups), rest (fallback "
      f"contraction / NTK-vector products, checked branch, finalize) {p['rest_s'] * 1e3:.1f} ms "
      f"({pct(p['rest_s'])})"]
  slow = sorted(p["groups"], key=lambda g: -g[2])[:top]
  if slow:
    lines.append("slowest blocks: " + "; ".join(
        f"{name} {form} {s * 1e3:.2f} ms ({macs / 1e6:.1f} MMAC)" for name, form, s, macs in slow))
  return "\n".join(lines)
