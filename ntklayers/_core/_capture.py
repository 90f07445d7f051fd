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

from ntklayers._core import _checks
from ntklayers._core import _canonical
from ntklayers._core import _cost
from ntklayers._core import _jax_compat
from ntklayers._core import _replay
from ntklayers._core import _routes
from ntklayers._core import _session
from ntklayers._core._discovery import Traced, discover
from ntklayers._core._outside import outside
from ntklayers._core._options import Options
from ntklayers._core._fallback import check_jacobians, jacobians
from ntklayers._core._plan import (Plan, captured_calls, make_plan, notes_mark, notes_reset,
                                   resolve_trainable, warn_once)
from ntklayers._core._replay import capture_cotangents

@dataclasses.dataclass(frozen=True)
class Setup:
  """Everything decided before capturing; also the static part of :class:`Factors`.

  Attributes:
    f: the model.
    plan: structured groups and fallback leaves.
    out_rest: the output shape of ``f`` past the batch axis.
    out_dtype: the output dtype of ``f``.
    mode: ``"independent"``, ``"checked"`` or ``"coupled"`` (``_replay``).
    method: the fallback route, ``"jacobian"`` or ``"ntk_vp"``.
    check_layers: in ``"checked"`` mode, whether layer rows are checked at run
      time (``False`` when the static row proof holds).
    rows_proven: whether the static proof holds that the rows of the captured
      layers, and of the output, are the examples (``_rowproof``); ``None`` when
      it was not needed (no layer rows to check).
    traced: the programs discovery traced (one per batch shape), reused by every
      capture in the same computation (not compared, not hashed).
    interceptors: the adapters' interceptors active while tracing.
    recognize: whether equations of unmodified layers were recognized.
    per_example: whether the fallback's Jacobians may be taken one example at a
      time (``f`` runs on one example with the same output shape); otherwise they
      are Jacobians of the whole batch (a model that reshapes by its batch size).
    route: the route taken (``_routes.ROUTES``): ``"structured"`` or
      ``"structured+ntk_vp"`` (groups plus the fallback by Jacobians or NTK-vector
      products), or ``"jacobian"`` / ``"ntk_vp"`` for the whole model.
    costs: under ``implementation="auto"``, the predicted cost of every route,
      ``((route, _routes.RouteCost), ...)`` (what the choice was made from).
  """

  f: Callable
  plan: Plan
  out_rest: tuple[int, ...]
  out_dtype: Any
  mode: str = _replay.INDEPENDENT
  method: str = "jacobian"
  check_layers: bool = True
  rows_proven: bool | None = None
  traced: tuple[Traced, ...] = dataclasses.field(default=(), compare=False, repr=False)
  interceptors: tuple = dataclasses.field(default=(), compare=False, repr=False)
  recognize: bool = True
  per_example: bool = True
  route: str = "structured"
  costs: tuple = dataclasses.field(default=(), compare=False, repr=False)

  def signature(self) -> tuple:
    """What two caches must share to be contracted together."""
    return (self.f, self.plan.groups, self.plan.fallback, self.out_rest, self.plan.coupled,
            self.method, self.per_example)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Factors:
  """Cached NTK factors of one batch; build with :func:`ntklayers.capture`.

  Attributes:
    layers: per structured group, per call, canonical ``(primal, cotangent)``
      with a leading stack axis ``S`` (the parameter slices of a scanned stack of
      layers; ``S = 1`` otherwise): affine ``x: [S, Nx, T, G, I]``,
      ``g: [S, N, O, T, G, J]``; scale ``x: [S, Nx, T, C]``, ``g: [S, N, O, T, C]``.
    fallback_jacobians: per fallback leaf, ``[N, O, P]`` (empty when the fallback
      uses NTK-vector products).
    params: the parameters the factors were captured at.
    inputs: the batch.
    verified: scalar bool; in ``"checked"`` mode whether every layer row and
      every per-example Jacobian was confirmed to belong to its example (if not,
      :func:`ntklayers.contract` recomputes treating the batch as one sample).
    meta: static structure (the :class:`Setup` it was captured with).
    batch_size: ``N``, the number of examples (static).
  """

  layers: tuple
  fallback_jacobians: tuple
  params: Any
  inputs: Any
  verified: Any
  meta: Setup = dataclasses.field(metadata=dict(static=True))
  batch_size: int = dataclasses.field(metadata=dict(static=True))

  @property
  def out_shape(self) -> tuple[int, ...]:
    """``[N, *rest]``, the output shape of ``f`` on this batch."""
    return (self.batch_size, *self.meta.out_rest)

  @property
  def layer_names(self) -> tuple[str, ...]:
    return tuple(g.name for g in self.meta.plan.groups)


