"""The Haiku adapter's uses of Haiku internals (Haiku has no public API for them)."""

from __future__ import annotations


def custom_getters_active() -> bool:
  """Whether ``hk.custom_getter``s (or mixed precision) transform parameters.

  Haiku has no public query for this; its getter stack is read directly.
  """
  from haiku._src import base  # pylint: disable=g-import-not-at-top
  return bool(getattr(base, "param_getter_stack", ()))
