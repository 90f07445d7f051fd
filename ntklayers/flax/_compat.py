"""The Flax adapters' uses of Flax APIs that moved or are not exported."""

from __future__ import annotations

from typing import Any


def canonicalize_padding(padding: Any, rank: int) -> Any:
  """Flax's (unexported) ``canonicalize_padding`` of ``nn.Conv``/``nnx.Conv``."""
  try:
    from flax.linen.linear import canonicalize_padding as canon  # pylint: disable=g-import-not-at-top
  except ImportError:  # pragma: no cover - other Flax layouts
    from flax.nnx.nn.linear import canonicalize_padding as canon  # pylint: disable=g-import-not-at-top
  return canon(padding, rank)


def nnx_value(variable: Any) -> Any:
  """The array of an ``nnx.Variable`` (``get_value()`` in new Flax, ``.value`` before)."""
  return variable.get_value() if hasattr(variable, "get_value") else variable.value


def nnx_iter_modules(model: Any):
  """``(path, module)`` pairs of an NNX model (``nnx.iter_modules`` in new Flax)."""
  from flax import nnx  # pylint: disable=g-import-not-at-top
  it = nnx.iter_modules if hasattr(nnx, "iter_modules") else type(model).iter_modules
  return it(model)
