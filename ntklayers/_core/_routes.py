"""The cost model behind ``implementation="auto"``: predicted FLOPs of every route.

``auto`` chooses between ntklayers' exact routes before anything is computed,
from the traced program and the shapes of the factors (paper, Table 2). ``F`` is
the forward FLOPs per example counted from the program (``_cost``); a backward
pass to a set of parameters costs the FLOPs from where they first meet the data
(``B``: ``B_all`` for every parameter, ``B_s`` for the structured groups'
leaves, ``B_fb`` for the fallback's), twice for parameter Jacobians; ``O`` is the
number of outputs per example, ``P`` of parameters, ``pairs`` of output pairs of
the kernel (``N1 N2 O^2`` for a full kernel); ``sum_b`` runs over the batches:

* ``structured`` / ``structured+ntk_vp``: the capture, one forward and ``O``
  backward passes to the layers' outputs (``sum_b N_b (F + O B_s)``), each
  structured group's cheaper contraction (``Op.costs``: activation space or
  Jacobians from factors), and the parameters no group owns by Jacobian
  contraction (``sum_b N_b (F + 2 O B_fb) + 2 pairs P_fb``) or by NTK-vector
  products (``N2 O ((2 N2 + 3 N1) B_fb + 2 P_fb)``: a VJP and a JVP per column,
  and a parameter-sized cotangent between them);
* ``jacobian``: the whole model's Jacobians (``sum_b N_b (F + 2 O B_all)``) and
  their contraction (``2 pairs P``);
* ``ntk_vp``: NTK-vector products of the whole model
  (``N2 O ((2 N2 + 3 N1) B_all + 2 P)``).

A Jacobian route is ruled out when its ``[N, O, P]`` factors exceed a memory
budget. :func:`choose_route` returns the structured route unless a whole-model
route is predicted :data:`MARGIN` times cheaper and :data:`MIN_SAVING` FLOPs
cheaper (FLOPs are not seconds: the margin keeps ``auto`` on the structured route
where the estimates are close, and on small models, where nothing measurable is
saved).
``benchmarks/bench_routes.py`` prints these predictions next to measured times.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

ROUTES = ("structured", "structured+ntk_vp", "jacobian", "ntk_vp")
MARGIN = 1.5  # a whole-model route must be predicted this many times cheaper ...
MIN_SAVING = 1e8  # ... and save this many FLOPs (a few ms on a CPU) to be taken
JACOBIAN_BUDGET_BYTES = 1 << 30


@dataclasses.dataclass(frozen=True)
class Shapes:
  """What the cost model reads off a prepared kernel.

  Attributes:
    n1, n2: the batch sizes; ``same``: one batch for both sides (``x2=None``).
    n_out: outputs per example ``O``; ``pairs``: output pairs of the kernel.
    itemsize: bytes per number of the output dtype.
    forward_flops: ``F``, forward FLOPs per example.
    params: trainable parameters in all; ``fallback_params``: those no
      structured group owns.
    groups: per structured group, its contraction's estimated FLOPs.
    backward: per example, the FLOPs from where the data first meets
      ``(all parameters, the structured groups' leaves, the fallback's leaves)``.
  """

  n1: int
  n2: int
  same: bool
  n_out: int
  pairs: int
  itemsize: int
  forward_flops: float
  params: int
  fallback_params: int
  groups: tuple[float, ...]
  backward: tuple[float, float, float] = (0.0, 0.0, 0.0)


@dataclasses.dataclass(frozen=True)
class RouteCost:
  """Predicted FLOPs of one route: ``factors`` (passes through the model) plus
  ``contractions`` (products of factors); ``None`` parts do not apply."""

  route: str
  factors: float
  contractions: float
  fits: bool = True

  @property
  def total(self) -> float:
    return self.factors + self.contractions


def _passes(s: Shapes, per_example: float) -> float:
  """``per_example`` FLOPs for every example of every batch."""
  batches = (s.n1,) if s.same else (s.n1, s.n2)
  return sum(batches) * per_example


def _jacobian_fits(s: Shapes, params: int) -> bool:
  n = s.n1 if s.same else s.n1 + s.n2
  return n * s.n_out * params * s.itemsize <= JACOBIAN_BUDGET_BYTES


def predict(s: Shapes) -> dict[str, RouteCost]:
  """Predicted FLOPs of every route of :data:`ROUTES` (see the module docstring)."""
  o, f = s.n_out, s.forward_flops
  b_all, b_groups, b_fb = s.backward
  # NTK-vector products: per column of the second batch, a VJP through it and a
  # JVP through the first, and a parameter-sized cotangent between them.
  vp = lambda b, p: s.n2 * o * ((2.0 * s.n2 + 3.0 * s.n1) * b + 2.0 * p)
  capture = _passes(s, f + o * b_groups) if s.groups else 0.0
  blocks = float(sum(s.groups))
  fb = s.fallback_params
  return {
      "structured": RouteCost("structured",
                              capture + (_passes(s, f + 2.0 * o * b_fb) if fb else 0.0),
                              blocks + 2.0 * s.pairs * fb, _jacobian_fits(s, fb)),
      "structured+ntk_vp": RouteCost("structured+ntk_vp",
                                     capture + (vp(b_fb, fb) if fb else 0.0), blocks),
      "jacobian": RouteCost("jacobian", _passes(s, f + 2.0 * o * b_all),
                            2.0 * s.pairs * s.params, _jacobian_fits(s, s.params)),
      "ntk_vp": RouteCost("ntk_vp", vp(b_all, s.params), 0.0),
  }


def cheapest(costs: dict[str, RouteCost], routes: tuple[str, ...]) -> str:
  """The route of ``routes`` with the fewest predicted FLOPs among those that fit
  (the last of ``routes`` if none fits)."""
  fitting = [r for r in routes if costs[r].fits]
  if not fitting:
    return routes[-1]
  return min(fitting, key=lambda r: costs[r].total)


def choose_route(costs: dict[str, RouteCost]) -> str:
  """``auto``'s route: the cheaper structured variant, unless a whole-model route
  is predicted :data:`MARGIN` times cheaper than it and saves at least
  :data:`MIN_SAVING` FLOPs (on small models the structured route is kept: the
  difference is below what can be measured)."""
  structured = cheapest(costs, ("structured", "structured+ntk_vp"))
  whole = cheapest(costs, ("jacobian", "ntk_vp"))
  s, w = costs[structured].total, costs[whole].total
  if costs[whole].fits and w * MARGIN < s and s - w >= MIN_SAVING:
    return whole
  return structured


def group_flops(op: Any, roles: tuple, spec: Any, calls1: list, calls2: list, same: bool,
                size: int, n_out: int, pairs: int) -> tuple[str, float]:
  """The cheaper contraction form of one structured group and its FLOPs.

  ``calls1``/``calls2`` are the canonical ``(x_shape, g_shape)`` of each call
  (``x: [S, Nx, T, ...]``, ``g: [S, N, O, T, ...]``). Ops with a cost model
  (``Op.costs``) compare activation space with Jacobians from factors when the
  group holds their weight (as ``Op.kernel`` does); the others contract
  per-example Jacobians (``2 pairs P`` plus forming them).
  """
  n1 = calls1[0][1][1]
  n2 = calls2[0][1][1]
  formed = n1 * n_out * size * len(calls1) + (0 if same else n2 * n_out * size * len(calls2))
  jac = 2.0 * (formed + pairs * size)
  if op.costs is None or op.roles[0] not in roles:
    return "jacobian", jac
  stacks = calls1[0][0][0]
  act, jac = op.costs(spec, [(x[1:], g[1:]) for x, g in calls1],
                      [(x[1:], g[1:]) for x, g in calls2], same)
  act, jac = 2.0 * act * stacks, 2.0 * jac * stacks
  return ("jacobian", jac) if jac < act else ("activation", act)


def si(v: float, digits: int = 2) -> str:
  """``v`` with an SI prefix (``k``, ``M``, ``G``, ``T``): FLOP counts in tables."""
  for unit, scale in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
    if abs(v) >= scale:
      return f"{v / scale:.{digits}f}{unit}"
  return f"{v:.0f}"


def describe(costs: dict[str, RouteCost], chosen: str) -> str:
  """One line per route: predicted FLOPs (passes + contractions), the chosen one
  marked ``*``."""
  lines = []
  for r in ROUTES:
    c = costs[r]
    mark = "*" if r == chosen else " "
    fits = "" if c.fits else " (over the Jacobian memory budget)"
    lines.append(f"{mark} {r:<18} {si(c.total):>8} FLOPs  (passes {si(c.factors)} + "
                 f"contractions {si(c.contractions)}){fits}")
  return "\n".join(lines)


def total_size(leaves: list, indices: Any) -> int:
  return int(sum(math.prod(leaves[i].shape) for i in indices))
