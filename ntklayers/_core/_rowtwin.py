"""Twin programs: the same model traced on batches of two sizes must not differ
but in the sizes of batch axes (``_rowproof`` uses it to prove tiles exact).

The comparison runs equation by equation alongside the row analysis, which
gives every value its annotation: ``int`` batch axis, or ``frozenset`` of axes
along which a shared value is constant. Two traced values may differ in shape
only at their batch axis, or at an axis along which a shared value is constant,
and there by exactly the two batch sizes; literals, closed-over constants and
equation parameters must be equal, except size parameters (``shape``,
``new_sizes``, ...) that hold the two batch sizes. A shared value whose shape
differs (a broadcast along a constant axis) may only flow into equations that
keep its elements apart (elementwise, broadcast, reshape, ...), never into a
reduction that would count them: ``jnp.ones(x.shape[0]).sum()`` is refused.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ntklayers._core import _jax_compat


ELEMENTWISE = frozenset("""
abs acos acosh add add_any and asin asinh atan atan2 atanh bessel_i0e bessel_i1e
cbrt ceil clamp clz complex conj convert_element_type copy copy_p cos cosh digamma
div eq erf erf_inv erfc exp exp2 expm1 floor ge gt igamma igammac imag
integer_pow is_finite le lgamma log log1p logistic lt max min mul ne neg nextafter
not or polygamma population_count pow real reduce_precision rem round rsqrt
select_n shift_left shift_right_arithmetic shift_right_logical sign sin sinh sqrt
square stop_gradient sub tan tanh xor zeta
""".split())
REDUCTIONS = frozenset(
    "reduce_sum reduce_max reduce_min reduce_prod reduce_and reduce_or reduce_xor "
    "argmax argmin".split())
CUMULATIVE = frozenset("cumsum cumprod cummax cummin cumlogsumexp".split())


class NotPerExample(Exception):
  """The proof failed; the message names the primitive (or says why)."""


class SizeDependent(NotPerExample):
  """The program on the tile differs from the program on the whole batch."""


# Parameters that may hold the batch size (their effect shows in the value shapes).
_SIZE_PARAMS = frozenset({"shape", "new_sizes", "slice_sizes", "limit_indices", "length",
                          "sizes"})
# Custom-derivative calls under a JVP: the rules were already traced; their
# Python callables differ per trace and do not enter the program.
_CUSTOM = frozenset({"custom_jvp_call", "custom_vjp_call", "custom_vjp_call_jaxpr"})
# Equations that may take a shared value whose shape differs between the twins
# (constant along the differing axes) anywhere: they never combine elements
# along such an axis (those with bodies: checked inside).
_KEEP_APART = ELEMENTWISE | frozenset(
    "broadcast_in_dim transpose reshape squeeze stack jit pjit closed_call core_call "
    "checkpoint remat remat2 scan while cond optimization_barrier".split())


def _combined(eqn: Any, k: int) -> set[int] | None:
  """Axes of operand ``k`` along which the equation combines elements (``None``:
  unknown, so none may differ)."""
  name, p = eqn.primitive.name, eqn.params
  if name in _KEEP_APART:
    return set()
  if name in ("sort", "concatenate"):
    return {p["dimension"]}
  if name in CUMULATIVE:
    return {p["axis"]}
  if name in REDUCTIONS:
    return set(p["axes"])
  if name == "dot_general":
    return set(p["dimension_numbers"][0][k])
  return None


def join(a: Any, b: Any, name: str) -> Any:
  """The annotation of a value that may be either ``a`` or ``b`` (loop carries,
  branches): batched along ``a`` if the other is batched there or constant there."""
  if a == b:
    return a
  if isinstance(a, int) and isinstance(b, int):
    raise NotPerExample(name)
  if isinstance(a, int) or isinstance(b, int):
    axis, other = (a, b) if isinstance(a, int) else (b, a)
    if axis in other:
      return axis
    raise NotPerExample(name)
  return a & b


def _same_array(a: Any, b: Any) -> bool:
  if a is b:
    return True
  if _jax_compat.is_tracer(a) or _jax_compat.is_tracer(b):
    return False
  a, b = np.asarray(a), np.asarray(b)
  if a.shape != b.shape or a.dtype != b.dtype:
    return False
  try:
    return bool(np.array_equal(a, b, equal_nan=a.dtype.kind in "fc"))
  except TypeError:  # e.g. PRNG key arrays
    return False


class Twin:
  """Checks a twin program against the main one (batch sizes ``n`` and ``m``)."""

  def __init__(self, n: int, m: int):
    self.sizes = (int(n), int(m))

  def fail(self, where: str) -> None:
    n, m = self.sizes
    raise SizeDependent(
        f"the program depends on the batch size: traced on {n} and on {m} examples it "
        f"differs at {where}")

  def consts(self, a: list, b: list) -> None:
    if len(a) != len(b) or not all(_same_array(x, y) for x, y in zip(a, b)):
      self.fail("a closed-over constant")

  def program(self, jaxpr: Any, twin: Any, anns: list) -> None:
    if (len(jaxpr.eqns) != len(twin.eqns) or len(jaxpr.invars) != len(twin.invars)
        or len(jaxpr.outvars) != len(twin.outvars)):
      self.fail("the number of equations")
    self.values(jaxpr.invars, twin.invars, anns)

  def values(self, vs: list, ws: list, anns: list) -> None:
    for v, w, ann in zip(vs, ws, anns):
      lit_v, lit_w = isinstance(v, _jax_compat.Literal), isinstance(w, _jax_compat.Literal)
      if lit_v or lit_w:
        if not (lit_v and lit_w and _same_array(v.val, w.val)):
          self.fail("a literal")
        continue
      s, t = tuple(v.aval.shape), tuple(w.aval.shape)
      if v.aval.dtype != w.aval.dtype or len(s) != len(t):
        self.fail(f"a value {v.aval} vs {w.aval}")
      axes = {ann} if isinstance(ann, int) else ann
      for d, (i, j) in enumerate(zip(s, t)):
        if i != j and ((i, j) != self.sizes or d not in axes):
          self.fail(f"a value of shape {list(s)} vs {list(t)}")

  def before(self, eqn: Any, twin: Any, anns: list) -> None:
    name = eqn.primitive.name
    if twin.primitive is not eqn.primitive or set(twin.params) != set(eqn.params):
      self.fail(f"`{name}` vs `{twin.primitive.name}`")
    for key, a in eqn.params.items():
      if not self._same_param(name, key, a, twin.params[key]):
        self.fail(f"`{name}` (its parameter {key!r})")
    self.values(eqn.invars, twin.invars, anns)
    for k, (v, w, a) in enumerate(zip(eqn.invars, twin.invars, anns)):
      if isinstance(a, frozenset) and _differs(v, w):  # broadcast along the batch axis
        combined = _combined(eqn, k)
        if combined is None or _differs(v, w, combined):
          self.fail(f"`{name}` combining a value broadcast along the batch axis")

  def after(self, eqn: Any, twin: Any, anns: list) -> None:
    self.values(eqn.outvars, twin.outvars, anns)

  def _same_param(self, name: str, key: str, a: Any, b: Any) -> bool:
    if hasattr(a, "eqns") or hasattr(getattr(a, "jaxpr", None), "eqns"):
      # Open jaxprs are compared where the row analysis descends; closed ones'
      # constants here.
      return type(a) is type(b) and self._same_consts(getattr(a, "consts", []),
                                                    getattr(b, "consts", []))
    if isinstance(a, (tuple, list)):
      return (isinstance(b, (tuple, list)) and len(a) == len(b)
              and all(self._same_param(name, key, x, y) for x, y in zip(a, b)))
    if name in _CUSTOM and not isinstance(a, (bool, int, str)):
      return True  # the rule's Python callables (``jvp_jaxpr_fun``, ``bwd``, ...)
    if (key in _SIZE_PARAMS and isinstance(a, (int, np.integer))
        and isinstance(b, (int, np.integer)) and (int(a), int(b)) == self.sizes):
      return True
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
      return _same_array(a, b)
    if isinstance(a, float) and isinstance(b, float) and a != a and b != b:
      return True  # NaN (e.g. the fill value of a gather)
    try:
      return bool(a == b)
    except Exception:  # pylint: disable=broad-except
      return a is b

  def _same_consts(self, a: list, b: list) -> bool:
    return len(a) == len(b) and all(_same_array(x, y) for x, y in zip(a, b))


def _differs(v: Any, w: Any, axes: Any = None) -> bool:
  """Whether ``v`` and its twin ``w`` differ in shape (at one of ``axes``)."""
  if isinstance(v, _jax_compat.Literal):
    return False
  s, t = tuple(v.aval.shape), tuple(w.aval.shape)
  return any(s[d] != t[d] for d in (range(len(s)) if axes is None else axes))
