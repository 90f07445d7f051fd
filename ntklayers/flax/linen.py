"""Annotated flax.linen layers (drop-ins) and the linen kernel entry point."""

from ntklayers.flax import _linen_intercept  # noqa: F401  (registers the interceptor)
from ntklayers.flax._linen_kernel import ntk_fn
from ntklayers.flax._linen_layers import Conv
from ntklayers.flax._linen_layers import Dense
from ntklayers.flax._linen_layers import DenseGeneral
from ntklayers.flax._linen_layers import LayerNorm
from ntklayers.flax._linen_layers import MultiHeadAttention
from ntklayers.flax._linen_layers import MultiHeadDotProductAttention

__all__ = (
    "Conv",
    "Dense",
    "DenseGeneral",
    "LayerNorm",
    "MultiHeadAttention",
    "MultiHeadDotProductAttention",
    "ntk_fn",
)
