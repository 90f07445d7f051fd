"""``ntklayers.flax.ntk_fn`` for linen modules: differentiate ``params`` only."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import flax.linen as nn

from ntklayers import adapters


@dataclasses.dataclass(frozen=True, eq=False)
class _Linen:
  """The static part of a linen model (compared by identity: one per ``ntk_fn``)."""

  module: nn.Module
  method: str | Callable | None
  mutable: bool | str | Sequence[str]


def _build(key: _Linen, rest: dict, apply_kwargs: dict[str, Any]) -> Callable:
  def f(params, x):
    out = key.module.apply({"params": params, **rest}, x, method=key.method,
                           mutable=key.mutable, **apply_kwargs)
    return out[0] if key.mutable else out
  return f


def ntk_fn(module: nn.Module, *, method: str | Callable | None = None,
           mutable: bool | str | Sequence[str] = False, **options: Any):
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

  Args:
    module: a ``flax.linen`` module instance.
    method: the module method to differentiate (``module.apply``'s ``method``).
    mutable: collections the call updates (``module.apply``'s ``mutable``).
    **options: the options of :func:`ntklayers.ntk_fn` (``trace_axes``,
      ``diagonal_axes``, ``implementation``, ``layerwise``, ``trainable``,
      ``independent_samples``, ``precision``), with the same output layout;
      ``layerwise`` names are linen module paths (``"Dense_0"``,
      ``"Block_0/Conv_1"``) and ``trainable`` masks are trees like
      ``variables["params"]``.

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
  options_ = adapters.Options.create(**options)
  key = _Linen(module, method, mutable)

  def split(variables: Mapping[str, Any]):
    if not isinstance(variables, Mapping) or "params" not in variables:
      raise ValueError(
          f"`variables` must be a mapping with a 'params' collection (as returned "
          f"by module.init); got "
          f"{list(variables) if isinstance(variables, Mapping) else type(variables).__name__}.")
    return key, variables["params"], {k: v for k, v in variables.items() if k != "params"}

  return adapters.make_kernel_fn(
      _build, split, options_,
      "kernel_fn(variables, x1, x2=None, **apply_kwargs) -> NTK; see ntklayers.flax.ntk_fn.")
