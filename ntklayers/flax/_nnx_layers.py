"""Annotated flax.nnx layers: ``Linear``, ``LinearGeneral``, ``Conv``, ``LayerNorm``,
``Embed`` and ``MultiHeadAttention`` (the other normalizations: ``_nnx_norms.py``).

NNX has no method interceptors, so each subclass overrides ``__call__``: it runs
the stock computation and, only while a capture is active (one context-variable
read otherwise), reports itself to :func:`ntklayers.tap`. The subclasses add no
attributes, so ``nnx.state`` trees are identical to the originals.
"""

from __future__ import annotations

import contextvars

from flax import nnx

from ntklayers import _jax_compat, adapters
from ntklayers.flax import _common

# {id(module): "path/to/module"} of the model being captured (set by ntk_fn).
MODULE_PATHS: contextvars.ContextVar[dict[int, str]] = contextvars.ContextVar(
    "ntklayers_nnx_paths", default={})


_value = _jax_compat.nnx_value


def module_path(module) -> str:
  """The attribute path of ``module`` in the model being captured."""
  return MODULE_PATHS.get().get(id(module), type(module).__name__)


def _tap(module, roles, description, out, inputs):
  kind, config, primal, unsupported = description
  params = {}
  for role, attr in roles.items():
    variable = getattr(module, attr, None)
    if isinstance(variable, nnx.Variable):
      params[role] = _value(variable)
  if _jax_compat.is_inexact(primal.dtype):  # (integer primals, e.g. token ids, stay)
    primal = primal.astype(out.dtype)
  return adapters.tap(kind=kind, config=config, name=module_path(module), params=params,
                      primal=primal, out=out, unsupported=unsupported, inputs=inputs)


class Linear(nnx.Linear):
  """Drop-in for :class:`flax.nnx.Linear`.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> from flax import nnx
    >>> from ntklayers.flax import nnx as ntk_nnx
    >>> layer = ntk_nnx.Linear(4, 3, rngs=nnx.Rngs(0))
    >>> layer(jnp.ones((2, 4))).shape
    (2, 3)
  """

  def __call__(self, inputs, *args, **kwargs):
    out = super().__call__(inputs, *args, **kwargs)
    if not adapters.capturing():
      return out
    return _tap(self, {"w": "kernel", "b": "bias"},
                _common.describe_dense_general(inputs, -1, self.out_features), out,
                (inputs, args, kwargs))


class LinearGeneral(nnx.LinearGeneral):
  """Drop-in for :class:`flax.nnx.LinearGeneral` (trailing ``axis``, no ``batch_axis``)."""

  def __call__(self, inputs, *args, **kwargs):
    out = super().__call__(inputs, *args, **kwargs)
    if not adapters.capturing():
      return out
    return _tap(self, {"w": "kernel", "b": "bias"},
                _common.describe_dense_general(inputs, self.axis, self.out_features,
                                               tuple(self.batch_axis)), out,
                (inputs, args, kwargs))


class Conv(nnx.Conv):
  """Drop-in for :class:`flax.nnx.Conv` (1-3D, strides, paddings, dilations, groups)."""

  def __call__(self, inputs, *args, **kwargs):
    out = super().__call__(inputs, *args, **kwargs)
    if not adapters.capturing():
      return out
    mask = self.mask if self.mask is None else _value(self.mask) if isinstance(
        self.mask, nnx.Variable) else self.mask
    return _tap(self, {"w": "kernel", "b": "bias"}, _common.describe_conv(
        inputs, self.kernel_size, self.strides, self.padding, self.input_dilation,
        self.kernel_dilation, self.feature_group_count, mask, _jax_compat.flax_canonicalize_padding), out,
        (inputs, args, kwargs))


class LayerNorm(nnx.LayerNorm):
  """Drop-in for :class:`flax.nnx.LayerNorm` (``use_scale``, ``use_bias``,
  ``reduction_axes``, ``feature_axes``)."""

  def __call__(self, x, *, mask=None):
    out = super().__call__(x, mask=mask)
    if not adapters.capturing():
      return out
    kind, config, primal, unsupported = _common.describe_layer_norm(
        x, self.reduction_axes, self.feature_axes, self.epsilon,
        self.use_fast_variance, mask)
    if self.axis_name is not None:
      unsupported = "it normalizes across devices (`axis_name`)"
    return _tap(self, {"scale": "scale", "offset": "bias"},
                (kind, config, primal, unsupported), out, (x, mask))


class Embed(nnx.Embed):
  """Drop-in for :class:`flax.nnx.Embed`.

  Its ``__call__`` is a gather of table rows, whose kernel is a count-matching
  Gram of the token ids (no one-hot ``[..., num_embeddings]`` array is formed).
  ``attend`` (a tied decoder) reads the table outside ``__call__``: the exact
  fallback then counts it.

  Example:
    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> from ntklayers.flax import nnx as ntk_nnx
    >>> layer = ntk_nnx.Embed(10, 4, rngs=nnx.Rngs(0))
    >>> ntk_nnx.ntk_fn()(layer, jnp.array([[1, 2, 1], [3, 1, 0]])).shape
    (2, 2, 3, 3, 4, 4)
  """

  def __call__(self, inputs, *args, **kwargs):
    out = super().__call__(inputs, *args, **kwargs)
    if not adapters.capturing():
      return out
    return _tap(self, {"embeddings": "embedding"},
                _common.describe_embed(inputs, self.num_embeddings), out,
                (inputs, args, kwargs))


class MultiHeadAttention(nnx.MultiHeadAttention):
  """Drop-in for :class:`flax.nnx.MultiHeadAttention`.

  Its ``query``/``key``/``value``/``out`` projections (and the ``normalize_qk``
  LayerNorms) are the annotated classes above; state and outputs are those of
  the original.
  """

  def __init__(self, *args, **kwargs):
    super().__init__(*args, **kwargs)
    swap = {nnx.LinearGeneral: LinearGeneral, nnx.Linear: Linear, nnx.LayerNorm: LayerNorm}
    for attr in ("query", "key", "value", "out", "query_ln", "key_ln"):
      child = getattr(self, attr, None)
      if type(child) in swap:
        child.__class__ = swap[type(child)]
