"""``ntklayers.flax.ntk_fn`` for linen modules, and their ``linearize`` and
``taylor_expand``: differentiate (and move) ``params`` only."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import flax.linen as nn

from ntklayers import adapters
from ntklayers import taylor


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
           mutable: bool | str | Sequence[str] = False,
           get: str | Sequence[str] | None = None, **options: Any):
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
    get: ``None`` or ``"ntk"`` for the NTK; ``"nngp"`` for the NNGP
      ``f(x1) f(x2)^T``; ``("nngp", "ntk")`` for a ``Kernels`` named tuple of
      both from one program (as :func:`ntklayers.kernel_fn`).
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
    >>> k = ntklayers.flax.ntk_fn(MLP(), get=("nngp", "ntk"))(variables, jnp.ones((4, 3)))
    >>> k.nngp.shape, k.ntk.shape
    ((4, 4, 2, 2), (4, 4, 2, 2))
  """
  if not isinstance(module, nn.Module):
    raise TypeError(f"`module` must be a flax.linen Module, got {type(module).__name__}.")
  options_ = adapters.Options.create(**options)
  key = _Linen(module, method, mutable)

  def split(variables: Mapping[str, Any]):
    params, rest = _split_variables(variables)
    return key, params, rest

  return adapters.make_kernel_fn(
      _build, split, options_,
      "kernel_fn(variables, x1, x2=None, **apply_kwargs) -> NTK; see ntklayers.flax.ntk_fn.",
      get=get)


def _split_variables(variables: Any) -> tuple[Any, dict[str, Any]]:
  """``(variables["params"], the other collections)``, with a clear error."""
  if not isinstance(variables, Mapping) or "params" not in variables:
    raise ValueError(
        f"`variables` must be a mapping with a 'params' collection (as returned "
        f"by module.init); got "
        f"{list(variables) if isinstance(variables, Mapping) else type(variables).__name__}.")
  return variables["params"], {k: v for k, v in variables.items() if k != "params"}


def taylor_expand(module: nn.Module, variables: Mapping[str, Any], degree: int, *,
                  method: str | Callable | None = None,
                  mutable: bool | str | Sequence[str] = False) -> Callable[..., Any]:
  """:func:`ntklayers.taylor_expand` of a linen module in its ``params`` collection.

  ``variables["params"]`` is the expansion point and the only collection that
  moves: every other collection (``batch_stats``, ...) is held at its value in
  ``variables``. With ``mutable`` the collections' updates are dropped.

  Args:
    module: a ``flax.linen`` module instance.
    variables: the expansion point, as returned by ``module.init``.
    degree: the order, a non-negative int.
    method: the module method to expand (``module.apply``'s ``method``).
    mutable: collections the call updates (``module.apply``'s ``mutable``).

  Returns:
    ``f_tayl(variables, *args, **apply_kwargs)`` with ``module.apply``'s
    signature and output; only ``variables["params"]`` is read (the other
    collections are those of the expansion point).

  Example:
    >>> import jax, jax.numpy as jnp, flax.linen as nn, ntklayers.flax
    >>> module = nn.Dense(2)
    >>> variables = module.init(jax.random.key(0), jnp.ones((1, 3)))
    >>> f2 = ntklayers.flax.linen.taylor_expand(module, variables, 2)
    >>> f2(variables, jnp.ones((4, 3))).shape
    (4, 2)
  """
  if not isinstance(module, nn.Module):
    raise TypeError(f"`module` must be a flax.linen Module, got {type(module).__name__}.")
  params0, rest = _split_variables(variables)

  def f(params: Any, *args: Any, **kwargs: Any) -> Any:
    out = module.apply({"params": params, **rest}, *args, method=method, mutable=mutable,
                       **kwargs)
    return out[0] if mutable else out

  expanded = (taylor.linearize(f, params0) if degree == 1 else
              taylor.taylor_expand(f, params0, degree))

  def f_tayl(variables: Mapping[str, Any], *args: Any, **kwargs: Any) -> Any:
    return expanded(_split_variables(variables)[0], *args, **kwargs)

  return f_tayl


def linearize(module: nn.Module, variables: Mapping[str, Any], *,
              method: str | Callable | None = None,
              mutable: bool | str | Sequence[str] = False) -> Callable[..., Any]:
  """:func:`ntklayers.linearize` of a linen module in its ``params`` collection.

  ``f_lin(variables, x) = apply(variables0, x) + J (variables["params"] -
  variables0["params"])``, one ``jax.jvp``; the other collections are held at
  their values in ``variables0`` (see :func:`taylor_expand`).

  Args:
    module: a ``flax.linen`` module instance.
    variables: the expansion point ``variables0``, as returned by ``module.init``.
    method: the module method to linearize (``module.apply``'s ``method``).
    mutable: collections the call updates (``module.apply``'s ``mutable``).

  Returns:
    ``f_lin(variables, *args, **apply_kwargs)``, a drop-in for ``module.apply``.

  Example:
    >>> import jax, jax.numpy as jnp, flax.linen as nn, ntklayers.flax
    >>> module = nn.Sequential([nn.Dense(8), nn.relu, nn.Dense(2)])
    >>> variables = module.init(jax.random.key(0), jnp.ones((1, 3)))
    >>> f_lin = ntklayers.flax.linen.linearize(module, variables)
    >>> x = jnp.ones((4, 3))
    >>> bool(jnp.allclose(f_lin(variables, x), module.apply(variables, x)))
    True
  """
  return taylor_expand(module, variables, 1, method=method, mutable=mutable)


def inspect(module: nn.Module, variables: Mapping[str, Any], x1: Any, x2: Any = None, *,
            method: str | Callable | None = None,
            mutable: bool | str | Sequence[str] = False, **options: Any):
  """:func:`ntklayers.inspect` for a linen module: the route of each ``params``
  group of ``ntk_fn(module, **options)(variables, x1, x2)``, nothing computed.

  For ``apply_kwargs`` use ``ntk_fn(module, **options).inspect(variables, x1, x2,
  **apply_kwargs)``.

  Example:
    >>> import jax, jax.numpy as jnp, flax.linen as nn, ntklayers.flax
    >>> module = nn.Dense(2)
    >>> variables = module.init(jax.random.key(0), jnp.ones((1, 3)))
    >>> info = ntklayers.flax.inspect(module, variables, jnp.ones((4, 3)))
    >>> [g.route for g in info.groups]   # the bias is fused into its layer
    ['structured (recognized)']
    >>> info.groups[0].paths
    ("['kernel']", "['bias']")
  """
  return ntk_fn(module, method=method, mutable=mutable, **options).inspect(variables, x1, x2)
