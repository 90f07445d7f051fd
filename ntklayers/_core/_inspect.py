"""``inspect``: how each parameter will be handled, before paying for the kernel.

Discovery, the plan and the shapes of every factor are computed abstractly
(``jax.eval_shape``: the model is traced, nothing is evaluated), then each
parameter group gets a row: its paths and size, its route, why it is not
structured (for the fallback), and the estimated FLOPs and memory of its share of
``kernel_fn(params, x1, x2)``.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import jax
import numpy as np

from ntklayers._core import _cost
from ntklayers._core import _routes
from ntklayers._core._axes import OutputSpec
from ntklayers._core._capture import capture_with, prepare
from ntklayers._core._options import Options
from ntklayers._core._plan import collecting_notes, leaf_paths

_MODES = {"independent": "independent examples", "checked": "checked at run time",
          "coupled": "one sample (examples interact)"}
PLAIN = ("no annotated layer or recognized pattern (dense, conv, bias, scale, "
         "embedding) reads it directly")


@dataclasses.dataclass(frozen=True)
class GroupRoute:
  """One parameter group of an :class:`Inspection`.

  Attributes:
    name: the group's name (its module path; ``layerwise`` keys).
    paths: the ``params`` paths of its leaves.
    size: number of parameters.
    route: ``"structured (tag)"`` (a drop-in layer), ``"structured (recognized)"``
      (an equation of an unmodified layer), ``"fallback (jacobian)"`` or
      ``"fallback (ntk_vp)"``.
    contraction: for structured groups, ``"activation"`` or ``"jacobian"`` (the
      cheaper form of the group's block); ``""`` for the fallback.
    reason: why the group is on the fallback (``""`` when structured).
    flops: estimated FLOPs of the group's kernel block (factors included).
    memory: estimated bytes of the group's factors for both batches.
  """

  name: str
  paths: tuple[str, ...]
  size: int
  route: str
  contraction: str
  reason: str
  flops: float
  memory: int


@dataclasses.dataclass(frozen=True)
class Inspection:
  """What :func:`inspect` returns; ``print`` it for a table.

  Attributes:
    groups: one :class:`GroupRoute` per parameter group, structured groups first.
    mode: how rows are trusted to be examples: ``"independent"`` (declared or
      proven statically), ``"checked"`` (verified at run time) or ``"coupled"``
      (the batch is one sample).
    fallback_method: the fallback route, ``"jacobian"`` or ``"ntk_vp"``.
    shapes: ``(N1, N2, *output shape past the batch)``.
    forward_flops: estimated forward FLOPs per example (from the traced program).
    route: the route taken: ``"structured"`` / ``"structured+ntk_vp"`` (groups and
      the fallback by Jacobians / NTK-vector products) or ``"jacobian"`` /
      ``"ntk_vp"`` (the whole model).
    costs: under ``implementation="auto"``, the cost model's predicted FLOPs of
      every route, ``{route: RouteCost}`` (``auto`` took ``route`` from them).
  """

  groups: tuple[GroupRoute, ...]
  mode: str
  fallback_method: str
  shapes: tuple[int, ...]
  forward_flops: float
  route: str = "structured"
  costs: dict = dataclasses.field(default_factory=dict)

  @property
  def fallback_fraction(self) -> float:
    """The share of the parameters on the fallback routes."""
    total = sum(g.size for g in self.groups)
    slow = sum(g.size for g in self.groups if g.route.startswith("fallback"))
    return slow / total if total else 0.0

  def __str__(self) -> str:
    return render(self)


def inspect_model(f: Callable, params: Any, x1: Any, x2: Any, options: Options) -> Inspection:
  """The :class:`Inspection` of ``kernel(f, params, x1, x2, options)`` (abstract)."""
  xs = (x1,) if x2 is None else (x1, x2)
  found: dict[str, Any] = {}

  def trace(params, *xs):
    with collecting_notes() as notes:
      setup = prepare(f, params, xs, options)
    found["setup"], found["notes"] = setup, list(notes)
    return tuple(capture_with(setup, params, x).layers for x in xs)

  layers = jax.eval_shape(trace, params, *xs)
  setup, notes = found["setup"], found["notes"]
  layers1 = layers[0]
  n1 = setup.traced[0].out_shape[0]
  n2 = setup.traced[-1].out_shape[0]
  spec = OutputSpec.create((n1, *setup.out_rest), (n2, *setup.out_rest),
                           options.trace_axes, options.diagonal_axes)
  leaves = jax.tree.leaves(params)
  paths = leaf_paths(params)
  itemsize = np.dtype(setup.out_dtype).itemsize
  n_out = math.prod(setup.out_rest)
  flops = _cost.forward_flops_per_example(setup.traced[0].jaxpr, n1)
  same = x2 is None
  pairs = n1 * n_out * (n_out if options.diagonal_batch else n2 * n_out)
  rows = []
  layers2 = layers[-1]
  for group, calls, calls2 in zip(setup.plan.groups, layers1, layers2):
    records = [setup.plan.records[c] for c in group.calls]
    size = sum(leaves[i].size for i in group.leaves)
    memory = sum(_nbytes(x) + _nbytes(g) for x, g in calls) * (1 if same else 2)
    form, cost = _routes.group_flops(group.op, group.roles, spec, _shapes(calls),
                                     _shapes(calls2), same, size, n_out, pairs)
    if form == "jacobian":
      memory += n1 * n_out * size * itemsize * (1 if same else 2)
    tagged = all(r.recognized is None for r in records)
    rows.append(GroupRoute(group.name, tuple(paths[i] for i in group.leaves), size,
                           "structured (tag)" if tagged else "structured (recognized)",
                           form, "", cost, memory))
  reasons = _reasons(notes)
  plain = (PLAIN if setup.recognize else
           "structure='annotated': only drop-in layers are structured")
  if setup.costs and setup.route in ("jacobian", "ntk_vp"):
    costs = dict(setup.costs)
    saved = min(costs["structured"].total, costs["structured+ntk_vp"].total)
    plain = (f"implementation='auto' runs the whole model by {setup.route}, predicted "
             f"{saved / costs[setup.route].total:.1f}x cheaper than the structured route")
    reasons = {}
  n_fb = len(setup.plan.fallback)
  for g in setup.plan.fallback:
    size = sum(leaves[i].size for i in g.leaves)
    if setup.method == "jacobian":
      cost = 3.0 * n1 * n_out * flops / max(n_fb, 1) + pairs * size
      memory = n1 * n_out * size * itemsize * (1 if same else 2)
    else:
      cost = 5.0 * n1 * n2 * n_out * flops
      memory = 2 * (n1 + n2) * n_out * itemsize
    rows.append(GroupRoute(g.name, tuple(paths[i] for i in g.leaves), size,
                           f"fallback ({setup.method})", "", reasons.get(g.name, plain),
                           cost, memory))
  return Inspection(tuple(rows), setup.mode, setup.method, (n1, n2, *setup.out_rest), flops,
                    setup.route, dict(setup.costs))


def _nbytes(a: Any) -> int:
  return math.prod(a.shape) * np.dtype(a.dtype).itemsize


def _shapes(calls) -> list:
  return [(tuple(x.shape), tuple(g.shape)) for x, g in calls]


def _reasons(notes: list) -> dict[str, str]:
  """Fallback reasons by layer name (the first note of each layer)."""
  out: dict[str, str] = {}
  for name, role, reason in notes:
    if name is None:
      continue
    text = reason if role is None else f"{role}: {reason}"
    out.setdefault(name, text)
  return out


def _mib(b: int) -> str:
  return f"{b / 2**20:.2f} MiB" if b >= 2**14 else f"{b} B"


def _short(paths: tuple[str, ...]) -> str:
  text = ", ".join(paths)
  return text if len(text) <= 48 else text[:45] + "..."


def render(insp: Inspection) -> str:
  """A fixed-width table of an :class:`Inspection` (``str(inspection)``)."""
  head = ("parameters", "size", "route", "form", "FLOPs", "memory", "why not structured")
  body = [(_short(g.paths), f"{g.size:,}", g.route, g.contraction or "-", _routes.si(g.flops, 1),
           _mib(g.memory), g.reason or "-") for g in insp.groups]
  widths = [max(len(r[k]) for r in [head, *body]) for k in range(len(head) - 1)]

  def line(r):
    return "  ".join(c.ljust(w) for c, w in zip(r, widths)) + "  " + r[-1]

  total = sum(g.size for g in insp.groups)
  n1, n2, *rest = insp.shapes
  lines = [f"NTK [N1={n1}, N2={n2}, out={tuple(rest)}]; samples: {_MODES[insp.mode]}; "
           f"forward ~{_routes.si(insp.forward_flops, 1)} FLOPs per example",
           line(head), line(tuple("-" * len(h) for h in head)), *map(line, body),
           f"total: {total:,} parameters, {100 * (1 - insp.fallback_fraction):.0f}% structured, "
           f"~{_routes.si(sum(g.flops for g in insp.groups), 1)} FLOPs, "
           f"~{_mib(sum(g.memory for g in insp.groups))} of factors"]
  if insp.costs:
    lines += ["routes (predicted; * = taken):", _routes.describe(insp.costs, insp.route)]
  return "\n".join(lines)


def slow_route_message(setup: Any, params: Any) -> str | None:
  """The one-time warning when most parameters are on the fallback, else ``None``."""
  leaves = jax.tree.leaves(params)
  fb = sum(leaves[i].size for g in setup.plan.fallback for i in g.leaves)
  total = fb + sum(leaves[i].size for g in setup.plan.groups for i in g.leaves)
  if not total or fb * 2 <= total:
    return None
  names = [g.name or "params" for g in setup.plan.fallback]
  shown = ", ".join(repr(n) for n in names[:4]) + (", ..." if len(names) > 4 else "")
  return (f"{100 * fb / total:.0f}% of the trainable parameters ({shown}) are on the exact "
          f"generic fallback ({setup.method} route), which is much slower than structured "
          f"layers. `ntklayers.inspect(f, params, x)` (or the adapters' `inspect`) lists "
          f"each group's route and why; use drop-in layers (ntklayers.haiku, "
          f"ntklayers.flax) where a layer is neither annotated nor recognized.")

