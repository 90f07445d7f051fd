"""A static proof that rows of a traced program, and of its Jacobian, are examples.

An abstract interpretation of a jaxpr that tracks, for every value, whether it
is *batched* along one axis ``a`` (slice ``n`` along ``a`` is the same function of
slice ``n`` of every batched source and of shared values) or *shared* (it does
not depend on a batched source; the set of axes along which it is known to be
constant is tracked, so that shared values broadcast along the batch axis are
recognized). Every primitive without a rule below makes the proof fail ("not
proven"); no rule accepts a primitive that may mix rows. ``scan``, ``while``,
``cond``, ``jit`` and ``remat`` bodies are followed (loop carries to a fixed
point), and a ``scan`` over the batch axis without a carry (``lax.map``) is a
map over examples.

:func:`why_not` analyzes the JVP program of ``fun``, so custom derivative rules
are proven as traced (``custom_vjp`` backward rules, opaque, are not proven).
Given the batch at a second size (a *twin*: a tile), it also proves that the
program does not depend on the batch size: the two traced programs must be the
same but for the sizes of batch axes and of axes along which shared values are
constant (``x / x.shape[0]`` is refused), so a tile's Jacobian holds exactly the
tile's rows of the whole batch's.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import jax
import numpy as np

from ntklayers._core import _jax_compat
from ntklayers._core._rowtwin import CUMULATIVE as _CUMULATIVE
from ntklayers._core._rowtwin import ELEMENTWISE as _ELEMENTWISE
from ntklayers._core._rowtwin import REDUCTIONS as _REDUCTIONS
from ntklayers._core._rowtwin import NotPerExample, Twin, join

_WINDOWED = frozenset("reduce_window_sum reduce_window_max reduce_window_min "
                      "select_and_gather_add".split())
_SINGLE = frozenset("broadcast_in_dim reshape transpose squeeze pad slice dynamic_slice "
                    "rev split gather conv_general_dilated top_k".split())
_CALLS = frozenset("jit pjit closed_call core_call custom_jvp_call custom_vjp_call "
                   "custom_vjp_call_jaxpr checkpoint remat remat2".split())
_MAX_FIXPOINT = 64


def _jaxpr(sub):
  return sub.jaxpr if hasattr(sub, "jaxpr") else sub


def _sub_jaxpr(eqn):
  for key in ("jaxpr", "call_jaxpr", "fun_jaxpr"):
    sub = eqn.params.get(key)
    if sub is None:
      continue
    jaxpr = _jaxpr(sub)
    if len(jaxpr.invars) == len(eqn.invars) and len(jaxpr.outvars) == len(eqn.outvars):
      return jaxpr
  raise NotPerExample(eqn.primitive.name)


def _axis_map(shape, new, a):
  """The axis of ``new`` that axis ``a`` of ``shape`` becomes under a reshape (the
  same elements along it), or ``None``."""
  before = math.prod(shape[:a])
  for b in range(len(new)):
    if math.prod(new[:b]) == before and new[b] == shape[a]:
      return b
  return None


def _shared_rule(name, p, anns, shapes, out_shapes):
  """Constant axes of the outputs of an equation on shared values only."""
  out = out_shapes[0] if out_shapes else ()
  if name in _ELEMENTWISE:
    consts = [a for a, s in zip(anns, shapes) if len(s) == len(out)]
    return [frozenset.intersection(*consts) if consts else frozenset()]
  a = anns[0] if anns else frozenset()
  if name == "broadcast_in_dim":
    dims = p["broadcast_dimensions"]
    return [frozenset({d for d in range(len(out)) if d not in dims} | {dims[i] for i in a})]
  if name == "transpose":
    return [frozenset(list(p["permutation"]).index(i) for i in a)]
  if name == "squeeze":
    dims = p["dimensions"]
    return [frozenset(i - sum(d < i for d in dims) for i in a if i not in dims)]
  if name == "reshape" and p.get("dimensions") is None:
    return [frozenset(_axis_map(shapes[0], out, i) for i in a) - {None}]
  if name in _REDUCTIONS:  # the kept axes of identical slices
    return [frozenset(i - sum(d < i for d in p["axes"]) for i in a if i not in p["axes"])
            ] * len(out_shapes)
  if name in ("slice", "rev", "dynamic_slice") or name in _CUMULATIVE:
    keep = {p["axis"]} if name in _CUMULATIVE else set()
    return [frozenset(a - keep)]
  if name == "pad":
    return [frozenset(i for i in a if tuple(p["padding_config"][i]) == (0, 0, 0))]
  if name == "concatenate":
    return [frozenset.intersection(*anns) - {p["dimension"]}]
  if name == "iota":
    return [frozenset(range(len(out))) - {p["dimension"]}]
  if name == "dot_general":
    (lc, rc), (lb, rb) = p["dimension_numbers"]
    la, ra = anns
    lfree = [d for d in range(len(shapes[0])) if d not in lc and d not in lb]
    rfree = [d for d in range(len(shapes[1])) if d not in rc and d not in rb]
    axes = [i in la and j in ra for i, j in zip(lb, rb)]
    axes += [d in la for d in lfree] + [d in ra for d in rfree]
    return [frozenset(k for k, c in enumerate(axes) if c)]
  return [frozenset()] * len(out_shapes)


def _single_rule(name, p, k, a, shape, out_shapes):
  """The batch axis of the output of a one-operand-batched equation, or ``None``."""
  if name == "broadcast_in_dim":
    b = p["broadcast_dimensions"][a]
    return b if out_shapes[0][b] == shape[a] else None
  if name == "reshape" and p.get("dimensions") is None:
    return _axis_map(shape, out_shapes[0], a)
  if name == "transpose":
    return list(p["permutation"]).index(a)
  if name == "squeeze" and a not in p["dimensions"]:
    return a - sum(d < a for d in p["dimensions"])
  if name in _REDUCTIONS and k == 0 and a not in p["axes"]:
    return a - sum(d < a for d in p["axes"])
  if name in _CUMULATIVE and p["axis"] != a:
    return a
  if name == "rev" and a not in p["dimensions"]:
    return a
  if name == "split" and p["axis"] != a:
    return a
  if name == "top_k" and a != len(shape) - 1:
    return a
  if name == "pad" and k == 0 and tuple(p["padding_config"][a]) == (0, 0, 0):
    return a
  if name == "slice" and k == 0 and p["start_indices"][a] == 0 and (
      p["limit_indices"][a] == shape[a]) and (not p["strides"] or p["strides"][a] == 1):
    return a
  if name == "dynamic_slice" and k == 0 and p["slice_sizes"][a] == shape[a]:
    return a
  if name == "gather" and k == 1 and a < len(shape) - 1:
    dn = p["dimension_numbers"]
    if not getattr(dn, "operand_batching_dims", ()):
      return [d for d in range(len(out_shapes[0])) if d not in dn.offset_dims][a]
  if name == "conv_general_dilated" and k == 0 and p["batch_group_count"] == 1:
    dn = p["dimension_numbers"]
    if a == dn.lhs_spec[0]:
      return dn.out_spec[0]
  return None


def _dot_rule(p, anns, shapes):
  (lc, rc), (lb, rb) = p["dimension_numbers"]
  la, ra = anns
  lfree = [d for d in range(len(shapes[0])) if d not in lc and d not in lb]
  rfree = [d for d in range(len(shapes[1])) if d not in rc and d not in rb]
  if isinstance(la, int) and isinstance(ra, int):
    if la in lb and rb[list(lb).index(la)] == ra:
      return list(lb).index(la)
  elif isinstance(la, int):
    if la in lb and rb[list(lb).index(la)] in ra:
      return list(lb).index(la)
    if la in lfree:
      return len(lb) + lfree.index(la)
  else:
    if ra in rb and lb[list(rb).index(ra)] in la:
      return list(rb).index(ra)
    if ra in rfree:
      return len(lb) + len(lfree) + rfree.index(ra)
  return None


def _windowed(p, a):
  return (p["window_dimensions"][a] == 1 and p["window_strides"][a] == 1
          and tuple(p["padding"][a]) == (0, 0) and p["base_dilation"][a] == 1
          and p["window_dilation"][a] == 1)


def _scan_rule(eqn, anns, twin, pair):
  p = eqn.params
  nc, ncar = p["num_consts"], p["num_carry"]
  body, tbody = _jaxpr(p["jaxpr"]), twin and _jaxpr(twin.params["jaxpr"])
  consts, carry, xs = anns[:nc], list(anns[nc:nc + ncar]), anns[nc + ncar:]
  if any(a == 0 for a in xs if isinstance(a, int)):  # a map over examples (lax.map)
    if ncar or any(isinstance(a, int) for a in consts) or any(
        a != 0 if isinstance(a, int) else 0 not in a for a in xs):
      raise NotPerExample("scan")  # a carry, or inputs that differ by position
    analyze(body, consts + [frozenset()] * len(xs), tbody, pair)
    return [0] * len(eqn.outvars)
  slices = [a - 1 if isinstance(a, int) else frozenset(c - 1 for c in a if c) for a in xs]
  for _ in range(_MAX_FIXPOINT):
    outs = analyze(body, consts + carry + slices, tbody, pair)
    new = [join(c, o, "scan") for c, o in zip(carry, outs[:ncar])]
    if new == carry:
      return carry + [a + 1 if isinstance(a, int) else frozenset(c + 1 for c in a)
                      for a in outs[ncar:]]
    carry = new
  raise NotPerExample("scan")


def _while_rule(eqn, anns, twin, pair):
  p = eqn.params
  cn, bn = p["cond_nconsts"], p["body_nconsts"]
  cj, bj = _jaxpr(p["cond_jaxpr"]), _jaxpr(p["body_jaxpr"])
  tc = twin and _jaxpr(twin.params["cond_jaxpr"])
  tb = twin and _jaxpr(twin.params["body_jaxpr"])
  cconsts, bconsts, carry = anns[:cn], anns[cn:cn + bn], list(anns[cn + bn:])
  for _ in range(_MAX_FIXPOINT):
    (pred,) = analyze(cj, cconsts + carry, tc, pair)
    if isinstance(pred, int):  # (a scalar is never batched; defensive)
      raise NotPerExample("while")
    outs = analyze(bj, bconsts + carry, tb, pair)
    new = [join(c, o, "while") for c, o in zip(carry, outs)]
    if new == carry:
      return carry
    carry = new
  raise NotPerExample("while")


def _cond_rule(eqn, anns, twin, pair):
  if isinstance(anns[0], int):  # the branch index (a scalar: defensive)
    raise NotPerExample("cond")
  branches = eqn.params["branches"]
  tbranches = twin.params["branches"] if twin else [None] * len(branches)
  outs = None
  for b, t in zip(branches, tbranches):
    o = analyze(_jaxpr(b), anns[1:], t and _jaxpr(t), pair)
    outs = o if outs is None else [join(x, y, "cond") for x, y in zip(outs, o)]
  return outs


def batch_rule(eqn, anns, shapes, out_shapes, twin=None, pair=None):
  """Output annotations: ``int`` batch axis, or ``frozenset`` of constant axes."""
  name = eqn.primitive.name
  p = eqn.params
  if name in _CALLS:
    return analyze(_sub_jaxpr(eqn), anns, twin and _sub_jaxpr(twin), pair)
  if name == "scan":
    return _scan_rule(eqn, anns, twin, pair)
  if name == "while":
    return _while_rule(eqn, anns, twin, pair)
  if name == "cond":
    return _cond_rule(eqn, anns, twin, pair)
  if name == "optimization_barrier":
    return list(anns)
  batched = [(k, a) for k, a in enumerate(anns) if isinstance(a, int)]
  if not batched:  # shared values only
    return _shared_rule(name, p, anns, shapes, out_shapes)
  axes = {a for _, a in batched}
  (a,) = axes if len(axes) == 1 else (None,)
  if name in _ELEMENTWISE and a is not None:
    for ann, s in zip(anns, shapes):
      # Shared operands must be constant along the batch axis (or broadcast to it).
      if not isinstance(ann, int) and s and a not in ann and s[a] != 1:
        raise NotPerExample(name)
    return [a]
  if name in _WINDOWED and a is not None and len(batched) == len(anns) and _windowed(p, a):
    return [a]
  if len(batched) == 1 and name in _SINGLE | _REDUCTIONS | _CUMULATIVE:
    (k, a), = batched
    b = _single_rule(name, p, k, a, shapes[k], out_shapes)
    if b is not None:
      return [b] * len(out_shapes)
  elif name == "dot_general":
    b = _dot_rule(p, anns, shapes)
    if b is not None:
      return [b]
  elif name in ("concatenate", "sort") and a is not None and p["dimension"] != a and all(
      isinstance(x, int) or a in x for x in anns):
    return [a] * len(out_shapes)
  elif name == "stack" and a is not None and all(isinstance(x, int) or a in x for x in anns):
    return [a if a < p["axis"] else a + 1]
  elif name == "gather" and len(batched) == 2:  # batched operand and indices (take_along)
    b = _batched_gather(p["dimension_numbers"], anns, shapes, out_shapes)
    if b is not None:
      return [b]
  raise NotPerExample(name)


def _batched_gather(dn, anns, shapes, out_shapes):
  """A gather whose operand and indices are batched along paired batching dims:
  each row gathers from its own operand row."""
  a, b = anns
  obd = [int(d) for d in getattr(dn, "operand_batching_dims", ())]
  ibd = [int(d) for d in getattr(dn, "start_indices_batching_dims", ())]
  if a in obd and ibd[obd.index(a)] == b and b < len(shapes[1]) - 1:
    return [d for d in range(len(out_shapes[0])) if d not in dn.offset_dims][b]
  return None


def analyze(jaxpr, in_anns, twin=None, pair: Twin | None = None):
  """Annotations of the outputs of ``jaxpr`` given those of its inputs (raises
  ``NotPerExample`` where the proof fails). With ``pair``, ``twin`` (the same
  program on another batch size) is compared equation by equation."""
  env: dict[Any, Any] = {}
  if pair is not None:
    pair.program(jaxpr, twin, in_anns)

  def read(v):
    if isinstance(v, _jax_compat.Literal):
      return frozenset(range(len(getattr(v.aval, "shape", ()))))
    return env.get(v, frozenset())  # constvars: shared

  def write(v, a):
    if isinstance(a, frozenset):  # a size-1 axis is constant
      a = a | {d for d, s in enumerate(getattr(v.aval, "shape", ())) if s == 1}
    env[v] = a if isinstance(a, frozenset) else int(a)  # NumPy ints from params

  for v, a in zip(jaxpr.invars, in_anns):
    write(v, a)
  for k, eqn in enumerate(jaxpr.eqns):
    t = twin.eqns[k] if pair is not None else None
    anns = [read(v) for v in eqn.invars]
    shapes = [tuple(getattr(v.aval, "shape", ())) for v in eqn.invars]
    out_shapes = [tuple(getattr(v.aval, "shape", ())) for v in eqn.outvars]
    if pair is not None:
      pair.before(eqn, t, anns)
    outs = batch_rule(eqn, anns, shapes, out_shapes, t, pair)
    for v, a in zip(eqn.outvars, outs):
      write(v, a)
    if pair is not None:
      pair.after(eqn, t, [read(v) for v in eqn.outvars])
  outs = [read(v) for v in jaxpr.outvars]
  if pair is not None:
    pair.values(jaxpr.outvars, twin.outvars, outs)
  return outs


def _spec(a: Any, n: int | None = None) -> jax.ShapeDtypeStruct:
  shape = tuple(np.shape(a))
  return jax.ShapeDtypeStruct(shape if n is None else (n, *shape[1:]), a.dtype)


def why_not(fun: Callable, batched_args: Any, shared_args: Any, *, twin_size: int | None = None,
            wrt: tuple[bool, bool] = (True, True)) -> str | None:
  """Why row ``n`` of ``fun(batched_args, shared_args)`` and of its Jacobian may not
  be the same function of row ``n`` of every leaf of ``batched_args`` (all batched
  along axis 0) and of ``shared_args``; ``None`` when proven.

  Args:
    fun: ``fun(batched_args, shared_args) -> outputs [N, ...]`` (a pytree).
    batched_args: arrays (or ``jax.ShapeDtypeStruct``) ``[N, ...]``.
    shared_args: arrays without a batch axis (parameters).
    twin_size: also prove that the program on ``twin_size`` examples is the same
      but for the batch size (a tile's Jacobian rows are the whole batch's).
    wrt: differentiate the floating leaves of ``batched_args`` / ``shared_args``.

  Example:
    >>> import jax.numpy as jnp
    >>> why_not(lambda x, w: x @ w, jnp.ones((4, 3)), jnp.ones((3, 2))) is None
    True
    >>> why_not(lambda x, w: x @ w - (x @ w).mean(0), jnp.ones((4, 3)), jnp.ones((3, 2)))
    '`reduce_sum` may mix examples'
  """
  bl, bt = jax.tree.flatten(batched_args)
  sl, st = jax.tree.flatten(shared_args)
  db = [i for i, a in enumerate(bl) if wrt[0] and _jax_compat.is_inexact(a.dtype)]
  ds = [i for i, a in enumerate(sl) if wrt[1] and _jax_compat.is_inexact(a.dtype)]

  def program(b, s, tb, ts):
    def f(vb, vs):
      b2, s2 = list(b), list(s)
      for i, v in zip(db, vb):
        b2[i] = v
      for i, v in zip(ds, vs):
        s2[i] = v
      return fun(jax.tree.unflatten(bt, b2), jax.tree.unflatten(st, s2))
    return jax.jvp(f, ([b[i] for i in db], [s[i] for i in ds]), (tb, ts))

  def trace(n=None):
    b = [_spec(a, n) for a in bl]
    return jax.make_jaxpr(program)(b, [_spec(a) for a in sl], [b[i] for i in db],
                                   [_spec(sl[i]) for i in ds])

  anns: list = ([0] * len(bl) + [frozenset()] * len(sl) + [0] * len(db)
                + [frozenset()] * len(ds))
  try:
    closed = trace()
    twin = pair = None
    if twin_size is not None:
      twin = trace(twin_size)
      pair = Twin(np.shape(bl[0])[0], twin_size)
      pair.consts(closed.consts, twin.consts)
    outs = analyze(closed.jaxpr, anns, twin and twin.jaxpr, pair)
  except NotPerExample as e:
    return str(e) if " " in str(e) else f"`{e}` may mix examples"
  except Exception as e:  # pylint: disable=broad-except  # e.g. no JVP rule
    return f"its JVP could not be traced ({type(e).__name__}: {e})"
  if not all(a == 0 for a in outs):
    return "an output is not batched along axis 0"
  return None


def rows_are_examples(fun: Callable, batched_args: Any, shared_args: Any) -> bool:
  """Proves that row ``n`` of every output of ``fun(batched_args, shared_args)``, and
  of its derivative, is the same function of row ``n`` of every leaf of
  ``batched_args`` (all batched along axis 0) and of ``shared_args``. ``False``
  means "not proven" (see :func:`why_not`).
  """
  return why_not(fun, batched_args, shared_args) is None
