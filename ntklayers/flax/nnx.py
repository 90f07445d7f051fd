"""Annotated flax.nnx layers (drop-ins) and the NNX kernel entry point."""

from ntklayers.flax._nnx_kernel import ntk_fn
from ntklayers.flax._nnx_layers import Conv
from ntklayers.flax._nnx_layers import LayerNorm
from ntklayers.flax._nnx_layers import Linear
from ntklayers.flax._nnx_layers import LinearGeneral
from ntklayers.flax._nnx_layers import MultiHeadAttention

__all__ = (
    "Conv",
    "LayerNorm",
    "Linear",
    "LinearGeneral",
    "MultiHeadAttention",
    "ntk_fn",
)
