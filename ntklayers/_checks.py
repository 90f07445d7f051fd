"""Input validation: clear errors that name the argument and show the shapes."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import numpy as np

from ntklayers import _jax_compat

IMPLEMENTATIONS = ("auto", "structured", "ntk_vp", "jacobian")


def _shapes(tree: Any) -> Any:
  return jax.tree.map(lambda a: tuple(np.shape(a)), tree)


def _dtype(a: Any) -> Any:
  return a.dtype if hasattr(a, "dtype") else np.result_type(a)


def check_implementation(implementation: Any) -> None:
  if implementation not in IMPLEMENTATIONS:
    raise ValueError(
        f"`implementation` must be one of {IMPLEMENTATIONS}, got {implementation!r}.")


def check_axes_pair(trace_axes: Any, diagonal_axes: Any) -> tuple[tuple[int, ...],
                                                                 tuple[int, ...]]:
  """Both axis options as tuples; an axis named by both is refused at once (negative
  and positive names of one axis are caught when the output rank is known)."""
  trace = check_axes(trace_axes, "trace_axes")
  diag = check_axes(diagonal_axes, "diagonal_axes")
  both = sorted(set(trace) & set(diag))
  if both:
    raise ValueError(
        f"An axis cannot be both traced and diagonal: trace_axes={trace}, "
        f"diagonal_axes={diag} share {both}.")
  return trace, diag


def check_axes(value: Any, name: str) -> tuple[int, ...]:
  if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
    return (int(value),)
  if isinstance(value, Sequence) and not isinstance(value, str) and all(
      isinstance(a, (int, np.integer)) and not isinstance(a, bool) for a in value):
    return tuple(int(a) for a in value)
  raise TypeError(f"`{name}` must be an int or a sequence of ints, got {value!r}.")


def check_params(params: Any) -> None:
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


def check_pair(x1: Any, x2: Any) -> None:
  """``x1`` and ``x2`` must have the same structure, trailing shapes and dtypes."""
  check_batch(x1, "x1")
  if x2 is None:
    return
  check_batch(x2, "x2")
  t1, t2 = jax.tree.structure(x1), jax.tree.structure(x2)
  if t1 != t2:
    raise ValueError(f"`x1` and `x2` have different structures: {t1} vs {t2}.")
  for a, b in zip(jax.tree.leaves(x1), jax.tree.leaves(x2)):
    if np.shape(a)[1:] != np.shape(b)[1:] or _dtype(a) != _dtype(b):
      raise ValueError(
          f"`x1` and `x2` must agree in every axis but the batch axis and in "
          f"dtype; got {_shapes(x1)} ({_dtype(a)}) vs {_shapes(x2)} "
          f"({_dtype(b)}).")


def check_f(f: Any) -> Any:
  """``f`` must be callable; a jitted ``f`` is unwrapped (the kernel is jitted whole,
  and layers inside an inner ``jit`` could not be captured)."""
  if not callable(f):
    raise TypeError(f"`f` must be callable as f(params, x), got {type(f).__name__}.")
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
