"""The one place where ntklayers touches JAX APIs outside `jax.numpy`/`jax.lax`.

Everything version-sensitive is funnelled through here so that a JAX upgrade
changes one file: trace-state tokens, tracer checks, unwrapping of jitted
functions, and the walk over a jaxpr that finds which inputs an output depends on.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax

try:  # JAX >= 0.4.36 exposes this under jax.extend.core.
  from jax.extend.core import get_opaque_trace_state as _get_trace_state
except ImportError:  # pragma: no cover - older JAX
  from jax.core import get_opaque_trace_state as _get_trace_state  # type: ignore

try:
  from jax.extend.core import Literal as _Literal
except ImportError:  # pragma: no cover - older JAX
  from jax.core import Literal as _Literal  # type: ignore


def trace_state() -> Any:
  """Returns an opaque token identifying the current JAX tracing context.

  Two tokens compare equal iff code runs under the same trace, so a layer can
  tell whether it runs inside an inner transform (``jax.checkpoint``, ``scan``,
  ``vmap``, ``jit``) of the function being captured.
  """
  return _get_trace_state(convention="flax")


def is_inexact(dtype: Any) -> bool:
  """Whether ``dtype`` is a floating or complex dtype."""
  return bool(jax.numpy.issubdtype(dtype, jax.numpy.inexact))


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
    f = f.__wrapped__
  return f


def output_dependencies(fun: Callable, *args: Any) -> tuple[Any, int]:
  """Traces ``fun(*args)`` and finds which flattened inputs its outputs depend on.

  Dependencies are followed through the data flow of the traced program
  (``jax.make_jaxpr``): an equation's outputs depend on every input of the
  equation, including those of nested programs (``scan``, ``remat``, ``cond``,
  ``custom_jvp``, ...), so the answer may over-approximate but never misses a
  dependency.

  Returns:
    ``(out_shapes, mask)``: the ``jax.ShapeDtypeStruct`` tree of the outputs and
    a bit mask with bit ``i`` set when an output depends on the ``i``-th leaf of
    ``jax.tree.leaves(args)``.
  """
  closed, shapes = jax.make_jaxpr(fun, return_shape=True)(*args)
  jaxpr = closed.jaxpr
  taint: dict[Any, int] = {v: 1 << i for i, v in enumerate(jaxpr.invars)}
  for eqn in jaxpr.eqns:
    t = 0
    for v in eqn.invars:
      if not isinstance(v, _Literal):
        t |= taint.get(v, 0)
    if t:
      for v in eqn.outvars:
        taint[v] = t
  mask = 0
  for v in jaxpr.outvars:
    if not isinstance(v, _Literal):
      mask |= taint.get(v, 0)
  return shapes, mask
