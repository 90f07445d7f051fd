"""Input validation: clear errors that name the argument and show the shapes."""

from __future__ import annotations

import sys
from typing import Any

import jax
import numpy as np

from ntklayers._core import _jax_compat


def _shapes(tree: Any) -> Any:
  return jax.tree.map(lambda a: tuple(np.shape(a)), tree)


def _dtype(a: Any) -> Any:
  return a.dtype if hasattr(a, "dtype") else np.result_type(a)


# The entry point of each framework whose modules hold their own parameters (a
# module passed where ``f(params, x)`` or its ``params`` is expected).
_ENTRY_POINTS = {
    "equinox": "ntklayers.equinox.ntk_fn()(model, x1, x2), which differentiates the "
               "model's inexact-array leaves and holds the rest fixed",
    "linen": "ntklayers.flax.ntk_fn(module)(variables, x1, x2), which differentiates "
             "variables['params']",
    "nnx": "ntklayers.flax.nnx.ntk_fn()(model, x1, x2), which differentiates the "
           "model's nnx.Param state",
}


def _framework_of(obj: Any) -> str | None:
  """``"equinox"``, ``"linen"`` or ``"nnx"`` if ``obj`` is a module of that
  framework, else ``None``. Frameworks are looked up in ``sys.modules`` (never
  imported here: a module object exists only if its framework was imported)."""
  for name, module, attr in (("equinox", "equinox", "Module"),
                             ("linen", "flax.linen", "Module"),
                             ("nnx", "flax.nnx", "Module")):
    cls = getattr(sys.modules.get(module), attr, None)
    if isinstance(cls, type) and isinstance(obj, cls):
      return name
  return None


def _is_parameter(leaf: Any) -> bool:
  """A floating array (what ``eqx.is_inexact_array`` keeps; Python numbers are not).
  Inside ``jax.jit`` a Python float has become a weakly typed array, which cannot
  be told from a weakly typed scalar parameter: both count as parameters there."""
  return hasattr(leaf, "dtype") and _jax_compat.is_inexact(leaf.dtype)


_ARTICLES = {"equinox": "an Equinox", "linen": "a Flax linen", "nnx": "a Flax NNX"}


def _module_error(what: str, framework: str, obj: Any, detail: str = "") -> TypeError:
  article = _ARTICLES[framework]
  return TypeError(
      f"{what} is {article} module ({type(obj).__module__}.{type(obj).__qualname__})"
      f"{detail}. ntklayers.ntk_fn(f) takes a function f(params, x) and a pytree of "
      f"parameter arrays; for the NTK of {article} model use "
      f"{_ENTRY_POINTS[framework]}.")


def check_not_module(params: Any, name: str = "params") -> None:
  """``params`` holds no framework module that is not a pytree of parameters.

  A linen or NNX module anywhere in ``params``, or an Equinox module with leaves
  that are not floating arrays (functions, Python numbers, integer arrays), gets an
  error naming the entry point for that framework. An Equinox module of floating
  arrays only (the first half of ``eqx.partition(model, eqx.is_inexact_array)``)
  is a pytree of parameters like any other.
  """
  found = jax.tree_util.tree_flatten_with_path(
      params, is_leaf=lambda a: _framework_of(a) is not None)[0]
  for path, node in found:
    framework = _framework_of(node)
    if framework is None:
      continue
    where = f"`{name}{jax.tree_util.keystr(path)}`" if path else f"`{name}`"
    if framework != "equinox":
      raise _module_error(where, framework, node)
    for leaf_path, leaf in jax.tree_util.tree_flatten_with_path(node)[0]:
      if not _is_parameter(leaf):
        kind = f"{leaf.dtype} value" if hasattr(leaf, "dtype") else type(leaf).__name__
        raise _module_error(
            where, framework, node,
            f" with leaves that are not parameters (a {kind} at "
            f"{jax.tree_util.keystr(leaf_path) or 'its root'})")


def check_params(params: Any) -> None:
  check_not_module(params)
  leaves = jax.tree.leaves(params)
  if not leaves:
    raise ValueError("`params` has no leaves: there is nothing to differentiate.")
  for leaf in leaves:
    if not hasattr(leaf, "dtype"):
      raise TypeError(
          f"`params` leaves must be arrays, got {type(leaf).__name__} in "
          f"{_shapes(params)}.")