def capture(f: Callable[[Any, Any], jax.Array], params: Any, x: Any, *,
            implementation: str = "auto", trainable: Any = None,
            independent_samples: bool | None = None, structure: str = "auto") -> Factors:
  """Captures the NTK factors of ``f`` at ``params`` on the batch ``x``.

  Args:
    f: ``f(params, x) -> [N, ...]``, e.g. ``hk.without_apply_rng(hk.transform(fn)).apply``.
    params: parameters of ``f``.
    x: a batch (array or pytree of arrays, all with leading axis ``N``).
    implementation: ``"auto"``, ``"structured"``, ``"ntk_vp"`` or ``"jacobian"``.
    trainable: optax-style mask (pytree of bools or callable); masked-out leaves
      are excluded from the kernel.
    independent_samples: ``None`` proves statically, or else checks at run time
      (one more random cotangent in the capture's VJP), that examples do not
      interact and layer rows are examples; ``False`` declares that they
      interact (the batch is one sample); ``True`` promises that they do not.
    structure: ``"auto"`` (drop-ins and recognized equations of unmodified
      layers) or ``"annotated"`` (drop-ins only), as for :func:`ntk_fn`.

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
  options = Options.create(implementation=implementation, trainable=trainable,
                           independent_samples=independent_samples, structure=structure)
  f = _checks.check_f(f)
  return capture_with(prepare(f, params, (x,), options), params, x)


def prepare(f: Callable, params: Any, xs: tuple, options: Options) -> Setup:
  """Discovers the layers of ``f`` on every batch in ``xs`` and makes one plan.

  Calls that cannot be captured on one batch are not captured on any, so both
  sides of a kernel share the plan. The dependency analysis is repeated (without
  tracing again) until the captured calls are exactly those it assumed. The
  options' ``implementation``, ``trainable``, ``independent_samples`` and (for
  the fallback route under ``"auto"``) ``diagonal_axes`` enter the plan.
  """
  _checks.check_params(params)
  for k, x in enumerate(xs):
    _checks.check_batch(x, "x" if len(xs) == 1 else f"x{k + 1}")
  hooks = _session.interceptors()
  recognize = options.structure != "annotated"
  traced = tuple(discover(f, params, x, hooks, recognize) for x in xs)
  mask = resolve_trainable(options.mask, params)
  structured = options.implementation in ("auto", "structured")
  independent = options.independent_samples
  coupled = any(t.coupled for t in traced) or independent is False
  records = _merge_records(traced)
  if records is None:
    structured, records = False, traced[0].records
  mark = notes_mark()
  plan = _converge(records, traced, params, mask, structured, coupled)
  out_shape, out_dtype = traced[0].out_shape, traced[0].out_dtype
  flops = _cost.forward_flops_per_example(traced[0].jaxpr, out_shape[0])
  route, costs = _route(options, plan, traced, params, mask, xs, flops)
  if route in ("jacobian", "ntk_vp") and plan.groups:  # a whole-model route is cheaper
    notes_reset(mark)  # (what the structured plan would have left out no longer matters)
    plan = _converge(records, traced, params, mask, False, coupled)
  method = "ntk_vp" if route in ("ntk_vp", "structured+ntk_vp") else "jacobian"
  mode = (_replay.INDEPENDENT if independent is True else
          _replay.COUPLED if coupled else _replay.CHECKED)
  proven = None
  if mode == _replay.CHECKED and plan.groups:
    proven = all(_replay.rows_proven(t, params, x, _active(plan, t))
                 for t, x in zip(traced, xs))
  # A static proof that rows stay apart makes the runtime check of the layers
  # unnecessary; per-example fallback Jacobians are still checked (their
  # one-example programs are other programs than the batch's).
  check_layers = bool(plan.groups) and not proven
  per_example = (method != "jacobian" or not plan.fallback or coupled
                 or _runs_per_example(f, params, xs[0], out_shape))
  check_jacobians = method == "jacobian" and bool(plan.fallback) and per_example
  if mode == _replay.CHECKED and not (check_layers or check_jacobians):
    mode = _replay.INDEPENDENT  # proven, or whole-batch NTK-vector products only
  return Setup(f, plan, out_shape[1:], out_dtype, mode, method, check_layers, proven,
               traced, hooks, recognize, per_example, route, costs)


def _converge(records, traced, params, mask, structured: bool, coupled: bool) -> Plan:
  """The plan whose captured calls are exactly those its dependency analysis
  assumed (repeated, without tracing again, until it holds)."""
  captured = frozenset(r.path for r in records if r.skip is None) if structured else (
      frozenset())
  for _ in range(len(records) + 1):
    out_leaves = frozenset().union(*(outside(t, captured) for t in traced))
    plan = make_plan(records, params, mask, structured, coupled, out_leaves)
    now = frozenset(plan.records[k].path for k in captured_calls(plan))
    if now == captured:
      return plan
    captured = now
  raise RuntimeError(  # pragma: no cover - the captured set only shrinks
      "ntklayers: discovery did not converge; please report this model.")


def _route(options: Options, plan: Plan, traced: tuple, params: Any, mask: list,
           xs: tuple, flops: float) -> tuple[str, tuple]:
  """The route (``_routes.ROUTES``) and, under ``"auto"``, the predicted costs of
  every route as ``((route, RouteCost), ...)``."""
  impl = options.implementation
  if impl != "auto":
    return impl, ()  # "structured" (Jacobian fallback), "jacobian" or "ntk_vp"
  costs = _routes.predict(_canonical.route_shapes(options, plan, traced, params, mask, xs, flops))
  return _routes.choose_route(costs), tuple(costs.items())


def _runs_per_example(f: Callable, params: Any, x: Any, out_shape: tuple[int, ...]) -> bool:
  """Whether ``f`` runs on the first example alone, with the same trailing output
  shape (abstractly, nothing computed)."""
  try:
    out = jax.eval_shape(lambda p, x: f(p, jax.tree.map(lambda a: a[:1], x)), params, x)
  except Exception:  # pylint: disable=broad-except  (any failure: not per example)
    return False
  return tuple(getattr(out, "shape", ())) == (1, *out_shape[1:])


def prove_rows(setup: Setup, params: Any, xs: tuple) -> bool:
  """Whether the static proof holds that the output rows, and the rows of every
  captured layer, are the examples of ``xs`` (the batches ``setup`` was prepared
  on): ``setup.rows_proven`` when the plan needed it, else proven now."""
  if setup.rows_proven is not None:
    return setup.rows_proven
  return all(_replay.rows_proven(t, params, x, _active(setup.plan, t))
             for t, x in zip(setup.traced, xs))


def _active(plan: Plan, traced: Traced) -> list:
  """The captured calls of ``plan``, as recorded on ``traced``'s batch."""
  return [traced.records[k] for k in sorted(captured_calls(plan))]


