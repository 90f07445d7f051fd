"""``ntklayers.flax.nnx.ntk_fn``: the NTK over the ``nnx.Param`` state of a model; and
the model's ``linearize`` and ``taylor_expand`` in that state."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
from flax import nnx

from ntklayers import adapters
from ntklayers import taylor
from ntklayers.flax import _compat
from ntklayers.flax._nnx_layers import MODULE_PATHS


def _iter_modules(model: nnx.Module):
  for path, module in _compat.nnx_iter_modules(model):
    yield "/".join(str(p) for p in path), module


def _paths(model: nnx.Module) -> dict[int, str]:
  return {id(m): path or type(m).__name__ for path, m in _iter_modules(model)}


def _declare_batch_coupling(model: nnx.Module) -> None:
  for path, m in _iter_modules(model):
    if isinstance(m, nnx.BatchNorm) and m.use_running_average is not True:
      adapters.declare_coupled(path)


def _build(key: tuple, rest: tuple, kwargs: dict[str, Any]) -> Callable:
  graphdef, param_def = key

  def f(params, x):
    # The Param state from its plain dict, and fresh Variables, created at the
    # current trace level (NNX checks it).
    state = jax.tree.unflatten(param_def, jax.tree.leaves(params))
    state, states = jax.tree.map(lambda a: a, (state, rest))
    model = nnx.merge(graphdef, state, *states)
    _declare_batch_coupling(model)
    token = MODULE_PATHS.set(_paths(model))
    try:
      return model(x, **kwargs)
    finally:
      MODULE_PATHS.reset(token)
  return f


def _split(model: Any) -> tuple[Any, Any, tuple]:
  """``((graphdef, Param treedef), Params as a plain dict, other states)``: the
  kernel sees a plain dict, whose paths name the layers."""
  if isinstance(model, nnx.Module):
    graphdef, params, *rest = nnx.split(model, nnx.Param, ...)
  elif isinstance(model, tuple) and len(model) >= 2:
    graphdef, params, *rest = model
  else:
    raise TypeError(
        f"`model` must be an nnx.Module or (graphdef, params, *states) from "
        f"nnx.split; got {type(model).__name__}.")
  return (graphdef, jax.tree.structure(params)), _pure(params), tuple(rest)


def _pure(state: Any) -> Any:
  return state.to_pure_dict() if isinstance(state, nnx.State) else state


def ntk_fn(*, get: str | Sequence[str] | None = None, **options: Any):
  """Returns ``kernel_fn(model, x1, x2=None, **model_kwargs)`` for ``flax.nnx`` models.

  ``model`` is an ``nnx.Module``, or ``(graphdef, params, *other_states)`` from
  ``nnx.split(model, nnx.Param, ...)``; ``model_kwargs`` are passed to
  ``model(x, **model_kwargs)`` (array leaves traced, other leaves static and
  hashable), as with the Haiku and linen entry points. Only ``nnx.Param`` state is
  differentiated; ``BatchStat`` and other state is held fixed (a BatchNorm with
  ``use_running_average=False``, i.e. after ``model.train()``, is detected as
  making samples interact).

  Args:
    get: ``None`` or ``"ntk"`` for the NTK; ``"nngp"`` for the NNGP
      ``f(x1) f(x2)^T``; ``("nngp", "ntk")`` for a ``Kernels`` named tuple of
      both from one program (as :func:`ntklayers.kernel_fn`).
    **options: the options of :func:`ntklayers.ntk_fn` (``trace_axes``,
      ``diagonal_axes``, ``implementation``, ``layerwise``, ``trainable``,
      ``independent_samples``, ``precision``), with the same output layout;
      ``layerwise`` names are attribute paths (``"layers/0"``) and ``trainable``
      masks are trees like the ``nnx.Param`` state.

  Example:
    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> from ntklayers.flax import nnx as ntk_nnx
    >>> model = ntk_nnx.Linear(3, 2, rngs=nnx.Rngs(0))
    >>> ntk_nnx.ntk_fn()(model, jnp.ones((4, 3))).shape
    (4, 4, 2, 2)
    >>> ntk_nnx.ntk_fn(get="nngp", trace_axes=(-1,))(model, jnp.ones((4, 3))).shape
    (4, 4)
  """
  if "trainable" in options:  # a mask shaped like the Param state: as a plain dict
    options["trainable"] = _pure(options["trainable"])
  return adapters.make_kernel_fn(
      _build, _split, adapters.Options.create(**options),
      "kernel_fn(model, x1, x2=None, **model_kwargs) -> NTK; see "
      "ntklayers.flax.nnx.ntk_fn.", get=get)


def _params_of(model: Any) -> Any:
  """The ``nnx.Param`` state of ``model`` (a Module, an ``nnx.State`` or a plain
  dict of it) as a plain dict."""
  if isinstance(model, nnx.Module):
    model = nnx.state(model, nnx.Param)
  return _pure(model)


def taylor_expand(model: nnx.Module, degree: int) -> Callable[..., Any]:
  """:func:`ntklayers.taylor_expand` of an NNX model in its ``nnx.Param`` state.

  The model's ``nnx.Param`` state now is the expansion point and the only state
  that moves; other state (``BatchStat``, RNG counts, ...) is held at its value
  now (copied: later updates of ``model`` do not change the expansion).

  Args:
    model: an ``nnx.Module``.
    degree: the order, a non-negative int.

  Returns:
    ``f_tayl(params, x, **model_kwargs)``: ``params`` an ``nnx.Module`` of the
    same structure (its Param state is read, e.g. the model being trained), an
    ``nnx.State`` of Params or its plain dict (``state.to_pure_dict()``); the
    output is ``model(x, **model_kwargs)``'s.

  Example:
    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> import ntklayers.flax
    >>> model = nnx.Linear(3, 2, rngs=nnx.Rngs(0))
    >>> f2 = ntklayers.flax.nnx.taylor_expand(model, 2)
    >>> f2(model, jnp.ones((4, 3))).shape
    (4, 2)
  """
  if not isinstance(model, nnx.Module):
    raise TypeError(f"`model` must be an nnx.Module, got {type(model).__name__}.")
  key, params0, rest = _split(model)
  rest = jax.tree.map(lambda a: a, rest)  # a copy: split States alias the model's Variables

  def f(params: Any, x: Any, **kwargs: Any) -> Any:
    return _build(key, rest, kwargs)(params, x)

  expanded = (taylor.linearize(f, params0) if degree == 1 else
              taylor.taylor_expand(f, params0, degree))

  def f_tayl(params: Any, x: Any, **kwargs: Any) -> Any:
    return expanded(_params_of(params), x, **kwargs)

  return f_tayl


def linearize(model: nnx.Module) -> Callable[..., Any]:
  """:func:`ntklayers.linearize` of an NNX model in its ``nnx.Param`` state.

  ``f_lin(params, x) = model0(x) + J (params - params0)`` by one ``jax.jvp``,
  where ``params0`` is ``model``'s Param state now; other state is held fixed
  (see :func:`taylor_expand`).

  Args:
    model: an ``nnx.Module``.

  Returns:
    ``f_lin(params, x, **model_kwargs)``; ``params`` an ``nnx.Module`` of the
    same structure, an ``nnx.State`` of Params, or its plain dict.

  Example:
    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> import ntklayers.flax
    >>> model = nnx.Linear(3, 2, rngs=nnx.Rngs(0))
    >>> f_lin = ntklayers.flax.nnx.linearize(model)
    >>> x = jnp.ones((4, 3))
    >>> bool(jnp.allclose(f_lin(model, x), model(x)))
    True
  """
  return taylor_expand(model, 1)


def inspect(model: Any, x1: Any, x2: Any = None, **options: Any):
  """:func:`ntklayers.inspect` for an NNX model: the route of each ``nnx.Param``
  group of ``ntk_fn(**options)(model, x1, x2)``, nothing computed.

  Example:
    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> from ntklayers.flax import nnx as ntk_nnx
    >>> info = ntk_nnx.inspect(nnx.Linear(3, 2, rngs=nnx.Rngs(0)), jnp.ones((4, 3)))
    >>> sorted(p for g in info.groups for p in g.paths)
    ["['bias']", "['kernel']"]
  """
  return ntk_fn(**options).inspect(model, x1, x2)
