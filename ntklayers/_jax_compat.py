"""The one place where ntklayers touches JAX APIs outside `jax.numpy`/`jax.lax`.

Everything version-sensitive is funnelled through here so that a JAX upgrade
changes one file.
"""

from __future__ import annotations

from typing import Any

import jax

try:  # JAX >= 0.4.36 exposes this under jax.extend.core.
  from jax.extend.core import get_opaque_trace_state as _get_trace_state
except ImportError:  # pragma: no cover - older JAX
  from jax.core import get_opaque_trace_state as _get_trace_state  # type: ignore


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
