"""Flax drop-in layers (linen and NNX) annotated with their NTK structure.

* ``ntklayers.flax.linen``: ``Dense``, ``DenseGeneral``, ``Conv``, ``LayerNorm``,
  ``MultiHeadDotProductAttention``; kernels with :func:`ntklayers.flax.ntk_fn`.
* ``ntklayers.flax.nnx``: ``Linear``, ``LinearGeneral``, ``Conv``, ``LayerNorm``,
  ``MultiHeadAttention``; kernels with :func:`ntklayers.flax.nnx.ntk_fn`.
"""

try:
  import flax as _flax  # noqa: F401
except ImportError as e:  # pragma: no cover - depends on the environment
  raise ImportError(
      "ntklayers.flax needs flax: install it with `pip install 'ntklayers[flax]'` "
      "(or `pip install flax`).") from e

from ntklayers.flax import linen
from ntklayers.flax import nnx
from ntklayers.flax._linen_kernel import inspect
from ntklayers.flax._linen_kernel import ntk_fn

__all__ = ("inspect", "linen", "nnx", "ntk_fn")
