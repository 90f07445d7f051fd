"""Kernel and target layouts of ``ntklayers.predict`` (neural-tangents' conventions).

Targets ``y_train`` have a batch axis first and any number of output axes. The
``trace_axes`` of ``y_train`` are the output axes that the kernel *lacks*: the
kernel is ``Θ ⊗ I`` along them (e.g. ``[N, N]`` for ``y [N, O]`` with
``trace_axes=(-1,)``). The remaining ("kept") axes of ``y`` appear in the kernel
twice, interleaved: ``[N1, N2, A, A, ...]`` for kept axes ``(N, A, ...)``, as
``ntklayers.ntk_fn`` and neural-tangents return them.

Every computation works on two matrices:

* targets ``[M, C]``: kept axes flattened to rows (``M`` = product of their sizes,
  row ``n·A + a``), traced axes flattened to columns (``C``);
* kernels ``[M1, M2]``: the interleaved kernel unzipped and flattened the same way
  (``ntklayers.metrics.flatten``).

Both NumPy and ``jax.numpy`` arrays pass through unchanged in kind.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

Axes = int | Sequence[int]


def xp_of(*arrays: Any) -> Any:
  """``numpy`` if every array is a NumPy array (or scalar), else ``jax.numpy``."""
  if any(isinstance(a, jax.Array) for a in arrays):
    return jnp
  return np


def shape_str(shape: Sequence[int]) -> str:
  """``[3, 4]`` for ``(3, 4)``."""
  return "[" + ", ".join(str(int(s)) for s in shape) + "]"


class Layout:
  """How ``y_train`` [N, ...] and its kernels map onto ``[M, C]`` / ``[M, M]``.

  Attributes:
    y_shape: shape of ``y_train``.
    trace: traced axes of ``y`` (non-negative, sorted; never the batch axis 0).
    kept: the other axes of ``y`` (0 first).
    kept_shape: sizes of ``kept`` (``(N, ...)``).
    trace_shape: sizes of ``trace``.
    m: product of ``kept_shape`` (rows of the flattened kernel).
    c: product of ``trace_shape`` (columns of the flattened targets).
  """

  def __init__(self, y_shape: Sequence[int], trace_axes: Axes, name: str = "y_train"):
    self.y_shape = tuple(int(s) for s in y_shape)
    ndim = len(self.y_shape)
    if ndim < 1:
      raise ValueError(f"`{name}` must have a batch axis (shape [N, ...]), got a scalar.")
    axes = [trace_axes] if isinstance(trace_axes, (int, np.integer)) else list(trace_axes)
    canon = []
    for a in axes:
      if isinstance(a, bool) or not isinstance(a, (int, np.integer)) or not -ndim <= a < ndim:
        raise ValueError(f"`trace_axes` {tuple(axes)} must be axes of `{name}` of shape "
                         f"{shape_str(self.y_shape)}; {a!r} is not.")
      canon.append(int(a) % ndim)
    if 0 in canon:
      raise ValueError(f"`trace_axes` {tuple(axes)} contains the batch axis 0 of `{name}` "
                       f"{shape_str(self.y_shape)}: the kernel must keep the batch axis.")
    if len(set(canon)) != len(canon):
      raise ValueError(f"`trace_axes` {tuple(axes)} repeats an axis.")
    self.trace = tuple(sorted(canon))
    self.kept = tuple(a for a in range(ndim) if a not in self.trace)
    self.kept_shape = tuple(self.y_shape[a] for a in self.kept)
    self.trace_shape = tuple(self.y_shape[a] for a in self.trace)
    self.m = math.prod(self.kept_shape)
    self.c = math.prod(self.trace_shape)
    self.size = math.prod(self.y_shape)

  def __eq__(self, other: object) -> bool:
    return isinstance(other, Layout) and (self.y_shape, self.trace) == (other.y_shape,
                                                                         other.trace)

  def __hash__(self) -> int:
    return hash((Layout, self.y_shape, self.trace))

  def kernel_shape(self, rows: Sequence[int] | None = None) -> tuple[int, ...]:
    """Interleaved kernel shape for test rows ``rows`` (default: the train rows)."""
    rows = self.kept_shape if rows is None else tuple(rows)
    return tuple(s for pair in zip(rows, self.kept_shape) for s in pair)

  def hint(self) -> str:
    return (f"for `y_train` {shape_str(self.y_shape)} with `trace_axes`={self.trace} "
            f"the train-train kernel is {shape_str(self.kernel_shape())}")

  def check_kernel(self, k: Any, name: str, square: bool) -> tuple[int, ...]:
    """Validates an interleaved kernel; returns its row (test) kept shape."""
    shape = tuple(int(s) for s in np.shape(k))
    nd = 2 * len(self.kept)
    ok = len(shape) == nd and shape[1::2] == self.kept_shape
    if ok and square:
      ok = shape[0::2] == self.kept_shape
    elif ok:
      ok = shape[2::2] == self.kept_shape[1:]
    if not ok:
      rows: tuple[Any, ...] = self.kept_shape if square else ("N_test",) + self.kept_shape[1:]
      want = tuple(s for pair in zip(rows, self.kept_shape) for s in pair)
      want_s = "[" + ", ".join(str(s) for s in want) + "]"
      raise ValueError(
          f"`{name}` has shape {shape_str(shape)}, expected {want_s}: {self.hint()} "
          "(a kernel [N, N, O, O] of outputs [N, O] needs `trace_axes=()`; a kernel "
          "[N, N] of outputs [N, O] needs `trace_axes=(-1,)`).")
    return shape[0::2]

  def kernel_2d(self, k: Any, name: str, square: bool = False) -> Any:
    """``[M_rows, M]`` from the interleaved kernel (after validating it)."""
    rows = self.check_kernel(k, name, square)
    xp = xp_of(k)
    k = xp.asarray(k)
    nd = k.ndim
    k = xp.transpose(k, tuple(range(0, nd, 2)) + tuple(range(1, nd, 2)))
    return k.reshape(math.prod(rows), self.m)

  def targets_2d(self, y: Any) -> Any:
    """``[M', C]`` from an array ``[N', ...]`` of ``y``'s layout."""
    xp = xp_of(y)
    y = xp.moveaxis(xp.asarray(y), self.trace, tuple(range(-len(self.trace), 0)))
    return y.reshape(-1, self.c)

  def outputs(self, y2: Any, rows: Sequence[int], lead: int = 0) -> Any:
    """Inverse of :meth:`targets_2d`: ``[*L, M', C]`` to ``[*L, *y-layout]``.

    Args:
      y2: array ``[*L, M', C]`` with ``lead = len(L)`` leading (time) axes.
      rows: kept shape of the rows (``(N', ...)``).
      lead: number of leading axes.
    """
    xp = xp_of(y2)
    lead_shape = tuple(y2.shape[:lead])
    y = y2.reshape(lead_shape + tuple(rows) + self.trace_shape)
    n_t = len(self.trace)
    src = tuple(range(y.ndim - n_t, y.ndim))
    dst = tuple(lead + a for a in self.trace)
    return xp.moveaxis(y, src, dst)

  def out_shape(self, rows: Sequence[int]) -> tuple[int, ...]:
    """Full shape of outputs whose kept axes have sizes ``rows``."""
    shape = [0] * len(self.y_shape)
    for a, s in zip(self.kept, rows):
      shape[a] = int(s)
    for a, s in zip(self.trace, self.trace_shape):
      shape[a] = s
    return tuple(shape)

  def covariance(self, cov2: Any, rows: Sequence[int], lead: int = 0) -> Any:
    """``[*L, M', M']`` to the interleaved ``[*L, N', N', A, A, ...]`` layout."""
    xp = xp_of(cov2)
    lead_shape = tuple(cov2.shape[:lead])
    rows = tuple(rows)
    k = cov2.reshape(lead_shape + rows + rows)
    h = len(rows)
    perm = tuple(range(lead)) + tuple(lead + i + j * h for i in range(h) for j in range(2))
    return xp.transpose(k, perm)


