"""``ntklayers.flax.ntk_fn`` for linen modules: differentiate ``params`` only."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax

from ntklayers import adapters


def ntk_fn(module: nn.Module, *, method: str | Callable | None = None,
           mutable: bool | str | Sequence[str] = False,
           trace_axes: int | Sequence[int] = (), diagonal_axes: int | Sequence[int] = (),
           implementation: str = "auto", layerwise: bool = False, trainable: Any = None,
           independent_samples: bool | None = None, precision: str = "highest"):
  """Returns ``kernel_fn(variables, x1, x2=None, **apply_kwargs)`` for a linen module.

  Only ``variables["params"]`` is differentiated; every other collection
  (``batch_stats``, ...) is held fixed. ``apply_kwargs`` are passed to
  ``module.apply`` (e.g. ``train=False`` for eval mode, a mask array, or
  ``rngs={"dropout": key}``): array leaves anywhere in them (nested dicts, lists,
  tuples, PRNG keys) are traced, so new values of the same shapes reuse the
  compiled kernel; the other leaves are static and must be hashable. With
  ``rngs``, the kernel is that of the deterministic function of ``params`` for
  those keys (e.g. one fixed dropout mask). Models that update collections need
  ``mutable=[...]`` and their updates are dropped.
  Options and output layout are those of :func:`ntklayers.ntk_fn`; ``layerwise``
  names are linen module paths (``"Dense_0"``, ``"Block_0/Conv_1"``) and
  ``trainable`` masks are trees like ``variables["params"]``.

  Example:
    >>> import jax, jax.numpy as jnp, flax.linen as nn, ntklayers.flax
    >>> from ntklayers.flax import linen as ntk_nn
    >>> class MLP(nn.Module):
    ...   @nn.compact
    ...   def __call__(self, x):
    ...     return ntk_nn.Dense(2)(nn.relu(ntk_nn.Dense(8)(x)))
    >>> variables = MLP().init(jax.random.key(0), jnp.ones((1, 3)))
    >>> kernel_fn = ntklayers.flax.ntk_fn(MLP())
    >>> kernel_fn(variables, jnp.ones((4, 3))).shape
    (4, 4, 2, 2)
  """
  if not isinstance(module, nn.Module):
    raise TypeError(f"`module` must be a flax.linen Module, got {type(module).__name__}.")
  options = adapters.Options.create(
      trace_axes=trace_axes, diagonal_axes=diagonal_axes, implementation=implementation,
      layerwise=layerwise, trainable=trainable, independent_samples=independent_samples,
      precision=precision)

  def body(params, rest, x1, x2, dynamic, static):
    apply_kwargs = static.merge(dynamic)

    def f(p, x):
      out = module.apply({"params": p, **rest}, x, method=method, mutable=mutable,
                         **apply_kwargs)
      return out[0] if mutable else out
    return adapters.kernel(f, params, x1, x2, options)

  jitted = jax.jit(body, static_argnums=(5,))
  warned: set = set()  # fallback warnings are per kernel function

  def kernel_fn(variables: Mapping[str, Any], x1: Any, x2: Any = None, **apply_kwargs):
    if not isinstance(variables, Mapping) or "params" not in variables:
      raise ValueError(
          f"`variables` must be a mapping with a 'params' collection (as returned "
          f"by module.init); got "
          f"{list(variables) if isinstance(variables, Mapping) else type(variables).__name__}.")
    adapters.check_pair(x1, x2)
    rest = {k: v for k, v in variables.items() if k != "params"}
    dynamic, static = adapters.split_kwargs(apply_kwargs)
    return adapters.checked(jitted(variables["params"], rest, x1, x2, dynamic, static), warned)

  return kernel_fn