def _merge_records(discs):
  """One record per call, skipped if it is skipped on any batch; ``None`` if the
  batches made different calls (Python control flow that depends on the batch)."""
  first = discs[0].records
  for d in discs[1:]:
    if [(r.name, r.kind, r.path) for r in d.records] != [
        (r.name, r.kind, r.path) for r in first]:
      warn_once("*", "the model calls different annotated layers on `x1` and `x2`")
      return None
  merged = []
  for k, r in enumerate(first):
    others = [d.records[k] for d in discs[1:]]
    skip = next((o.skip for o in others if o.skip is not None), None)
    if skip is None and any((o.leaves, o.stack) != (r.leaves, r.stack) for o in others):
      skip = "it reads different parameters on `x1` and `x2`"
    if r.skip is None and skip is not None:
      r = dataclasses.replace(r, skip=skip, leaves=())
    merged.append(r)
  return tuple(merged)


def capture_with(setup: Setup, params: Any, x: Any) -> Factors:
  """Captures the factors of one batch under a prepared plan (traceable)."""
  plan, mode = setup.plan, setup.mode
  n = _checks.batch_size(x)
  n_out = math.prod(setup.out_rest)
  coupled = mode == _replay.COUPLED
  verified = jnp.asarray(True)
  layers: tuple = ()
  if plan.groups:
    traced = _traced_for(setup, params, x)
    captured, verified = capture_cotangents(traced, params, x, _active(plan, traced),
                                            mode, setup.check_layers)

    def canonical(k: int):
      record = traced.records[k]
      primal, cot = captured[record.path]
      return _canonical.canonical(record, primal, cot, n, n_out, coupled)

    layers = tuple(tuple(canonical(k) for k in g.calls) for g in plan.groups)
  fb_leaves = tuple(i for g in plan.fallback for i in g.leaves)
  fb_jac: tuple = ()
  if fb_leaves and setup.method == "jacobian":
    per_example = setup.per_example and not coupled
    fb_jac = tuple(jacobians(setup.f, params, x, fb_leaves, per_example, n_out))
    if mode == _replay.CHECKED and per_example:
      verified = verified & check_jacobians(setup.f, params, x, fb_leaves, fb_jac,
                                            (n, *setup.out_rest), setup.out_dtype)
  return Factors(layers, fb_jac, params, x, verified, setup, n)


def _traced_for(setup: Setup, params: Any, x: Any) -> Traced:
  """The traced program of ``x``'s batch: the one discovery traced on the same
  shapes while its constants are still valid (a program traced inside a
  computation that has ended is traced again)."""
  avals = [(a.shape, a.dtype) for a in jax.tree.leaves(x)]
  for t in setup.traced:
    invars = t.jaxpr.jaxpr.invars[t.n_params:]
    if ([(tuple(v.aval.shape), v.aval.dtype) for v in invars] == avals
        and _jax_compat.consts_alive(t.jaxpr.consts)):
      return t
  return discover(setup.f, params, x, setup.interceptors or _session.interceptors(),
                  setup.recognize)


def recapture_coupled(cache: Factors) -> Factors:
  """The factors of ``cache``'s batch recaptured with the batch as one sample
  (reusing the program discovery traced, when it is still valid)."""
  setup = dataclasses.replace(cache.meta, mode=_replay.COUPLED, check_layers=False)
  return capture_with(setup, cache.params, cache.inputs)
