"""Discovery: trace the model once and read its annotated layer calls off the jaxpr.

The model ``f(params, x)`` is traced (``jax.make_jaxpr``) inside a capture
session, so every annotated layer call appears as a structure tag (``_session``),
also inside ``scan``, ``remat`` and ``jit`` bodies. :func:`discover` walks the
jaxpr and makes one :class:`CallRecord` per tag: the parameter leaves it reads
(followed through the data flow of the program, never guessed from shapes: a
tag operand is a parameter only if it *is* a leaf of ``params``, or a per-step
slice of one taken by an enclosing ``scan``), the enclosing loops, and why it
cannot be captured, if so. Equations of unmodified layers (dense, convolution,
bias, scale, embedding: ``_recognize``) that read leaves no tag reads become
records too, carrying the :class:`~ntklayers._core._recognize.Recognized`
descriptor the replay needs.

:func:`outside` answers the coverage question: which parameter leaves the output
depends on other than through the direct parameter use of the captured calls
(plain code reading a layer's weights, a tied decoder, a call that is not
captured). Those leaves go to the exact fallback.
"""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import Callable
from typing import Any

import jax

from ntklayers._core import _checks
from ntklayers._core import _jax_compat
from ntklayers._core import _views
from ntklayers._core._recognize import OFFSET_ROLE, Recognized, fuse_offset, recognize
from ntklayers._core._rule import get_rule
from ntklayers._core._session import TAG, Session
from ntklayers._core._views import ParamView

# Skip reason of annotated layers without parameters (nothing to fall back).
NO_PARAMS = "it owns no parameters"

Path = tuple[int, ...]


@dataclasses.dataclass(frozen=True)
class CallRecord:
  """Static description of one annotated layer call (one tag of the jaxpr).

  Attributes:
    name: module path of the layer (layerwise kernels and warnings).
    kind: registered rule kind.
    config: the rule's static config record.
    leaves: ``((role, leaf_index), ...)`` of the ``params`` leaves it reads.
    primal: ``(shape, dtype)`` of the primal in one step of the enclosing loops.
    out: ``(shape, dtype)`` of the layer output in one step.
    skip: why the call cannot be captured (``None`` if it can).
    path: address of the tag in the jaxpr (equation indices, outermost first).
    loops: lengths of the enclosing ``scan`` loops, outermost first.
    stack: positions (in ``loops``) of the loops that slice the parameters: the
      call reads slice ``[i_a, i_b, ...]`` of each leaf at steps ``i``; the other
      loops reuse the same parameters at every step (weight sharing).
    recognized: for an equation of an unmodified layer, how its canonical primal
      and output relate to the equation (``None`` for a tag).
    signature: for a recognized call, how it reads its leaf (calls that read one
      leaf differently cannot share cross terms).
  """

  name: str
  kind: str
  config: Any
  leaves: tuple[tuple[str, int], ...]
  primal: tuple[tuple[int, ...], Any]
  out: tuple[tuple[int, ...], Any]
  skip: str | None = None
  path: Path = ()
  loops: tuple[int, ...] = ()
  stack: tuple[int, ...] = ()
  recognized: Recognized | None = None
  signature: Any = None

  @property
  def steps(self) -> int:
    """Number of times the call runs (product of the enclosing loop lengths)."""
    n = 1
    for length in self.loops:
      n *= length
    return n


@dataclasses.dataclass(frozen=True)
class Traced:
  """The model traced with structure tags, on one batch.

  Attributes:
    jaxpr: the closed jaxpr of ``f`` over ``(params leaves, x leaves)``.
    n_params: number of ``params`` leaves (the first inputs of ``jaxpr``).
    out_shape: output shape of ``f``.
    out_dtype: output dtype of ``f``.
    records: every annotated call, in program order.
    coupled: modules that declared that samples interact (BatchNorm in training).
  """

  jaxpr: Any
  n_params: int
  out_shape: tuple[int, ...]
  out_dtype: Any
  records: tuple[CallRecord, ...]
  coupled: tuple[str, ...]


def leaf_names(params: Any) -> list[str]:
  """Module-level names of the leaves: the leaf path without its last key (and
  without the ``.value`` of a variable node such as NNX's ``Param``)."""
  names = []
  for path, _ in jax.tree_util.tree_flatten_with_path(params)[0]:
    keys = list(path)
    if len(keys) > 1 and getattr(keys[-1], "name", None) == "value":
      keys = keys[:-1]
    parts = [str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))) for k in keys]
    names.append("/".join(parts[:-1]))
  return names


