"""Annotated flax.nnx normalizations: ``RMSNorm``, ``GroupNorm`` and ``BatchNorm``.

As ``LayerNorm`` (``_nnx_layers.py``), each subclass runs the stock computation
(the ``Tapped`` mixin) and, only while a capture is active, reports an
elementwise scale (and bias) of the normalized input (the ``"scale"`` rule),
recomputed as NNX computes it: the module's own ``promote_dtype`` first, then
``_common.flax_stats``/``normalized`` (same ``epsilon`` placement, variance
formula and float32 promotion). The subclasses add no attributes, so
``nnx.state`` trees are identical to the originals.
"""

from __future__ import annotations

from flax import nnx

from ntklayers import adapters
from ntklayers.flax import _common
from ntklayers.flax._nnx_layers import Tapped, _tap, _value, module_path


def _param(module, attr: str):
  variable = getattr(module, attr, None)
  return _value(variable) if isinstance(variable, nnx.Variable) else None


class RMSNorm(Tapped, nnx.RMSNorm):
  """Drop-in for :class:`flax.nnx.RMSNorm` (``use_scale``, ``reduction_axes``,
  ``feature_axes``).

  Example:
    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> from ntklayers.flax import nnx as ntk_nnx
    >>> layer = ntk_nnx.RMSNorm(4, rngs=nnx.Rngs(0))
    >>> ntk_nnx.ntk_fn()(layer, jnp.arange(12.0).reshape(3, 4)).shape
    (3, 3, 4, 4)
  """

  @staticmethod
  def _ntk_tap(module, out, x, args, kwargs):
    mask = kwargs.get("mask", args[0] if args else None)
    (xp, _) = module.promote_dtype((x, _param(module, "scale")), dtype=module.dtype)
    description = _common.describe_rms_norm(
        xp, module.reduction_axes, module.feature_axes, module.epsilon, module.dtype,
        module.use_fast_variance, True, mask, module.axis_name)
    return _tap(module, {"scale": "scale"}, description, out, (x, mask))


class GroupNorm(Tapped, nnx.GroupNorm):
  """Drop-in for :class:`flax.nnx.GroupNorm` (``num_groups`` or ``group_size``,
  ``use_scale``, ``use_bias``; statistics over every non-batch axis, the default).

  Example:
    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> from ntklayers.flax import nnx as ntk_nnx
    >>> layer = ntk_nnx.GroupNorm(4, num_groups=2, rngs=nnx.Rngs(0))
    >>> x = jnp.arange(24.0).reshape(2, 3, 4) ** 2
    >>> ntk_nnx.ntk_fn(trace_axes=(1, 2))(layer, x).shape
    (2, 2)
  """

  @staticmethod
  def _ntk_tap(module, out, x, args, kwargs):
    mask = kwargs.get("mask")
    xp, _, _ = module.promote_dtype((x, _param(module, "scale"), _param(module, "bias")),
                                    dtype=module.dtype)
    description = _common.describe_group_norm(
        xp, module.num_groups, module.reduction_axes, module.epsilon, module.dtype,
        module.use_fast_variance, True, mask, module.axis_name, repeat_axis=1)
    return _tap(module, {"scale": "scale", "offset": "bias"}, description, out, (x, mask))


class BatchNorm(nnx.BatchNorm):
  """Drop-in for :class:`flax.nnx.BatchNorm`.

  With ``use_running_average=True`` (``model.eval()``) its scale and bias act on
  the input normalized with the running statistics, and examples stay
  independent. With batch statistics (``model.train()``) samples interact: the
  batch is treated as one sample, and the scale and bias are still contracted
  from factors, exactly.

  Example:
    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> from ntklayers.flax import nnx as ntk_nnx
    >>> layer = ntk_nnx.BatchNorm(4, use_running_average=True, rngs=nnx.Rngs(0))
    >>> ntk_nnx.ntk_fn()(layer, jnp.arange(12.0).reshape(3, 4)).shape
    (3, 3, 4, 4)
  """

  def __call__(self, x, use_running_average=None, *, mask=None):
    if not adapters.capturing():
      return super().__call__(x, use_running_average, mask=mask)
    # Described before the stock call, which updates the running statistics.
    use_running = (self.use_running_average if use_running_average is None
                   else use_running_average)
    if not (isinstance(use_running, bool) and use_running):
      adapters.declare_coupled(module_path(self))
    xp, mean, var, _, _ = self.promote_dtype(
        (x, _value(self.mean), _value(self.var), _param(self, "scale"),
         _param(self, "bias")), dtype=self.dtype)
    description = _common.describe_batch_norm(
        xp, (mean, var) if use_running else None, self.axis, self.epsilon, self.dtype,
        self.use_fast_variance, True, mask, self.axis_name)
    out = super().__call__(x, use_running_average, mask=mask)
    return _tap(self, {"scale": "scale", "offset": "bias"}, description, out,
                (x, mask))
