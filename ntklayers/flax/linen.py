"""Annotated flax.linen layers (drop-ins), the linen kernel entry point, and
``linearize`` / ``taylor_expand`` of linen modules (in their ``params``)."""

from ntklayers import adapters as _adapters
from ntklayers.flax._linen_intercept import intercept as _intercept
from ntklayers.flax._linen_kernel import inspect
from ntklayers.flax._linen_kernel import linearize
from ntklayers.flax._linen_kernel import ntk_fn
from ntklayers.flax._linen_kernel import taylor_expand
from ntklayers.flax._linen_layers import Conv
from ntklayers.flax._linen_layers import Dense
from ntklayers.flax._linen_layers import DenseGeneral
from ntklayers.flax._linen_layers import Embed
from ntklayers.flax._linen_layers import LayerNorm
from ntklayers.flax._linen_layers import MultiHeadAttention
from ntklayers.flax._linen_layers import MultiHeadDotProductAttention
from ntklayers.flax._linen_norms import BatchNorm
from ntklayers.flax._linen_norms import GroupNorm
from ntklayers.flax._linen_norms import RMSNorm

_adapters.register_interceptor("flax.linen", _intercept)

__all__ = (
    "BatchNorm",
    "Conv",
    "Dense",
    "DenseGeneral",
    "Embed",
    "GroupNorm",
    "LayerNorm",
    "MultiHeadAttention",
    "MultiHeadDotProductAttention",
    "RMSNorm",
    "inspect",
    "linearize",
    "ntk_fn",
    "taylor_expand",
)
