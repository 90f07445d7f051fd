"""Output-axis conventions of the kernel: ``trace_axes`` and ``diagonal_axes``.

The conventions are those of neural-tangents' ``empirical_ntk_fn``: for model
outputs of shapes ``[N1, A, C]`` and ``[N2, A, C]`` the kernel with no traced or
diagonal axes has shape ``[N1, N2, A, A, C, C]`` (axes paired, in order);
traced axes are contracted and *averaged* (the kernel is divided by the product
of their sizes); diagonal axes keep only ``i1 == i2`` and appear once.

Every contraction in ntklayers is an ``einsum`` whose operands carry one letter
per output axis. :class:`OutputSpec` hands out those letters: the two sides share
a letter on traced and diagonal axes, and the result lists the surviving ones.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import jax.numpy as jnp

# Upper-case letters are reserved for output axes; rules use lower case.
_LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"


def normalize_axes(axes: int | Sequence[int] | slice, ndim: int,
                   name: str = "axes") -> tuple[int, ...]:
  """Absolute, sorted, distinct axes of an array of rank ``ndim`` (the one axis
  normalizer of ntklayers: kernel options and layer descriptions use it).

  Args:
    axes: an int, a sequence of ints (negative ones count from the end) or a slice.
    ndim: the rank the axes refer to.
    name: the argument's name in error messages.
  """
  if isinstance(axes, slice):
    return tuple(range(ndim)[axes])
  if isinstance(axes, int):
    axes = (axes,)
  try:
    axes = tuple(int(a) for a in axes)
  except TypeError as e:
    raise TypeError(f"`{name}` must be an int or a sequence of ints, got {axes!r}.") from e
  out = []
  for a in axes:
    if not -ndim <= a < ndim:
      raise ValueError(
          f"`{name}`={axes} is out of range for rank {ndim} (for kernel options: "
          f"model outputs, whose axis 0 is the batch axis).")
    out.append(a % ndim)
  if len(set(out)) != len(out):
    raise ValueError(f"`{name}`={axes} repeats an axis.")
  return tuple(sorted(out))


@dataclasses.dataclass(frozen=True)
class OutputSpec:
  """Static description of how output axes appear in the kernel.

  Attributes:
    shape1: output shape for the first batch, ``[N1, *rest]``.
    shape2: output shape for the second batch, ``[N2, *rest]``.
    trace_axes: normalized traced axes.
    diagonal_axes: normalized diagonal axes.
    precision: matrix-product precision of the contractions (``lax.Precision`` name).
  """

  shape1: tuple[int, ...]
  shape2: tuple[int, ...]
  trace_axes: tuple[int, ...]
  diagonal_axes: tuple[int, ...]
  precision: str = "highest"

  @classmethod
  def create(cls, shape1: Sequence[int], shape2: Sequence[int],
             trace_axes: int | Sequence[int] = (),
             diagonal_axes: int | Sequence[int] = (),
             precision: str = "highest") -> "OutputSpec":
    shape1, shape2 = tuple(shape1), tuple(shape2)
    ndim = len(shape1)
    if len(shape2) != ndim or shape1[1:] != shape2[1:]:
      raise ValueError(
          f"Model outputs for `x1` and `x2` must agree except in the batch "
          f"axis; got {shape1} and {shape2}.")
    if ndim + len(shape2) > len(_LETTERS):
      raise ValueError(f"Model outputs of rank {ndim} are not supported (max 13).")
    trace = normalize_axes(trace_axes, ndim, "trace_axes")
    diag = normalize_axes(diagonal_axes, ndim, "diagonal_axes")
    if set(trace) & set(diag):
      raise ValueError(
          f"An axis cannot be both traced and diagonal: trace_axes={trace_axes}, "
          f"diagonal_axes={diagonal_axes}.")
    if 0 in trace + diag and shape1[0] != shape2[0]:
      raise ValueError(
          f"Tracing or taking the diagonal over the batch axis needs equal batch "
          f"sizes, got N1={shape1[0]} (`x1`) and N2={shape2[0]} (`x2`).")
    return cls(shape1, shape2, trace, diag, precision)

  @property
  def ndim(self) -> int:
    return len(self.shape1)

  def letters(self) -> tuple[str, str, str]:
    """Returns ``(side1, side2, result)`` einsum letters, one per output axis.

    ``result`` is the *working* layout used while blocks are accumulated: all
    surviving side-1 axes, then the side-2 axes that are not diagonal (so that
    ``g1 . g2`` is a plain matrix product with no transpose).
    :meth:`finalize` permutes it to neural-tangents' interleaved layout.
    """
    s1, s2, r1, r2 = [], [], [], []
    pool = iter(_LETTERS)
    for axis in range(self.ndim):
      a = next(pool)
      if axis in self.trace_axes:
        s1.append(a)
        s2.append(a)
      elif axis in self.diagonal_axes:
        s1.append(a)
        s2.append(a)
        r1.append(a)
      else:
        b = next(pool)
        s1.append(a)
        s2.append(b)
        r1.append(a)
        r2.append(b)
    return "".join(s1), "".join(s2), "".join(r1 + r2)

  def interleaved(self) -> str:
    """Result letters in the final layout ``(N1, N2, A1, A2, ...)``."""
    s1, s2, _ = self.letters()
    res = []
    for axis in range(self.ndim):
      if axis in self.trace_axes:
        continue
      res.append(s1[axis])
      if axis not in self.diagonal_axes:
        res.append(s2[axis])
    return "".join(res)

  @property
  def kernel_shape(self) -> tuple[int, ...]:
    shape = []
    for axis, (a1, a2) in enumerate(zip(self.shape1, self.shape2)):
      if axis in self.trace_axes:
        continue
      shape.extend([a1] if axis in self.diagonal_axes else [a1, a2])
    return tuple(shape)

  @property
  def trace_size(self) -> int:
    return math.prod(self.shape1[a] for a in self.trace_axes)

  @property
  def output_pairs(self) -> int:
    """Number of (o1, o2) output pairs per (n1, n2) pair computed by a rule."""
    pairs = 1
    for axis in range(1, self.ndim):
      size = self.shape1[axis]
      pairs *= size if axis in self.trace_axes + self.diagonal_axes else size * size
    return pairs

  def finalize(self, kernel: jnp.ndarray) -> jnp.ndarray:
    """Working layout -> final layout, divided by the traced size (averaged)."""
    _, _, working = self.letters()
    final = self.interleaved()
    if working != final:
      kernel = jnp.transpose(kernel, [working.index(c) for c in final])
    size = self.trace_size
    return kernel if size == 1 else kernel / size


def contract_full(spec: OutputSpec, full: jnp.ndarray) -> jnp.ndarray:
  """Reduces a full kernel ``[*shape1, *shape2]`` to the working layout."""
  s1, s2, res = spec.letters()
  return jnp.einsum(f"{s1}{s2}->{res}", full)
