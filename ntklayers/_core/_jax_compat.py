"""The one place where ntklayers touches JAX APIs outside `jax.numpy`/`jax.lax`.

Everything version-sensitive is funnelled through here so that a JAX upgrade
changes one file: the structure-tag primitive and its transformation rules,
evaluation of single jaxpr equations, the names of the container primitives,
tracer checks, unwrapping of jitted functions and ``shard_map``. (The adapters'
uses of Haiku and Flax internals are in ``ntklayers/haiku/_compat.py`` and
``ntklayers/flax/_compat.py``.)
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import jax

try:
  from jax.extend.core import Literal as _Literal
except ImportError:  # pragma: no cover - older JAX
  from jax.core import Literal as _Literal  # type: ignore

from jax.extend.core import ClosedJaxpr, DropVar, Primitive, jaxprs_in_params
from jax.interpreters import ad as _ad
from jax.interpreters import batching as _batching
from jax.interpreters import mlir as _mlir

Literal = _Literal

# Names of the container primitives whose bodies ntklayers descends into.
SCAN = "scan"
REMAT = frozenset({"remat2", "checkpoint", "remat"})
CALLS = frozenset({"jit", "pjit", "closed_call", "core_call"})


# ------------------------------------------------------------ the tag ---


def make_tag_primitive(on_vmap: Callable[[Any, list], tuple[Any, bool]]) -> Primitive:
  """The structure-tag primitive ``tag(out, primal, *params, *inputs, meta=...)``.

  Semantically the identity on ``out``; the other operands are only observed, so
  that a jaxpr of the model shows each annotated layer call with the arrays its
  structure rule needs, inside any ``scan``, ``remat`` or ``jit`` body.

  * abstract evaluation and lowering: ``out`` itself (free in compiled code);
  * JVP: the tangent of ``out`` passes through (the layer's own equations already
    differentiate ``out`` with respect to everything it depends on);
  * batching (``vmap``): ``on_vmap(meta, dims)`` (``dims``: the operands' batch
    axes, ``None`` where unbatched) returns ``(meta, move)``; with ``move`` the
    batched operands get their batch axis at the front (the new leading axis of
    the layer's rows), otherwise the tag is re-bound as it is.
  """
  tag = Primitive("ntk_tag")
  tag.def_impl(lambda out, *rest, meta: out)
  tag.def_abstract_eval(lambda out, *rest, meta: out)
  _mlir.register_lowering(
      tag, _mlir.lower_fun(lambda out, *rest, meta: out, multiple_results=False))

  def jvp(primals, tangents, *, meta):
    return tag.bind(*primals, meta=meta), _ad.instantiate_zeros(tangents[0])

  def batch(args, dims, *, meta):
    dims = [d if isinstance(d, int) else None for d in dims]  # not_mapped -> None
    meta, move = on_vmap(meta, dims)
    if not move:
      return tag.bind(*args, meta=meta), dims[0]
    args = [a if d is None else jax.numpy.moveaxis(a, d, 0) for a, d in zip(args, dims)]
    return tag.bind(*args, meta=meta), 0

  _ad.primitive_jvps[tag] = jvp
  _batching.primitive_batchers[tag] = batch
  return tag


def eval_eqn(eqn: Any, invals: list) -> list:
  """Evaluates one jaxpr equation on ``invals`` (as ``jax.core.eval_jaxpr`` does).

  ``get_bind_params`` returns ``(subfuns, params)`` before JAX 0.9.2 and ``params``
  since; the equation's context (``eqn.ctx.manager``) is entered when present.
  """
  bind_params = eqn.primitive.get_bind_params(eqn.params)
  subfuns: list = []
  if isinstance(bind_params, tuple):  # JAX < 0.9.2
    subfuns, bind_params = bind_params
  ctx = getattr(getattr(eqn, "ctx", None), "manager", None) or contextlib.nullcontext()
  with ctx:
    out = eqn.primitive.bind(*subfuns, *invals, **bind_params)
  return list(out) if eqn.primitive.multiple_results else [out]


def body(eqn: Any) -> tuple[Any, list]:
  """``(jaxpr, consts)`` of a scan, remat or call equation's single body."""
  sub = eqn.params.get("jaxpr", eqn.params.get("call_jaxpr"))
  if isinstance(sub, ClosedJaxpr):
    return sub.jaxpr, list(sub.consts)
  return sub, []


def scan_params(eqn: Any) -> dict[str, Any]:
  """``num_consts``, ``num_carry``, ``length``, ``reverse``, ``unroll`` of a scan."""
  p = eqn.params
  return {k: p[k] for k in ("num_consts", "num_carry", "length", "reverse", "unroll")}


def remat_params(eqn: Any) -> dict[str, Any]:
  """Keyword arguments of ``jax.checkpoint`` that re-create a remat equation."""
  return {"prevent_cse": eqn.params.get("prevent_cse", True),
          "policy": eqn.params.get("policy")}


def cond_branches(eqn: Any) -> list | None:
  """The branch jaxprs of a ``cond`` equation (operands: index, then the branches'
  inputs), or ``None`` for other equations."""
  if eqn.primitive.name != "cond":
    return None
  return [b.jaxpr if isinstance(b, ClosedJaxpr) else b for b in eqn.params["branches"]]


def while_parts(eqn: Any):
  """``(cond_jaxpr, body_jaxpr, cond_nconsts, body_nconsts)`` of a ``while`` equation
  (operands: cond consts, body consts, carry), or ``None`` for other equations."""
  if eqn.primitive.name != "while":
    return None
  p = eqn.params
  return p["cond_jaxpr"].jaxpr, p["body_jaxpr"].jaxpr, p["cond_nconsts"], p["body_nconsts"]


def has_body(eqn: Any) -> bool:
  """Whether the equation holds nested programs (scan, cond, while, custom_jvp, ...)."""
  return any(True for _ in jaxprs_in_params(eqn.params))


def nested(eqn: Any) -> list:
  """The open jaxprs nested in an equation's parameters."""
  return [j.jaxpr if isinstance(j, ClosedJaxpr) else j for j in jaxprs_in_params(eqn.params)]


def is_drop(v: Any) -> bool:
  return isinstance(v, DropVar)


def is_inexact(dtype: Any) -> bool:
  """Whether ``dtype`` is a floating or complex dtype."""
  return bool(jax.numpy.issubdtype(dtype, jax.numpy.inexact))


def consts_alive(consts: Any) -> bool:
  """Whether the constants of a traced program can still be used: concrete
  values, or tracers of a trace that has not ended (a program traced inside a
  ``jax.jit`` that has returned holds dead tracers)."""
  for c in consts:
    if isinstance(c, jax.core.Tracer):
      trace = getattr(c, "_trace", None)
      is_valid = getattr(trace, "is_valid", None)
      if is_valid is None or not is_valid():
        return False
  return True


def is_tracer(x: Any) -> bool:
  """Whether ``x`` is an abstract value of an ongoing trace (not a concrete array)."""
  return isinstance(x, jax.core.Tracer)


def unwrap_jit(f: Callable) -> Callable:
  """The Python function behind ``jax.jit(f)`` (repeatedly), or ``f`` itself.

  A jitted ``f`` would run the whole model as one inner ``jit`` of the kernel
  computation, where annotated layers cannot be captured. ``jax.jit`` keeps the
  wrapped function as ``__wrapped__`` and has ``lower``; other wrappers are kept.
  """
  while callable(getattr(f, "lower", None)) and callable(getattr(f, "__wrapped__", None)):
    f = f.__wrapped__  # type: ignore[attr-defined]
  return f


def shard_map(f: Callable, mesh: Any, in_specs: Any, out_specs: Any) -> Callable:
  """``jax.shard_map`` (``jax.experimental.shard_map`` before JAX 0.7), with the
  replication check off (the structure tag has no replication rule)."""
  sm = getattr(jax, "shard_map", None)
  if sm is not None:
    return sm(f, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_vma=False)
  from jax.experimental.shard_map import shard_map as old  # pylint: disable=g-import-not-at-top
  return old(f, mesh, in_specs, out_specs, check_rep=False)
