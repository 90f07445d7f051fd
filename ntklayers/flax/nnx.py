"""Annotated flax.nnx layers (drop-ins), the NNX kernel entry point, and
``linearize`` / ``taylor_expand`` of NNX models (in their ``nnx.Param`` state)."""

from ntklayers import adapters as _adapters
from ntklayers.flax._nnx_kernel import inspect
from ntklayers.flax._nnx_kernel import linearize
from ntklayers.flax._nnx_kernel import ntk_fn
from ntklayers.flax._nnx_kernel import taylor_expand
from ntklayers.flax._nnx_layers import Conv
from ntklayers.flax._nnx_layers import Embed
from ntklayers.flax._nnx_layers import LayerNorm
from ntklayers.flax._nnx_layers import Linear
from ntklayers.flax._nnx_layers import LinearGeneral
from ntklayers.flax._nnx_layers import MultiHeadAttention
from ntklayers.flax._nnx_layers import intercept as _intercept
from ntklayers.flax._nnx_norms import BatchNorm
from ntklayers.flax._nnx_norms import GroupNorm
from ntklayers.flax._nnx_norms import RMSNorm

_adapters.register_interceptor("flax.nnx", _intercept)

__all__ = (
    "BatchNorm",
    "Conv",
    "Embed",
    "GroupNorm",
    "LayerNorm",
    "Linear",
    "LinearGeneral",
    "MultiHeadAttention",
    "RMSNorm",
    "inspect",
    "linearize",
    "ntk_fn",
    "taylor_expand",
)
