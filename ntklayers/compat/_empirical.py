"""neural-tangents' empirical kernel functions on ntklayers' kernels.

An :class:`Empirical` holds what ``empirical_*_fn(f, ...)`` was given; a call
``evaluate(x1, x2, params, **apply_fn_kwargs)`` computes the requested kernels:

1. ``apply_fn_kwargs`` are split per side (``_kwargs.split_kwargs``); the kwargs
   that ``vmap_axes`` batches with ``x`` ride along with the inputs
   (``x -> (x, those kwargs)``), so that each example sees its own slice;
2. each leaf of ``f``'s output (neural-tangents: one kernel per output leaf,
   cross-leaf terms ignored) is a model of its own: ``ntklayers.kernel_fn(leaf
   of f, get=...)``, NNGP and NTK from one program, when both sides call ``f``
   with the same kwargs; otherwise ``_two_sided`` (whole-batch Jacobians);
3. the kernels are put back in the output's tree structure.

The ntklayers kernel functions are cached per output leaf and ``get``, so
repeated calls reuse their compiled programs.
"""

from __future__ import annotations

import collections
import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from ntklayers import _core
from ntklayers.compat import _kwargs
from ntklayers.compat import _two_sided


@functools.cache
def empirical_kernel_type(names: tuple[str, ...]) -> type:
  """neural-tangents' ``EmpiricalKernel`` named tuple for ``get=names``."""
  return collections.namedtuple("EmpiricalKernel", names)


def canonicalize_get(get: Any) -> tuple[bool, tuple[str, ...]]:
  """``(single, names)`` of neural-tangents' ``get``: ``None`` is ``("nngp", "ntk")``."""
  if get is not None and not isinstance(get, str) and len(get) == 0:
    raise ValueError('"get" must be non-empty.')
  return _core.normalize_get(get)