def discover(f: Callable, params: Any, x: Any, interceptors: tuple,
             recognize_layers: bool = True) -> Traced:
  """Traces ``f(params, x)`` with every interceptor active and finds its tags and,
  with ``recognize_layers``, the equations of unmodified layers."""
  n = _checks.batch_size(x)
  session = Session(interceptors)

  def run(params, x):
    with session.activate():
      return f(params, x)

  try:
    closed, out = jax.make_jaxpr(run, return_shape=True)(params, x)
  except Exception as e:  # pylint: disable=broad-except
    _checks.note_failure(e, params, x)
    raise
  _checks.check_output(out, n, x)
  n_params = len(jax.tree.leaves(params))
  envs: dict = {}
  if recognize_layers:
    n_x = len(closed.jaxpr.invars) - n_params
    _views.annotate(closed.jaxpr, [frozenset()] * n_params + [0] * n_x, envs)
  prov = {v: _views.leaf_view(i, (), v) for i, v in enumerate(closed.jaxpr.invars[:n_params])}
  walk = _Walk(n, envs, leaf_names(params) if recognize_layers else [])
  walk.run(closed.jaxpr, prov, (), (), None)
  return Traced(closed, n_params, tuple(out.shape), out.dtype, walk.records(),
                tuple(session.coupled))


class _Walk:
  """One walk over the program: records of tags and of recognized equations."""

  def __init__(self, n: int, envs: dict, names: list[str]):
    self.n, self.envs, self.names = n, envs, names
    self.found: list[CallRecord] = []
    self.tag_leaves: set[int] = set()

  def records(self) -> tuple[CallRecord, ...]:
    """Tags, and recognized calls on leaves that no tag reads (drop-ins win)."""
    return tuple(r for r in self.found if r.recognized is None
                 or not any(i in self.tag_leaves for _, i in r.leaves))

  def run(self, jaxpr, prov: dict, path: Path, loops: tuple[int, ...],
          blocked: str | None) -> None:
    """``prov`` maps the variables that are parameter views to their views."""
    env = self.envs.get(path, {})
    uses = collections.Counter(v for e in jaxpr.eqns for v in e.invars
                               if not isinstance(v, _jax_compat.Literal))
    uses.update(v for v in jaxpr.outvars if not isinstance(v, _jax_compat.Literal))
    products: dict = {}  # output variable -> index in self.found of a recognized product
    for k, eqn in enumerate(jaxpr.eqns):
      here = path + (k,)
      name = eqn.primitive.name
      if eqn.primitive is TAG:
        self.found.append(_record(eqn, prov, here, loops, blocked, self.n))
        meta = eqn.params["meta"]
        for v in eqn.invars[2:2 + len(meta.roles)]:
          pv = _lookup(prov, v)
          if pv is not None:
            self.tag_leaves.add(pv.leaf)
      elif blocked is None and name == _jax_compat.SCAN:
        sp = _jax_compat.scan_params(eqn)
        nc, ncar = sp["num_consts"], sp["num_carry"]
        inner_jaxpr, _ = _jax_compat.body(eqn)
        inner = {}
        for i, (v, bv) in enumerate(zip(eqn.invars, inner_jaxpr.invars)):
          pv = _lookup(prov, v)
          if pv is None or nc <= i < nc + ncar or pv.factor is not None:
            continue  # a loop carry is not a parameter, even if it starts as one
          if i < nc:
            inner[bv] = pv
          elif pv.is_leaf:  # a stacked leaf: one slice per step
            inner[bv] = _views.leaf_view(pv.leaf, pv.stack + (len(loops),), bv)
        self.run(inner_jaxpr, inner, here, loops + (sp["length"],), None)
      elif blocked is None and (name in _jax_compat.REMAT or name in _jax_compat.CALLS):
        inner_jaxpr, _ = _jax_compat.body(eqn)
        looked = {bv: _lookup(prov, v) for v, bv in zip(eqn.invars, inner_jaxpr.invars)}
        inner = {bv: pv for bv, pv in looked.items() if pv is not None and pv.factor is None}
        self.run(inner_jaxpr, inner, here, loops, None)
      elif _jax_compat.has_body(eqn):
        reason = blocked or f"it runs inside a `{name}` of the model, which is not structured"
        for j, sub in enumerate(_jax_compat.nested(eqn)):
          self.run(sub, {}, here + (-1 - j,), loops, reason)
      elif blocked is None:
        views = [_lookup(prov, v) for v in eqn.invars]
        if name in _views.LAYOUT and len(views) == 1 and views[0] is not None:
          out = _views.propagate(eqn, views[0])
          if out is not None:
            prov[eqn.outvars[0]] = out
        elif self.names and any(v is not None for v in views):
          anns = [frozenset(range(len(getattr(v.aval, "shape", ()))))
                  if isinstance(v, _jax_compat.Literal) else env.get(v) for v in eqn.invars]
          found = recognize(eqn, views, anns, self.n)
          if found is not None:
            data = eqn.invars[found.recognized.data]
            if not (name == "add" and uses[data] == 1 and data in products
                    and self._fuse(products[data], found, here)):
              self.found.append(self._recognized(found, here, loops))
              if found.kind in OFFSET_ROLE:
                products[eqn.outvars[0]] = len(self.found) - 1
          else:
            consts = set(jaxpr.constvars)  # (shared by every example)
            view = _views.scaled(eqn, views, [frozenset() if a is None and v in consts else a
                                              for a, v in zip(anns, eqn.invars)])
            if view is not None:
              prov[eqn.outvars[0]] = view

  def _fuse(self, k: int, bias: Any, path: Path) -> bool:
    """Makes ``bias`` the offset of recognized call ``k`` when it is one."""
    call = self.found[k]
    product = call.recognized
    if product is None or call.skip is not None or not fuse_offset(
        call.kind, call.config, product, call.stack, bias, call.out[0]):
      return False
    recognized = dataclasses.replace(product, source=call.path,
                                     offset_param=bias.recognized.param)
    self.found[k] = dataclasses.replace(
        call, leaves=call.leaves + ((OFFSET_ROLE[call.kind], bias.view.leaf),), path=path,
        recognized=recognized, signature=(call.signature, bias.signature))
    return True

  def _recognized(self, found: Any, path: Path, loops: tuple[int, ...]) -> CallRecord:
    rule = get_rule(found.kind)
    skip = None if rule is None else rule.unsupported(found.config, found.primal[0])
    return CallRecord(self.names[found.view.leaf] or "params", found.kind, found.config,
                      ((found.role, found.view.leaf),), found.primal, found.out, skip,
                      path, loops, found.view.stack, found.recognized, found.signature)


