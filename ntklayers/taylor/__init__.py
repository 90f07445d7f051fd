"""Models around their parameters: ``linearize`` and ``taylor_expand``.

neural-tangents' first-order (linearized) and higher-order Taylor models of
``f(params, x)`` around an expansion point, by ``jax.jvp`` (see
``ntklayers/taylor/_expand.py``). Framework helpers that move only the trained
parameters: ``ntklayers.flax.linen.linearize`` / ``taylor_expand`` (linen
``variables``) and ``ntklayers.flax.nnx.linearize`` / ``taylor_expand`` (NNX
models).
"""

from ntklayers.taylor._expand import linearize
from ntklayers.taylor._expand import taylor_expand

__all__ = ("linearize", "taylor_expand")