def check_batch(x: Any, name: str) -> int:
  leaves = jax.tree.leaves(x)
  if not leaves:
    raise ValueError(f"`{name}` has no array leaves.")
  shapes = [np.shape(a) for a in leaves]
  if any(len(s) == 0 for s in shapes):
    raise ValueError(
        f"Every leaf of `{name}` needs a leading batch axis; got shapes {_shapes(x)}.")
  sizes = {s[0] for s in shapes}
  if len(sizes) != 1:
    raise ValueError(
        f"Leaves of `{name}` disagree in batch size: {_shapes(x)}.")
  n = sizes.pop()
  if n == 0:
    raise ValueError(f"`{name}` is an empty batch (shape {_shapes(x)}).")
  return n


def batch_size(x: Any) -> int:
  """The leading axis of the first leaf of ``x`` (checked by :func:`check_batch`)."""
  return jax.tree.leaves(x)[0].shape[0]


def check_output(out: Any, n: int, x: Any) -> None:
  """The output of ``f`` must be one floating array leading with the batch axis."""
  if not isinstance(out, jax.ShapeDtypeStruct):
    raise TypeError(
        f"`f` must return a single array; got outputs with structure "
        f"{jax.tree.structure(out)}.")
  if out.ndim == 0 or out.shape[0] != n:
    hint = (" Every leaf of `x` needs a leading batch axis (e.g. `x[None]` for one "
            "example)" if any(np.ndim(a) < 2 for a in jax.tree.leaves(x)) else "")
    raise ValueError(
        f"The output of `f` must lead with the batch axis of `x` (size {n}); got "
        f"output shape {out.shape} for x shapes {_shapes(x)}.{hint}")
  if not _jax_compat.is_inexact(out.dtype):
    raise TypeError(f"The output of `f` must be floating, got dtype {out.dtype}.")


def check_pair(x1: Any, x2: Any) -> None:
  """``x1`` and ``x2`` must have the same structure, trailing shapes and dtypes."""
  check_batch(x1, "x1")
  if x2 is None:
    return
  check_batch(x2, "x2")
  t1, t2 = jax.tree.structure(x1), jax.tree.structure(x2)
  if t1 != t2:  # type: ignore[operator]  # PyTreeDef has no stubs
    raise ValueError(f"`x1` and `x2` have different structures: {t1} vs {t2}.")
  for a, b in zip(jax.tree.leaves(x1), jax.tree.leaves(x2)):
    if np.shape(a)[1:] != np.shape(b)[1:] or _dtype(a) != _dtype(b):
      raise ValueError(
          f"`x1` and `x2` must agree in every axis but the batch axis and in "
          f"dtype; got {_shapes(x1)} ({_dtype(a)}) vs {_shapes(x2)} "
          f"({_dtype(b)}).")


def check_f(f: Any) -> Any:
  """``f`` must be callable and not a framework model holding its own parameters; a
  jitted ``f`` is unwrapped (the kernel is jitted whole, and layers inside an inner
  ``jit`` could not be captured)."""
  framework = _framework_of(f)
  if framework in ("linen", "nnx") or framework == "equinox" and any(
      _is_parameter(a) for a in jax.tree.leaves(f)):
    hint = (" (if it really is a function of (params, x), pass `lambda p, x: f(p, x)`)"
            if framework == "equinox" else "")
    raise _module_error("`f`", framework, f, hint)
  if not callable(f):
    hint = (" (a Haiku hk.transform result: pass its `.apply`, with "
            "hk.without_apply_rng for a model without randomness)"
            if hasattr(f, "apply") and hasattr(f, "init") else "")
    raise TypeError(
        f"`f` must be callable as f(params, x), got {type(f).__name__}{hint}.")
  return _jax_compat.unwrap_jit(f)


_DISCOVERY_HINT = (
    "ntklayers: calling f(params, x) failed. Check that `params` matches `f` and "
    "that `x` has the shape `f` expects (with a leading batch axis). params shapes: "
    "{params}; x shapes: {x}. A Haiku model built with hk.transform that needs an "
    "rng (dropout) takes it explicitly: pass `lambda p, x: net.apply(p, key, x)` "
    "with a fixed key (the NTK of the model for that key), or "
    "hk.without_apply_rng(hk.transform(fn)).apply for a model without randomness.")


def note_failure(e: BaseException, params: Any, x: Any) -> None:
  """Adds a note naming the inputs to an exception raised inside ``f`` (which is then
  re-raised unchanged, so JAX's own error types and messages are kept)."""
  if hasattr(e, "add_note"):  # Python >= 3.11
    e.add_note(_DISCOVERY_HINT.format(params=_shapes(params), x=_shapes(x)))
