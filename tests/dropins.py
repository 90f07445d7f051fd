"""The public drop-in classes of ntklayers (shared by ``test_coverage`` and
``test_transforms``).

The public drop-ins are the classes in ``ntklayers.haiku.__all__``,
``ntklayers.flax.linen.__all__`` and ``ntklayers.flax.nnx.__all__``, named by
their qualified public name (``"ntklayers.haiku.Linear"``).
"""

from __future__ import annotations

import inspect

import ntklayers.flax.linen
import ntklayers.flax.nnx
import ntklayers.haiku

PUBLIC_MODULES = (ntklayers.haiku, ntklayers.flax.linen, ntklayers.flax.nnx)

# Public names that are aliases of another public class of the same module (the
# class itself is checked under its canonical name): {qualified name: canonical}.
ALIASES = {
    # linen keeps both names; MultiHeadAttention = MultiHeadDotProductAttention.
    "ntklayers.flax.linen.MultiHeadAttention": "MultiHeadDotProductAttention",
}


def public_classes() -> dict[str, type]:
  """``{"ntklayers.haiku.Linear": class, ...}``: the classes of the three ``__all__``s."""
  out = {}
  for module in PUBLIC_MODULES:
    for name in module.__all__:
      obj = getattr(module, name)
      if inspect.isclass(obj):
        out[f"{module.__name__}.{name}"] = obj
  return out


def canonical_classes() -> dict[str, type]:
  """:func:`public_classes` without the aliases of :data:`ALIASES`."""
  return {q: c for q, c in public_classes().items() if q not in ALIASES}


def framework(qualified: str) -> str:
  """``"haiku"``, ``"linen"`` or ``"nnx"``."""
  return qualified.split(".")[-2] if "flax" in qualified else "haiku"


def stock_class(cls: type) -> type:
  """The framework class a drop-in subclasses (the first non-ntklayers base)."""
  return next(b for b in cls.__mro__[1:] if not b.__module__.startswith("ntklayers"))
