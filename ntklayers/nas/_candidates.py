"""Candidates of every framework for :class:`~ntklayers.nas.Scorer`.

An adapter initializes a candidate into ``(static, dynamic)`` (hashable NNX graph
definitions, a pytree of arrays) and builds its kernels on its framework's entry
point: one compiled program per candidate and kernel serves every repeat. The
frameworks are imported only when a candidate of theirs is scored (optional
extras).
"""

from __future__ import annotations

import functools
import inspect
import sys
from collections.abc import Callable
from typing import Any

import jax

from ntklayers import _core
from ntklayers.nas._scores import (kernel_options, nnx_summed, require, summed, summed_method,
                                   weights_only)

KINDS = ("haiku", "linen", "nnx")
_HINT = ("a Haiku function fn(x) -> [N, O], an hk.Transformed, a flax.linen Module "
         "instance, or an NNX constructor callable(rngs: nnx.Rngs) -> nnx.Module")


class Bound:
  """A kernel function called as ``kernel(static, dynamic, x)``; ``fallback`` names
  the parameter groups its calls so far counted on the generic fallback."""

  def __init__(self, fn: Any, call: Callable):
    self.fn, self._call = fn, call

  def __call__(self, static: Any, dynamic: Any, x: Any) -> Any:
    return self._call(self.fn, static, dynamic, x)

  @property
  def fallback(self) -> tuple[str, ...]:
    return self.fn.fallback


class HaikuAdapter:
  """``hk.Transformed`` / ``hk.TransformedWithState`` (apply's ``rng``, if it takes
  one, is a fixed key: one fixed dropout mask)."""

  framework = "haiku"

  def __init__(self, transformed: Any, with_state: bool):
    self.t, self.with_state = transformed, with_state
    takes_rng = "rng" in inspect.signature(transformed.apply).parameters
    key = (jax.random.key(0),) if takes_rng else ()
    if with_state:
      def f(ps, x):
        return transformed.apply(ps["params"], ps["state"], *key, x)[0]
      self.trainable: dict[str, bool] | None = {"params": True, "state": False}
      self.weights = lambda ps: {"params": weights_only(ps["params"]), "state": False}
    else:
      f = (lambda p, x: transformed.apply(p, *key, x)) if key else transformed.apply
      self.trainable, self.weights = None, weights_only
    self.f = f

  def init(self, key: jax.Array, x: jax.Array) -> tuple[Any, Any]:
    if self.with_state:
      params, state = self.t.init(key, x)
      return None, {"params": params, "state": state}
    return None, self.t.init(key, x)

  def kernel(self, kind: str, out_ndim: int) -> Callable:
    f = summed(self.f) if kind == "te_nas" else self.f
    fn = _core.ntk_fn(f, **kernel_options(kind, out_ndim, self.trainable, self.weights))
    return Bound(fn, lambda fn, static, dynamic, x: fn(dynamic, x))

  def plain(self, static: Any, dynamic: Any) -> tuple[Callable, Any, Any]:
    return self.f, dynamic, self.trainable


class LinenAdapter:
  """A ``flax.linen`` module instance, called as ``module.apply(variables, x)``."""

  framework = "linen"

  def __init__(self, module: Any):
    self.module = module
    self.flax = require("ntklayers.flax", "flax")

  def init(self, key: jax.Array, x: jax.Array) -> tuple[Any, Any]:
    return None, self.module.init(key, x)

  def kernel(self, kind: str, out_ndim: int) -> Callable:
    fn = self.flax.ntk_fn(self.module, method=summed_method if kind == "te_nas" else None,
                          **kernel_options(kind, out_ndim))
    return Bound(fn, lambda fn, static, dynamic, x: fn(dynamic, x))

  def plain(self, static: Any, dynamic: Any) -> tuple[Callable, Any, Any]:
    rest = {k: v for k, v in dynamic.items() if k != "params"}
    f: Any = lambda p, x: self.module.apply({"params": p, **rest}, x)
    return f, dynamic["params"], None


