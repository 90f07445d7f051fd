"""Haiku drop-in layers annotated with their NTK structure.

Each class is a subclass of its Haiku counterpart with the same constructor,
module and parameter names, initializers and outputs; while an NTK is requested,
Haiku method interceptors cache their factors.
"""

try:
  import haiku as _hk  # noqa: F401
except ImportError as e:  # pragma: no cover - depends on the environment
  raise ImportError(
      "ntklayers.haiku needs dm-haiku: install it with "
      "`pip install 'ntklayers[haiku]'` (or `pip install dm-haiku`).") from e

from ntklayers.haiku._attention import MultiHeadAttention
from ntklayers import adapters as _adapters
from ntklayers.haiku._intercept import intercept as _intercept
from ntklayers.haiku._intercept import interceptor
from ntklayers.haiku._layers import Conv1D
from ntklayers.haiku._layers import Conv2D
from ntklayers.haiku._layers import Conv3D
from ntklayers.haiku._layers import ConvND
from ntklayers.haiku._layers import Embed
from ntklayers.haiku._layers import LayerNorm
from ntklayers.haiku._layers import Linear
from ntklayers.haiku._norms import BatchNorm
from ntklayers.haiku._norms import GroupNorm
from ntklayers.haiku._norms import RMSNorm

_adapters.register_interceptor("haiku", _intercept)

__all__ = (
    "BatchNorm",
    "Conv1D",
    "Conv2D",
    "Conv3D",
    "ConvND",
    "Embed",
    "GroupNorm",
    "LayerNorm",
    "Linear",
    "MultiHeadAttention",
    "RMSNorm",
    "interceptor",
)
