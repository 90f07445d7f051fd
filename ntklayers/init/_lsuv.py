"""LSUV initialization (Mishkin & Matas 2016) for Haiku models, as a baseline.

Layer-sequential unit-variance: orthonormal weight matrices, then, layer by layer
in forward order, divide the weights by the standard deviation of the layer's
output on a probe batch until its variance is within ``tol`` of 1.

Scope: Haiku models (``f`` is the ``apply`` of an ``hk.transform``-ed function,
or a closure calling one). A *layer* is a module whose params hold a ``w`` leaf
(``hk.Linear``, ``ntklayers.Linear``, ``hk.ConvND``, ...); its output is the
return value of its ``__call__`` (the pre-activation), recorded with
``hk.intercept_methods``. Biases are left as they are. A module called several
times (weight sharing) is judged on its last call.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp


def _recording(f: Callable, params: Any) -> Callable:
  """``g(params, x) -> {layer name: output}`` in forward order (dicts keep insertion)."""
  import haiku as hk  # pylint: disable=g-import-not-at-top

  layers = {name for name, leaves in params.items()
            if isinstance(leaves, dict) and "w" in leaves}

  def g(p, x):
    outputs: dict[str, jax.Array] = {}

    def interceptor(next_fun, args, kwargs, ctx: hk.MethodContext):
      out = next_fun(*args, **kwargs)
      name = ctx.module.module_name
      if ctx.method_name == "__call__" and name in layers:
        outputs.pop(name, None)  # keep forward order of the (last, outermost) call
        outputs[name] = out
      return out

    with hk.intercept_methods(interceptor):
      f(p, x)
    return outputs

  return g


def layer_variances(f: Callable[[Any, Any], Any], params: Any, x: Any) -> dict[str, jax.Array]:
  """Variance of each layer's output over the probe batch (all entries), in forward order.

  Args:
    f: Haiku ``apply(params, x)`` (see the module docstring for the scope).
    params: Haiku params ``{module name: {"w": ..., ...}}``.
    x: probe batch ``[N, ...]``.

  Returns:
    ``{module name: scalar variance}`` for every module with a ``w`` that ran.

  Example:
    >>> import haiku as hk, jax, jax.numpy as jnp, ntklayers.init as ni
    >>> net = hk.without_apply_rng(hk.transform(lambda x: hk.Linear(3)(x)))
    >>> x = jnp.ones((4, 2))
    >>> list(ni.layer_variances(net.apply, net.init(jax.random.key(0), x), x))
    ['linear']
  """
  outputs = _recording(f, params)(params, x)
  return {k: jnp.var(v) for k, v in outputs.items()}


def lsuv(f: Callable[[Any, Any], Any], params: Any, x: Any, *, key: jax.Array,
         tol: float = 0.1, max_iters: int = 10, orthonormal: bool = True,
         return_variances: bool = False) -> Any:
  """LSUV: orthonormal init, then per-layer rescaling to unit output variance.

  For each layer ``ℓ`` in forward order: repeat at most ``max_iters`` times —
  compute the output ``B_ℓ`` on ``x``; stop if ``|Var(B_ℓ) − 1| < tol``; else
  ``w_ℓ ← w_ℓ / sqrt(Var(B_ℓ))`` (Mishkin & Matas 2016, Algorithm 1, with their
  ``tol = 0.1``). Each forward pass is one jitted call, compiled once.

  Args:
    f: Haiku ``apply(params, x)``; layers as in the module docstring.
    params: freshly initialized Haiku params.
    x: probe batch ``[N, ...]`` (the paper uses one mini-batch).
    key: PRNG key of the orthonormal matrices (layer ``i`` uses ``fold_in(key, i)``).
    tol: tolerance on the variance.
    max_iters: maximum rescalings per layer.
    orthonormal: replace each ``w`` ``[..., d_out]`` by an orthonormal matrix
      (``jax.nn.initializers.orthogonal`` over the flattened fan-in) first; with
      ``False`` only the rescaling runs (the "LSUV without orthonormal" variant).
    return_variances: also return ``{layer: output variance}`` measured after
      each layer's last rescaling (floats).

  Returns:
    Params of the same structure and dtypes (``(params, variances)`` when asked).

  Raises:
    ValueError: if no module with a ``w`` leaf runs in ``f``.

  References:
    Mishkin, Matas, "All you need is a good init", ICLR 2016.

  Example:
    >>> import haiku as hk, jax, jax.numpy as jnp, ntklayers.init as ni
    >>> net = hk.without_apply_rng(hk.transform(
    ...     lambda x: hk.Linear(4)(jnp.tanh(hk.Linear(32)(x)))))
    >>> x = jax.random.normal(jax.random.key(1), (64, 8))
    >>> params = net.init(jax.random.key(0), x)
    >>> new, var = ni.lsuv(net.apply, params, x, key=jax.random.key(2),
    ...                    return_variances=True)
    >>> all(abs(v - 1) < 0.1 for v in var.values())
    True
  """
  if tol <= 0 or max_iters < 1:
    raise ValueError(f"`lsuv` needs tol > 0 and max_iters >= 1; got {tol}, {max_iters}.")
  record = _recording(f, params)
  order: list[str] = []
  jax.eval_shape(lambda p, x: order.extend(record(p, x)), params, x)  # forward order
  if not order:
    raise ValueError("`lsuv`: no module with a `w` parameter ran in `f` (is `f` a "
                     "Haiku apply function, not jitted?).")
  variances = jax.jit(lambda p, x: jnp.stack([jnp.var(v) for v in record(p, x).values()]))
  params = {k: dict(v) if isinstance(v, dict) else v for k, v in params.items()}
  if orthonormal:
    ortho = jax.nn.initializers.orthogonal()
    for i, name in enumerate(order):
      w = params[name]["w"]
      params[name]["w"] = ortho(jax.random.fold_in(key, i), w.shape, w.dtype)
  final = {}
  for i, name in enumerate(order):
    for _ in range(max_iters):
      var = float(variances(params, x)[i])
      if abs(var - 1.0) < tol or not var > 0 or var == float("inf"):
        break  # converged, or a dead/diverged layer that rescaling cannot fix
      w = params[name]["w"]
      params[name]["w"] = w / jnp.sqrt(jnp.asarray(var, dtype=w.dtype))
    else:
      var = float(variances(params, x)[i])
    final[name] = var
  return (params, final) if return_variances else params