class Empirical:
  """``f`` and the options of one ``empirical_*_fn`` call (see the module docstring).

  Attributes:
    f: ``f(params, x, **kwargs)``, any pytree output.
    trace_axes: neural-tangents' ``trace_axes`` (default ``(-1,)``).
    diagonal_axes: ``diagonal_axes``.
    implementation: ntklayers' name of the NTK implementation.
    batched: kwargs batched with ``x`` (name -> axis), from ``vmap_axes``.
  """

  def __init__(self, f: Callable, trace_axes: Any, diagonal_axes: Any,
               implementation: str = "jacobian", batched: dict[str, int] | None = None):
    if not callable(f):
      raise TypeError(f"`f` must be callable as f(params, x, **kwargs), got "
                      f"{type(f).__name__}.")
    self.f = f
    self.trace_axes = (trace_axes,) if isinstance(trace_axes, int) else tuple(trace_axes)
    self.diagonal_axes = ((diagonal_axes,) if isinstance(diagonal_axes, int) else
                          tuple(diagonal_axes))
    _core.Options.create(trace_axes=self.trace_axes, diagonal_axes=self.diagonal_axes)
    self.implementation = implementation
    self.batched = dict(batched or {})
    self._leaves: dict[Any, tuple[int, Any]] = {}
    self._fns: dict[tuple, Callable] = {}

  # --------------------------------------------------------------- models ---

  def model(self, params: Any, x: Any, **kwargs: Any) -> Any:
    """``f`` on inputs that carry the batched kwargs: ``x`` or ``(x, {name: slice})``."""
    if not self.batched:
      return self.f(params, x, **kwargs)
    x, extra = x
    extra = {k: jnp.moveaxis(v, 0, self.batched[k]) for k, v in extra.items()}
    return self.f(params, x, **kwargs, **extra)

  def fold(self, x: Any, kwargs: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
    """``(inputs, kwargs)`` with the batched kwargs moved into the inputs."""
    if not self.batched or x is None:
      return x, kwargs
    kwargs = dict(kwargs)
    extra = {k: jnp.moveaxis(jnp.asarray(kwargs.pop(k)), a, 0)
             for k, a in self.batched.items() if k in kwargs}
    return (x, extra), kwargs

  def leaves(self, params: Any, x: Any, kwargs: dict[str, Any]) -> tuple[int, Any]:
    """``(number of output leaves, output treedef)`` of ``model`` (cached by avals)."""
    def aval(a):
      return (jnp.shape(a), jnp.result_type(a)) if hasattr(a, "shape") else a
    try:
      key = (jax.tree.structure((params, x, kwargs)),
             tuple(aval(a) for a in jax.tree.leaves((params, x, kwargs))))
      hash(key)
    except TypeError:
      key = None
    if key is None or key not in self._leaves:
      out = jax.eval_shape(lambda p, x: self.model(p, x, **kwargs), params, x)
      leaves, treedef = jax.tree.flatten(out)
      if key is None:
        return len(leaves), treedef
      self._leaves[key] = (len(leaves), treedef)
    return self._leaves[key]

  def leaf_model(self, i: int, n: int) -> Callable:
    """Output leaf ``i`` of ``n`` as a model (``model`` itself for an array output)."""
    key = ("leaf", i, n)
    if key not in self._fns:
      if n == 1 and i == 0:
        self._fns[key] = self.model
      else:
        def leaf(params: Any, x: Any, **kwargs: Any) -> jax.Array:
          return jax.tree.leaves(self.model(params, x, **kwargs))[i]
        self._fns[key] = leaf
    return self._fns[key]

  def kernel_fn(self, i: int, n: int, names: tuple[str, ...]) -> Callable:
    """``ntklayers.kernel_fn`` of output leaf ``i`` for ``names`` (cached)."""
    key = ("kernel", i, n, names)
    if key not in self._fns:
      self._fns[key] = _core.kernel_fn(
          self.leaf_model(i, n), get=names, trace_axes=self.trace_axes,
          diagonal_axes=self.diagonal_axes, implementation=self.implementation)
    return self._fns[key]

  # ----------------------------------------------------------------- call ---

  def evaluate(self, names: tuple[str, ...], x1: Any, x2: Any, params: Any,
               apply_fn_kwargs: dict[str, Any]) -> tuple[list[dict[str, Any]], Any]:
    """``([{name: kernel} per output leaf], output treedef)``."""
    kw1, kw2 = _kwargs.split_kwargs(apply_fn_kwargs, x1, x2)
    xe1, kw1 = self.fold(x1, kw1)
    xe2, kw2 = self.fold(x2, kw2)
    n, treedef = self.leaves(params, xe1, kw1)
    if x2 is None or _kwargs.same_kwargs(kw1, kw2):
      values = []
      for i in range(n):
        k = self.kernel_fn(i, n, names)(params, xe1, xe2, **kw1)
        values.append(dict(zip(names, k)))
      return values, treedef
    xe2 = xe1 if xe2 is None else xe2
    return _two_sided.kernels(self.model, names, self.trace_axes, self.diagonal_axes,
                              params, xe1, xe2, kw1, kw2), treedef

  def __call__(self, get: Any, x1: Any, x2: Any, params: Any,
               apply_fn_kwargs: dict[str, Any]) -> Any:
    """neural-tangents' return value: one kernel (per output leaf) for a string
    ``get``, else ``EmpiricalKernel`` named tuples."""
    single, names = canonicalize_get(get)
    values, treedef = self.evaluate(names, x1, x2, params, apply_fn_kwargs)
    if single:
      per_leaf = [v[names[0]] for v in values]
    else:
      kind = empirical_kernel_type(names)
      per_leaf = [kind(*(v[g] for g in names)) for v in values]
    return jax.tree.unflatten(treedef, per_leaf)


def check_x2(x1: Any, x2: Any) -> None:
  """neural-tangents' ``x2``: ``None`` or a batch like ``x1``."""
  if x2 is not None and str(jax.tree.structure(x1)) != str(jax.tree.structure(x2)):
    raise ValueError(f"`x1` and `x2` have different structures: "
                     f"{jax.tree.structure(x1)} vs {jax.tree.structure(x2)}.")


def options(f: Callable, trace_axes: Any, diagonal_axes: Any, vmap_axes: Any,
            implementation: Any, j_rules: Any, s_rules: Any, fwd: Any) -> Empirical:
  """An :class:`Empirical` from neural-tangents' arguments, each checked."""
  _kwargs.check_debug_flags(j_rules, s_rules, fwd)
  return Empirical(f, trace_axes, diagonal_axes, _kwargs.implementation(implementation),
                   _kwargs.batched_kwargs(vmap_axes))


def ntk_vp(f: Callable, x1: Any, x2: Any, params: Any,
           apply_fn_kwargs: dict[str, Any]) -> Callable[[Any], Any]:
  """``cotangents -> J(x1) J(x2)^T cotangents``: one VJP on ``x2``, one JVP on ``x1``."""
  kw1, kw2 = _kwargs.split_kwargs(apply_fn_kwargs, x1, x2)

  def f1(p: Any) -> Any:
    return f(p, x1, **kw1)

  def f2(p: Any) -> Any:
    return f1(p) if x2 is None else f(p, x2, **kw2)

  def ntk_vp_fn(cotangents: Any) -> Any:
    _, vjp = jax.vjp(f2, params)
    (v,) = vjp(cotangents)
    return jax.jvp(f1, (params,), (v,))[1]

  return ntk_vp_fn