class NnxAdapter:
  """An NNX constructor ``ctor(rngs) -> nnx.Module``, built with ``nnx.Rngs(key)``."""

  framework = "nnx"

  def __init__(self, ctor: Callable):
    self.ctor = ctor
    self.nnx_kernel = require("ntklayers.flax.nnx", "flax")
    self.nnx = require("flax.nnx", "flax")

  def init(self, key: jax.Array, x: jax.Array) -> tuple[Any, Any]:
    nnx = self.nnx
    model = self.ctor(nnx.Rngs(key))
    if not isinstance(model, nnx.Module):
      raise TypeError(f"`candidate` (an NNX constructor) returned a "
                      f"{type(model).__name__}, not an nnx.Module.")
    g, p, *rest = nnx.split(model, nnx.Param, ...)
    gs, ps, *rest_s = nnx.split(nnx_summed()(model), nnx.Param, ...)
    return (g, gs), (p, tuple(rest), ps, tuple(rest_s))

  def kernel(self, kind: str, out_ndim: int) -> Callable:
    fn = self.nnx_kernel.ntk_fn(**kernel_options(kind, out_ndim))
    k = 1 if kind == "te_nas" else 0
    return Bound(fn, lambda fn, static, dynamic, x: fn((static[k], dynamic[2 * k],
                                                         *dynamic[2 * k + 1]), x))

  def plain(self, static: Any, dynamic: Any) -> tuple[Callable, Any, Any]:
    graphdef, (p, rest) = static[0], dynamic[:2]
    f: Any = lambda q, x: self.nnx.merge(graphdef, *jax.tree.map(lambda a: a, (q, *rest)))(x)
    return f, p, None


def detect(candidate: Any) -> str:
  """``"haiku"``, ``"linen"`` or ``"nnx"`` (else a ``TypeError``). Flax and Haiku objects
  are looked for only if their framework is imported; another callable is an NNX
  constructor if it takes ``rngs`` (or is an ``nnx.Module`` class), else Haiku."""
  hk, linen, nnx = (sys.modules.get(m) for m in ("haiku", "flax.linen", "flax.nnx"))
  if hk is not None and isinstance(candidate, (hk.Transformed, hk.TransformedWithState)):
    return "haiku"
  if linen is not None and isinstance(candidate, linen.Module):
    return "linen"
  if nnx is not None and isinstance(candidate, nnx.Module):
    raise TypeError(
        f"`candidate` is an already built nnx.Module ({type(candidate).__name__}); "
        f"pass its constructor, e.g. `lambda rngs: {type(candidate).__name__}(..., "
        f"rngs=rngs)`, so that each repeat builds it from its own seed.")
  base = candidate
  while isinstance(base, functools.partial):
    base = base.func
  if nnx is not None and isinstance(base, type) and issubclass(base, nnx.Module):
    return "nnx"
  if isinstance(candidate, type):
    if linen is not None and issubclass(candidate, linen.Module):
      raise TypeError(f"`candidate` is the linen Module class {candidate.__name__}; "
                      f"pass an instance, e.g. {candidate.__name__}().")
    if hk is not None and issubclass(candidate, hk.Module):
      raise TypeError(f"`candidate` is the Haiku Module class {candidate.__name__}; "
                      f"pass a function, e.g. `lambda x: {candidate.__name__}()(x)`.")
    raise TypeError(f"`candidate` must be {_HINT}; got the class {candidate.__name__}.")
  if callable(candidate):
    try:
      return "nnx" if "rngs" in inspect.signature(candidate).parameters else "haiku"
    except (TypeError, ValueError):  # no signature (a builtin): a Haiku function
      return "haiku"
  raise TypeError(f"`candidate` must be {_HINT}; got {type(candidate).__name__}.")


def adapt(candidate: Any, kind: str | None = None) -> Any:
  """The adapter of ``candidate`` (``kind`` overrides the detection)."""
  if kind is not None and kind not in KINDS:
    raise ValueError(f"`kind` must be None or one of {KINDS}, got {kind!r}.")
  kind = kind or detect(candidate)
  if kind == "haiku":
    hk = require("haiku", "haiku")
    if isinstance(candidate, (hk.Transformed, hk.TransformedWithState)):
      return HaikuAdapter(candidate, isinstance(candidate, hk.TransformedWithState))
  if kind == "linen":
    if not isinstance(candidate, require("flax.linen", "flax").Module):
      raise TypeError(f"`candidate` of kind 'linen' must be a flax.linen Module instance; "
                      f"got {type(candidate).__name__}.")
    return LinenAdapter(candidate)
  if not callable(candidate):
    raise TypeError(f"`candidate` must be {_HINT}; got {type(candidate).__name__}.")
  if kind == "nnx":
    return NnxAdapter(candidate)
  return HaikuAdapter(hk.without_apply_rng(hk.transform(candidate)), False)
