"""Validate once: kernel options as one frozen :class:`Options` record, and the
split of the model's extra keyword arguments into traced arrays and static rest.

Every public entry point (``ntk_fn``, ``ntk``, ``capture``/``contract``, the linen
and NNX ``ntk_fn``) turns its keyword options into an :class:`Options` with
:meth:`Options.create`, the only place where options are checked; everything
downstream reads the record and never re-validates.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
from jax import lax

IMPLEMENTATIONS = ("auto", "structured", "ntk_vp", "jacobian")
STRUCTURES = ("auto", "annotated")
PRECISIONS = ("highest", "high", "default")


class Static:
  """A hashable stand-in for an option value (a pytree of bools, a callable, None)."""

  def __init__(self, value: Any):
    self.value = value
    leaves, treedef = jax.tree.flatten(value)
    self._key: tuple
    try:
      self._key = (treedef, tuple(leaves))
      hash(self._key)
    except TypeError:  # unhashable leaves: compare by identity
      self._key = (id(value),)

  def __hash__(self) -> int:
    return hash(self._key)

  def __eq__(self, other: Any) -> bool:
    return isinstance(other, Static) and self._key == other._key


def _axes(value: Any, name: str) -> tuple[int, ...]:
  if isinstance(value, int) and not isinstance(value, bool):
    return (int(value),)
  if isinstance(value, Sequence) and not isinstance(value, str) and all(
      isinstance(a, int) and not isinstance(a, bool) for a in value):
    return tuple(int(a) for a in value)
  if isinstance(value, np.integer):  # NumPy integers
    return (int(value),)
  if isinstance(value, Sequence) and all(isinstance(a, np.integer) for a in value):
    return tuple(int(a) for a in value)
  raise TypeError(f"`{name}` must be an int or a sequence of ints, got {value!r}.")


def check_mask_values(mask: Any) -> None:
  """A ``trainable`` mask tree holds Python (or NumPy) bools only."""
  bad = [(jax.tree_util.keystr(path), m) for path, m in
         jax.tree_util.tree_flatten_with_path(mask)[0]
         if not isinstance(m, (bool, np.bool_))]
  if bad:
    path, value = bad[0]
    raise TypeError(
        f"`trainable` values must be Python bools; got {value!r} "
        f"({type(value).__name__}) at `trainable{path}`.")


def _precision(value: Any) -> str:
  if isinstance(value, lax.Precision):
    value = {lax.Precision.HIGHEST: "highest", lax.Precision.HIGH: "high",
             lax.Precision.DEFAULT: "default"}[value]
  if value not in PRECISIONS:
    raise ValueError(f"`precision` must be one of {PRECISIONS} or a jax.lax.Precision, "
                     f"got {value!r}.")
  return value


@dataclasses.dataclass(frozen=True)
class Options:
  """Validated, hashable kernel options (a static argument of the jitted kernel).

  Attributes:
    trace_axes: output axes contracted and averaged (as given; normalized against
      the output rank by ``OutputSpec``).
    diagonal_axes: output axes on which only the diagonal is kept.
    implementation: ``"auto"``, ``"structured"``, ``"ntk_vp"`` or ``"jacobian"``.
    layerwise: return ``{module name: kernel}``.
    trainable: the optax-style mask, wrapped hashable (``.value``).
    independent_samples: ``None`` (prove or check), ``True`` or ``False``.
    precision: matrix-product precision of the contractions: ``"highest"``
      (default: float32 products in full float32 on accelerators), ``"high"`` or
      ``"default"`` (faster on TPUs and GPUs with TF32, less exact).
    structure: where structured layers come from: ``"auto"`` (drop-ins, and the
      dense, convolution, bias, scale and embedding equations recognized in the
      traced program) or ``"annotated"`` (drop-ins only, to compare).
  """

  trace_axes: tuple[int, ...] = ()
  diagonal_axes: tuple[int, ...] = ()
  implementation: str = "auto"
  layerwise: bool = False
  trainable: Static = Static(None)
  independent_samples: bool | None = None
  precision: str = "highest"
  structure: str = "auto"

  @classmethod
  def create(cls, *, trace_axes: int | Sequence[int] = (),
             diagonal_axes: int | Sequence[int] = (), implementation: str = "auto",
             layerwise: bool = False, trainable: Any = None,
             independent_samples: bool | None = None,
             precision: str | lax.Precision = "highest",
             structure: str = "auto") -> "Options":
    """Checks every option (clear errors naming the argument) and freezes them."""
    if implementation not in IMPLEMENTATIONS:
      raise ValueError(
          f"`implementation` must be one of {IMPLEMENTATIONS}, got {implementation!r}.")
    if structure not in STRUCTURES:
      raise ValueError(f"`structure` must be one of {STRUCTURES}, got {structure!r}.")
    if not isinstance(layerwise, bool):
      raise TypeError(f"`layerwise` must be a bool, got {layerwise!r}.")
    if independent_samples not in (None, True, False) or isinstance(
        independent_samples, int) and not isinstance(independent_samples, bool):
      raise TypeError(f"`independent_samples` must be None or a bool, got "
                      f"{independent_samples!r}.")
    if trainable is not None and not callable(trainable):
      check_mask_values(trainable)
    trace = _axes(trace_axes, "trace_axes")
    diag = _axes(diagonal_axes, "diagonal_axes")
    both = sorted(set(trace) & set(diag))
    if both:
      raise ValueError(
          f"An axis cannot be both traced and diagonal: trace_axes={trace}, "
          f"diagonal_axes={diag} share {both}.")
    return cls(trace, diag, implementation, layerwise, Static(trainable),
               independent_samples, _precision(precision), structure)

  @property
  def diagonal_batch(self) -> bool:
    """Whether only per-example kernels are requested (``0`` in ``diagonal_axes``)."""
    return 0 in self.diagonal_axes

  @property
  def mask(self) -> Any:
    """The ``trainable`` mask as given."""
    return self.trainable.value


class StaticKwargs:
  """The hashable, non-array part of the model's extra keyword arguments.

  ``treedef`` is the pytree structure of the kwargs; ``values`` holds, per leaf,
  ``None`` where the leaf is an array (traced) and the leaf itself otherwise.
  """

  __slots__ = ("treedef", "is_array", "values", "_hash")

  def __init__(self, treedef, is_array: tuple[bool, ...], values: tuple[Any, ...]):
    self.treedef, self.is_array, self.values = treedef, is_array, values
    self._hash = hash((treedef, is_array, values))

  def __hash__(self) -> int:
    return self._hash

  def __eq__(self, other: Any) -> bool:
    return (isinstance(other, StaticKwargs) and self.treedef == other.treedef
            and self.is_array == other.is_array and self.values == other.values)

  def merge(self, arrays: Sequence[Any]) -> dict[str, Any]:
    """The kwargs, with the (traced) ``arrays`` put back in their places."""
    it = iter(arrays)
    leaves = [next(it) if a else v for a, v in zip(self.is_array, self.values)]
    return jax.tree.unflatten(self.treedef, leaves)


def _is_array(value: Any) -> bool:
  return isinstance(value, jax.Array) or hasattr(value, "__array__")


def split_kwargs(kwargs: Mapping[str, Any]) -> tuple[list[Any], StaticKwargs]:
  """Splits the model's keyword arguments into traced array leaves and a static rest.

  Array leaves anywhere in the kwargs (nested dicts, lists, tuples; PRNG keys)
  are traced, so new values of the same shapes do not recompile; the other
  leaves (``is_training=False``, strings, ``None``...) are static and must be
  hashable.
  """
  with_path, treedef = jax.tree_util.tree_flatten_with_path(dict(kwargs))
  is_array = tuple(_is_array(leaf) for _, leaf in with_path)
  arrays = [leaf for (_, leaf), a in zip(with_path, is_array) if a]
  values = []
  for (path, leaf), a in zip(with_path, is_array):
    if not a:
      try:
        hash(leaf)
      except TypeError as e:
        name = path[0].key if path and hasattr(path[0], "key") else "?"
        where = jax.tree_util.keystr(path[1:])
        raise TypeError(
            f"model kwarg {name!r}{f' (at {where})' if where else ''} holds a "
            f"{type(leaf).__name__}, which is neither an array (traced) nor hashable "
            f"(static, part of the compilation cache key). Pass arrays, or hashable "
            f"values such as bools, numbers, strings and tuples.") from e
    values.append(None if a else leaf)
  return arrays, StaticKwargs(treedef, is_array, tuple(values))
