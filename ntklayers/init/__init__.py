"""Initialization from the NTK: calibrated per-layer scales, and LSUV to compare.

* :func:`calibrate` fits one log-scale per layer by gradient through the exact,
  differentiable kernel of :func:`ntklayers.ntk_fn` so that the NTK on a probe
  batch has a target mean eigenvalue and a low condition number.
* :func:`lsuv` is the standard data-dependent baseline (Mishkin & Matas 2016) for
  Haiku models; :func:`layer_variances` reads each layer's output variance. Layers
  inside ``hk.layer_stack`` are rescaled slice by slice, and inside ``hk.scan``,
  ``hk.remat``, ``hk.vmap`` and ``jit`` as elsewhere; a layer whose output cannot
  be seen (inside a ``while`` or ``cond``) is refused, never reported as rescaled.

Example:
  >>> import haiku as hk, jax, jax.numpy as jnp, ntklayers, ntklayers.init as ni
  >>> def mlp(x):
  ...   return ntklayers.Linear(2)(jnp.tanh(ntklayers.Linear(16)(x)))
  >>> net = hk.without_apply_rng(hk.transform(mlp))
  >>> x = jax.random.normal(jax.random.key(1), (16, 4))
  >>> params = net.init(jax.random.key(0), x)
  >>> calibrated = ni.calibrate(net.apply, params, x, steps=20)
  >>> lsuv_params = ni.lsuv(net.apply, params, x, key=jax.random.key(2))
  >>> jax.tree.structure(calibrated) == jax.tree.structure(params)
  True
"""

from ntklayers.init._calibrate import calibrate
from ntklayers.init._calibrate import module_path
from ntklayers.init._calibrate import objective_terms
from ntklayers.init._calibrate import scale_params
from ntklayers.init._lsuv import layer_variances
from ntklayers.init._lsuv import lsuv

__all__ = (
    "calibrate",
    "layer_variances",
    "lsuv",
    "module_path",
    "objective_terms",
    "scale_params",
)
