"""Annotated flax.nnx layers: ``Linear``, ``LinearGeneral``, ``Conv``, ``LayerNorm``,
``Embed`` and ``MultiHeadAttention`` (the other normalizations: ``_nnx_norms.py``).

NNX has no method interceptors, so each subclass overrides ``__call__``: it runs
the stock computation and, only while a capture is active (one context-variable
read otherwise), reports itself to :func:`ntklayers.tap`. The subclasses add no
attributes, so ``nnx.state`` trees are identical to the originals. The stock
children of the attention drop-in are reported by :func:`intercept`, which
patches the stock classes' ``__call__`` only while an NTK is captured.
"""

from __future__ import annotations

import contextlib
import contextvars
from typing import Any

from flax import nnx

from ntklayers import adapters
from ntklayers.flax import _common
from ntklayers.flax import _compat

# {id(module): "path/to/module"} of the model being captured (set by ntk_fn).
MODULE_PATHS: contextvars.ContextVar[dict[int, str] | None] = contextvars.ContextVar(
    "ntklayers_nnx_paths", default=None)


_value = _compat.nnx_value


def module_path(module) -> str:
  """The attribute path of ``module`` in the model being captured."""
  return (MODULE_PATHS.get() or {}).get(id(module), type(module).__name__)


def _tap(module, roles, description, out, inputs):
  kind, config, primal, unsupported = description
  params = {}
  for role, attr in roles.items():
    variable = getattr(module, attr, None)
    if isinstance(variable, nnx.Variable):
      params[role] = _value(variable)
  return adapters.tap(kind=kind, config=config, name=module_path(module), params=params,
                      primal=primal, out=out, unsupported=unsupported, inputs=inputs)


def _tap_linear(module, out, inputs, args, kwargs):
  return _tap(module, {"w": "kernel", "b": "bias"},
              _common.describe_dense_general(inputs, -1, module.out_features), out,
              (inputs, args, kwargs))


def _tap_linear_general(module, out, inputs, args, kwargs):
  return _tap(module, {"w": "kernel", "b": "bias"},
              _common.describe_dense_general(inputs, module.axis, module.out_features,
                                             tuple(module.batch_axis)), out,
              (inputs, args, kwargs))


def _tap_conv(module, out, inputs, args, kwargs):
  mask = module.mask
  mask = _value(mask) if isinstance(mask, nnx.Variable) else mask
  return _tap(module, {"w": "kernel", "b": "bias"}, _common.describe_conv(
      inputs, module.kernel_size, module.strides, module.padding, module.input_dilation,
      module.kernel_dilation, module.feature_group_count, mask,
      _compat.canonicalize_padding), out, (inputs, args, kwargs))


def _tap_layer_norm(module, out, x, args, kwargs):
  mask = kwargs.get("mask", args[0] if args else None)
  kind, config, primal, unsupported = _common.describe_layer_norm(
      x, module.reduction_axes, module.feature_axes, module.epsilon,
      module.use_fast_variance, mask)
  if module.axis_name is not None:
    unsupported = "it normalizes across devices (`axis_name`)"
  return _tap(module, {"scale": "scale", "offset": "bias"},
              (kind, config, primal, unsupported), out, (x, args, kwargs))


class Tapped:
  """Mixin of the NNX drop-ins: ``__call__`` runs the stock computation and, only
  while a capture is active (one context-variable read otherwise), reports the call
  through the class's ``_ntk_tap(module, out, inputs, args, kwargs)``."""

  _ntk_tap: Any

  def __call__(self, *args: Any, **kwargs: Any) -> Any:
    out = super().__call__(*args, **kwargs)  # type: ignore[misc]
    if not adapters.capturing():
      return out
    if args:
      inputs, args = args[0], args[1:]
    else:  # the input passed by keyword
      kwargs = dict(kwargs)
      inputs = kwargs.pop("inputs") if "inputs" in kwargs else kwargs.pop("x")
    return type(self)._ntk_tap(self, out, inputs, args, kwargs)


class Linear(Tapped, nnx.Linear):
  """Drop-in for :class:`flax.nnx.Linear`.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> from flax import nnx
    >>> from ntklayers.flax import nnx as ntk_nnx
    >>> layer = ntk_nnx.Linear(4, 3, rngs=nnx.Rngs(0))
    >>> layer(jnp.ones((2, 4))).shape
    (2, 3)
  """

  _ntk_tap = staticmethod(_tap_linear)


class LinearGeneral(Tapped, nnx.LinearGeneral):
  """Drop-in for :class:`flax.nnx.LinearGeneral` (trailing ``axis``, no ``batch_axis``)."""

  _ntk_tap = staticmethod(_tap_linear_general)


class Conv(Tapped, nnx.Conv):
  """Drop-in for :class:`flax.nnx.Conv` (1-3D, strides, paddings, dilations, groups)."""

  _ntk_tap = staticmethod(_tap_conv)


class LayerNorm(Tapped, nnx.LayerNorm):
  """Drop-in for :class:`flax.nnx.LayerNorm` (``use_scale``, ``use_bias``,
  ``reduction_axes``, ``feature_axes``)."""

  _ntk_tap = staticmethod(_tap_layer_norm)


class Embed(Tapped, nnx.Embed):
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

  @staticmethod
  def _ntk_tap(module, out, inputs, args, kwargs):
    return _tap(module, {"embeddings": "embedding"},
                _common.describe_embed(inputs, module.num_embeddings), out,
                (inputs, args, kwargs))


class MultiHeadAttention(nnx.MultiHeadAttention):
  """Drop-in for :class:`flax.nnx.MultiHeadAttention`.

  Its ``query``/``key``/``value``/``out`` projections (and the ``normalize_qk``
  LayerNorms) are stock NNX modules, left untouched: while an NTK is captured,
  :func:`intercept` reports the calls of exactly these children. State and
  outputs are those of the original.
  """

  def __call__(self, *args, **kwargs):
    if not adapters.capturing():
      return super().__call__(*args, **kwargs)
    token = _ATTENTION.set(self)
    try:
      return super().__call__(*args, **kwargs)
    finally:
      _ATTENTION.reset(token)


# The annotated attention module whose call is running (its stock children report).
_ATTENTION: contextvars.ContextVar[object] = contextvars.ContextVar(
    "ntklayers_nnx_attention", default=None)
_CHILDREN = ("query", "key", "value", "out", "query_ln", "key_ln")
_CHILD_TAPS = {nnx.LinearGeneral: _tap_linear_general, nnx.Linear: _tap_linear,
               nnx.LayerNorm: _tap_layer_norm}


def _child_call(cls, original):
  def call(self, *args, **kwargs):
    out = original(self, *args, **kwargs)
    parent = _ATTENTION.get()
    if type(self) is not cls or parent is None or not any(
        getattr(parent, a, None) is self for a in _CHILDREN):
      return out
    return _CHILD_TAPS[cls](self, out, args[0], args[1:], kwargs)
  return call


@contextlib.contextmanager
def intercept():
  """The NNX interceptor: for the duration of a capture (as ``nnx.tabulate`` does),
  the stock ``__call__`` of ``nnx.LinearGeneral``, ``nnx.Linear`` and
  ``nnx.LayerNorm`` reports the calls of an annotated attention module's
  children; every other call, and every user object, is left as it is."""
  originals = {cls: cls.__dict__["__call__"] for cls in _CHILD_TAPS}
  try:
    for cls, original in originals.items():
      cls.__call__ = _child_call(cls, original)
    yield
  finally:
    for cls, original in originals.items():
      cls.__call__ = original