def _lookup(prov: dict, v: Any) -> ParamView | None:
  return None if isinstance(v, _jax_compat.Literal) else prov.get(v)


def _record(eqn, prov, path, loops, blocked, n) -> CallRecord:
  meta = eqn.params["meta"]
  out_v, primal_v = eqn.invars[0], eqn.invars[1]
  param_vs = eqn.invars[2:2 + len(meta.roles)]
  primal = (tuple(primal_v.aval.shape), primal_v.aval.dtype)
  out = (tuple(out_v.aval.shape), out_v.aval.dtype)
  skip, leaves, stack = _skip_reason(meta, primal[0], out[0], param_vs, prov, blocked, n)
  return CallRecord(meta.name, meta.kind, meta.config, leaves, primal, out, skip, path,
                    loops, stack)


def _skip_reason(meta, primal_shape, out_shape, param_vs, prov, blocked, n):
  if blocked:
    return blocked, (), ()
  if meta.unsupported:
    return meta.unsupported, (), ()
  rule = get_rule(meta.kind)
  if rule is None:
    return f"no structure rule is registered for kind {meta.kind!r}", (), ()
  reason = rule.unsupported(meta.config, primal_shape)
  if reason:
    return reason, (), ()
  if not primal_shape or not out_shape or primal_shape[0] != n or out_shape[0] != n:
    return (f"its input {primal_shape} / output {out_shape} do not lead with the batch "
            f"axis of size {n}"), (), ()
  leaves, stacks = [], set()
  for role, v in zip(meta.roles, param_vs):
    if role not in rule.roles:
      continue
    pv = _lookup(prov, v)
    if pv is None or not pv.is_leaf:
      return (f"its parameter {role!r} is not a leaf of `params` (transformed before "
              f"use, e.g. by a custom getter or mixed precision, or carried by a loop)"), (), ()
    leaves.append((role, pv.leaf))
    stacks.add(pv.stack)
  if not leaves:
    return NO_PARAMS, (), ()
  if len(stacks) != 1:
    return "its parameters are sliced by different loops", (), ()
  return None, tuple(leaves), stacks.pop()


def execution_order(jaxpr: Any, path: tuple[int, ...], steps: list[int]) -> tuple[int, ...]:
  """Execution order of one step of a tagged call: the equation index at each level
  of ``path``, each ``scan``'s followed by the step (counted backwards in a
  reversed scan)."""
  key: list[int] = []
  loops = iter(steps)
  for k in path[:-1]:  # the enclosing scan, remat and jit equations
    eqn = jaxpr.eqns[k]
    key.append(k)
    if eqn.primitive.name == _jax_compat.SCAN:
      step = next(loops)
      key.append(eqn.params["length"] - 1 - step if eqn.params["reverse"] else step)
    jaxpr = _jax_compat.body(eqn)[0]
  return (*key, path[-1])
