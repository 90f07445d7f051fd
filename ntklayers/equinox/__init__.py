"""The NTK of Equinox models: ``ntklayers.equinox.ntk_fn``.

An ``eqx.Module`` is differentiated with respect to its inexact-array leaves
(``eqx.partition(model, eqx.is_inexact_array)``); every other leaf (integer
arrays, functions, Python numbers, ``eqx.nn.State``) is held fixed. Equinox models
are written per example: by default the model is applied as ``jax.vmap(model)(x)``.
"""

try:
  import equinox as _eqx  # noqa: F401
except ImportError as e:  # pragma: no cover - depends on the environment
  raise ImportError(
      "ntklayers.equinox needs equinox: install it with "
      "`pip install 'ntklayers[equinox]'` (or `pip install equinox`).") from e

from ntklayers.equinox._kernel import inspect
from ntklayers.equinox._kernel import ntk_fn

__all__ = ("inspect", "ntk_fn")
