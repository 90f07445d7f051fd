"""A static proof that rows of a traced program are examples.

An abstract interpretation of a jaxpr that tracks, for every value, whether it
is *batched* along one axis ``a`` (slice ``n`` along ``a`` is the same function of
slice ``n`` of every batched source and of shared values) or *shared* (no batch
axis; the set of axes along which it is known to be constant is tracked, so that
shared values broadcast along the batch axis are recognized). Every primitive
without a rule below makes the proof fail, which only costs the runtime check of
``_replay.capture_cotangents``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import jax

from ntklayers._core._jax_compat import Literal as _Literal

class _NotPerExample(Exception):
  pass


_ELEMENTWISE = frozenset("""
abs acos acosh add add_any and asin asinh atan atan2 atanh cbrt ceil clamp clz
complex conj convert_element_type copy copy_p cos cosh digamma div eq erf erf_inv
erfc exp exp2 expm1 floor ge gt imag integer_pow is_finite le lgamma log log1p
logistic lt max min mul ne neg nextafter not or population_count pow real
reduce_precision rem round rsqrt select_n shift_left shift_right_arithmetic
shift_right_logical sign sin sinh sqrt square stop_gradient sub tan tanh xor
""".split())
_REDUCTIONS = frozenset(
    "reduce_sum reduce_max reduce_min reduce_prod reduce_and reduce_or reduce_xor "
    "argmax argmin".split())
_CUMULATIVE = frozenset("cumsum cumprod cummax cummin cumlogsumexp".split())
_SINGLE = frozenset("broadcast_in_dim reshape transpose squeeze pad slice dynamic_slice "
                    "rev split gather conv_general_dilated".split())
_CALLS = frozenset("jit pjit closed_call core_call custom_jvp_call custom_vjp_call "
                   "custom_vjp_call_jaxpr checkpoint remat remat2".split())


def _sub_jaxpr(eqn):
  for key in ("jaxpr", "call_jaxpr", "fun_jaxpr"):
    sub = eqn.params.get(key)
    if sub is None:
      continue
    jaxpr = sub.jaxpr if hasattr(sub, "jaxpr") else sub
    if len(jaxpr.invars) == len(eqn.invars) and len(jaxpr.outvars) == len(eqn.outvars):
      return jaxpr
  raise _NotPerExample(eqn.primitive.name)


def _batch_rule(eqn, anns, shapes, out_shapes):
  """Output annotations: ``int`` batch axis, or ``frozenset`` of constant axes."""
  name = eqn.primitive.name
  p = eqn.params
  batched = [(k, a) for k, a in enumerate(anns) if isinstance(a, int)]
  if not batched:  # shared values only
    if name in _ELEMENTWISE:
      consts = [a for a, s in zip(anns, shapes) if len(s) == len(out_shapes[0])]
      return [frozenset.intersection(*consts) if consts else frozenset()]
    if name == "broadcast_in_dim":
      dims = p["broadcast_dimensions"]
      consts = {d for d in range(len(out_shapes[0])) if d not in dims}
      consts |= {dims[i] for i in anns[0]}
      consts |= {dims[i] for i, s in enumerate(shapes[0]) if s == 1}
      return [frozenset(consts)]
    return [frozenset()] * len(out_shapes)
  axes = {a for _, a in batched}
  if name in _ELEMENTWISE:
    (a,) = axes if len(axes) == 1 else (None,)
    if a is None:
      raise _NotPerExample(name)
    for ann, s in zip(anns, shapes):
      # Shared operands must be constant along the batch axis (or broadcast to it).
      if not isinstance(ann, int) and s and a not in ann and s[a] != 1:
        raise _NotPerExample(name)
    return [a]
  if name in _CALLS:
    return analyze(_sub_jaxpr(eqn), anns)
  if len(batched) == 1 and name in _SINGLE | _REDUCTIONS | _CUMULATIVE:
    (k, a), = batched
    shape = shapes[k]
    if name == "broadcast_in_dim":
      b = p["broadcast_dimensions"][a]
      if out_shapes[0][b] == shape[a]:
        return [b]
    elif name == "reshape" and p.get("dimensions") is None:
      new = out_shapes[0]
      before = math.prod(shape[:a])
      for b in range(len(new)):
        if math.prod(new[:b]) == before and new[b] == shape[a]:
          return [b]
    elif name == "transpose":
      return [list(p["permutation"]).index(a)]
    elif name == "squeeze" and a not in p["dimensions"]:
      return [a - sum(d < a for d in p["dimensions"])]
    elif name in _REDUCTIONS and k == 0 and a not in p["axes"]:
      return [a - sum(d < a for d in p["axes"])] * len(out_shapes)
    elif name in _CUMULATIVE and p["axis"] != a:
      return [a]
    elif name == "rev" and a not in p["dimensions"]:
      return [a]
    elif name == "split" and p["axis"] != a:
      return [a] * len(out_shapes)
    elif name == "pad" and k == 0 and tuple(p["padding_config"][a]) == (0, 0, 0):
      return [a]
    elif name == "slice" and k == 0 and p["start_indices"][a] == 0 and (
        p["limit_indices"][a] == shape[a]) and (not p["strides"] or p["strides"][a] == 1):
      return [a]
    elif name == "dynamic_slice" and k == 0 and p["slice_sizes"][a] == shape[a]:
      return [a]
    elif name == "gather" and k == 1 and a < len(shape) - 1:
      dn = p["dimension_numbers"]
      if not getattr(dn, "operand_batching_dims", ()):
        rows = [d for d in range(len(out_shapes[0])) if d not in dn.offset_dims]
        return [rows[a]]
    elif name == "conv_general_dilated" and k == 0 and p["batch_group_count"] == 1:
      dn = p["dimension_numbers"]
      if a == dn.lhs_spec[0]:
        return [dn.out_spec[0]]
    raise _NotPerExample(name)
  if name == "dot_general":
    (lc, rc), (lb, rb) = p["dimension_numbers"]
    la, ra = anns
    lfree = [d for d in range(len(shapes[0])) if d not in lc and d not in lb]
    rfree = [d for d in range(len(shapes[1])) if d not in rc and d not in rb]
    if isinstance(la, int) and isinstance(ra, int):
      if la in lb and rb[list(lb).index(la)] == ra:
        return [list(lb).index(la)]
    elif isinstance(la, int):
      if la in lb and rb[list(lb).index(la)] in ra:
        return [list(lb).index(la)]
      if la in lfree:
        return [len(lb) + lfree.index(la)]
    else:
      if ra in rb and lb[list(rb).index(ra)] in la:
        return [list(rb).index(ra)]
      if ra in rfree:
        return [len(lb) + len(lfree) + rfree.index(ra)]
    raise _NotPerExample(name)
  if name in ("concatenate", "sort"):
    dim = p["dimension"]
    (a,) = axes if len(axes) == 1 else (None,)
    if a is None or dim == a or any(not isinstance(x, int) and a not in x for x in anns):
      raise _NotPerExample(name)
    return [a] * len(out_shapes)
  raise _NotPerExample(name)


def analyze(jaxpr, in_anns):
  env: dict[Any, Any] = {}
  for v, a in zip(jaxpr.invars, in_anns):
    env[v] = a

  def read(v):
    if isinstance(v, _Literal):
      return frozenset(range(len(getattr(v.aval, "shape", ()))))
    return env.get(v, frozenset())  # constvars: shared

  for eqn in jaxpr.eqns:
    anns = [read(v) for v in eqn.invars]
    shapes = [tuple(getattr(v.aval, "shape", ())) for v in eqn.invars]
    out_shapes = [tuple(getattr(v.aval, "shape", ())) for v in eqn.outvars]
    outs = _batch_rule(eqn, anns, shapes, out_shapes)
    for v, a in zip(eqn.outvars, outs):
      env[v] = a if isinstance(a, frozenset) else int(a)  # NumPy ints from params
  return [read(v) for v in jaxpr.outvars]


def rows_are_examples(fun: Callable, batched_args: Any, shared_args: Any) -> bool:
  """Proves that row ``n`` of every output of ``fun(batched_args, shared_args)`` is
  the same function of row ``n`` of every leaf of ``batched_args`` (all batched
  along axis 0) and of ``shared_args``. ``False`` means "not proven".
  """
  closed = jax.make_jaxpr(fun)(batched_args, shared_args)
  n_batched = len(jax.tree.leaves(batched_args))
  anns: list = [0] * n_batched + [frozenset()] * (len(closed.jaxpr.invars) - n_batched)
  try:
    outs = analyze(closed.jaxpr, anns)
  except _NotPerExample:
    return False
  return all(a == 0 for a in outs)