def get_field(k: Any, g: str, name: str) -> Any:
  """``k`` itself for an array, else its ``g`` field (namedtuple attribute or dict key)."""
  if isinstance(k, (np.ndarray, jax.Array)):
    return k
  if isinstance(k, dict):
    v = k.get(g)
  else:
    v = getattr(k, g, None)
  if v is None:
    raise ValueError(f"`{name}` has no {g!r} kernel: pass an array, or a namedtuple / dict "
                     f"with a {g!r} field.")
  return v


def has_field(k: Any, g: str) -> bool:
  """Whether ``k`` is a namedtuple / dict holding a ``g`` kernel (arrays: no)."""
  if isinstance(k, (np.ndarray, jax.Array)) or k is None:
    return False
  v = k.get(g) if isinstance(k, dict) else getattr(k, g, None)
  return v is not None


def first_field(k: Any, name: str) -> Any:
  """The array itself, or the first of its ``nngp`` / ``ntk`` fields that is set."""
  if isinstance(k, (np.ndarray, jax.Array)):
    return k
  for g in ("nngp", "ntk"):
    if has_field(k, g):
      return get_field(k, g, name)
  raise ValueError(f"`{name}` must be an array or a namedtuple / dict with `nngp` and/or "
                   f"`ntk` kernels, got {type(k).__name__}.")
