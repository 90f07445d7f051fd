"""Kernels as linear operators: matrix-free products, in-memory or on-disk matrices.

A :class:`KernelOperator` multiplies the flattened kernel ``[M_rows, M_cols]``
(``ntklayers.metrics.flatten``'s layout: row ``n·O + o``) by host matrices
``[M_cols, k]`` in float64 NumPy. Three sources:

* a matrix-free ``v ↦ K v`` (``ntklayers.metrics.ntk_matvec``);
* an array (NumPy, JAX, or a memory-mapped ``.npy``), multiplied in row blocks;
* a ``.npy`` file (e.g. ``ntklayers.ntk_blocked(..., out=path)``), read block by
  block with positioned reads into one reused buffer, so the process's resident
  memory stays at one block however large the file (a memory map's pages would
  count towards it).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ntklayers._large import kernel_file_progress, ntk_matvec
from ntklayers.predict._layout import shape_str

DEFAULT_BLOCK_BYTES = 64 << 20  # float64 bytes of one row block (its buffer is reused)


def _npy_header(path: str) -> tuple[tuple[int, ...], np.dtype, bool, int]:
  """``(shape, dtype, fortran_order, data offset)`` of a ``.npy`` file."""
  with open(path, "rb") as fh:
    version = np.lib.format.read_magic(fh)
    if version == (1, 0):
      shape, fortran, dtype = np.lib.format.read_array_header_1_0(fh)
    elif version == (2, 0):
      shape, fortran, dtype = np.lib.format.read_array_header_2_0(fh)
    else:
      raise ValueError(f"{path}: unsupported .npy version {version}.")
    return tuple(shape), np.dtype(dtype), bool(fortran), fh.tell()


class KernelOperator:
  """A kernel ``[M_rows, M_cols]`` as products with ``[M_cols, k]`` matrices (float64).

  Build one with :meth:`from_matvec`, :meth:`from_array`, :meth:`from_npy` or
  :meth:`test_train`. ``op @ V`` (``V [M_cols]`` or ``[M_cols, k]``) returns
  float64 NumPy; ``op.matvecs`` counts the vector products done so far.

  Attributes:
    shape: ``(M_rows, M_cols)``.
    dtype: dtype of the kernel's entries (outputs are computed in float64).
    matvecs: number of vector products so far.
  """

  def __init__(self, matmat: Callable[[np.ndarray], np.ndarray], shape: tuple[int, int],
               dtype: Any, *, trace: float | None = None,
               diagonal: Callable[[], np.ndarray] | None = None,
               rmatmat: Callable[[np.ndarray], np.ndarray] | None = None,
               name: str = "kernel"):
    self._matmat, self._rmatmat = matmat, rmatmat
    self.shape = (int(shape[0]), int(shape[1]))
    self.dtype = np.dtype(dtype)
    self._trace, self._diagonal = trace, diagonal
    self.name = name
    self.matvecs = 0

  @property
  def dim(self) -> int:
    """Side of a square operator (``M``)."""
    return self.shape[1]

  def __repr__(self) -> str:
    return f"KernelOperator({self.name}, shape={shape_str(self.shape)}, dtype={self.dtype})"

  def _apply(self, fn: Callable[[np.ndarray], np.ndarray], v: Any, n_in: int,
             n_out: int) -> np.ndarray:
    v = np.asarray(v, np.float64)
    vec = v.ndim == 1
    v2 = v[:, None] if vec else v
    if v2.ndim != 2 or v2.shape[0] != n_in:
      raise ValueError(f"{self.name}: operand of shape {shape_str(v.shape)} does not fit "
                       f"the operator {shape_str(self.shape)}.")
    out = np.asarray(fn(v2), np.float64).reshape(n_out, v2.shape[1])
    self.matvecs += v2.shape[1]
    return out[:, 0] if vec else out

  def matmat(self, v: Any) -> np.ndarray:
    """``K @ v`` for ``v [M_cols]`` or ``[M_cols, k]`` (float64)."""
    return self._apply(self._matmat, v, self.shape[1], self.shape[0])

  def rmatmat(self, u: Any) -> np.ndarray:
    """``Kᵀ @ u`` for ``u [M_rows(, k)]`` (square operators: ``K @ u``)."""
    if self._rmatmat is None:
      if self.shape[0] != self.shape[1]:
        raise ValueError(f"{self.name}: no transposed product available.")
      return self.matmat(u)
    return self._apply(self._rmatmat, u, self.shape[0], self.shape[1])

  __matmul__ = matmat

  def trace(self) -> float:
    """Trace of a square kernel (known, computed from its diagonal, or an error)."""
    if self._trace is None:
      if self._diagonal is None:
        raise ValueError(
            f"{self.name}: the trace is unknown (a matrix-free operator): pass `trace=` "
            "(e.g. `ntklayers.ntk_trace(f, params, x)`) when building it, or use "
            "`diag_reg_absolute_scale=True`.")
      self._trace = float(np.sum(self._diagonal(), dtype=np.float64))
    return float(self._trace)

  @classmethod
  def from_matvec(cls, matvec: Callable[[Any], Any], dim: int, dtype: Any = None, *,
                  trace: float | None = None, jit: bool = True) -> KernelOperator:
    """Wraps a symmetric ``v [dim] -> K v [dim]`` (e.g. ``ntk_matvec``'s first output).

    Args:
      matvec: JAX (or NumPy) function of one vector ``[dim]``.
      dim: ``N·O``.
      dtype: dtype fed to ``matvec`` (``ntk_matvec``'s third output; default
        JAX's default float).
      trace: the kernel's trace if known (``ntklayers.ntk_trace``); needed for a
        relative ``diag_reg``.
      jit: compile ``matvec`` with ``jax.jit``.

    Returns:
      The operator; products loop over the columns of ``[dim, k]`` operands.

    Example:
      >>> import jax.numpy as jnp, numpy as np, ntklayers.predict as npr
      >>> k = jnp.array([[2., 1.], [1., 2.]])
      >>> op = npr.KernelOperator.from_matvec(lambda v: k @ v, 2, k.dtype)
      >>> op @ np.array([1., 1.])
      array([3., 3.])
    """
    dim = int(dim)
    dt = np.dtype(jnp.result_type(float) if dtype is None else dtype)
    fn = jax.jit(matvec) if jit else matvec

    def matmat(v: np.ndarray) -> np.ndarray:
      cols = [np.asarray(fn(jnp.asarray(v[:, j], dt)), np.float64) for j in range(v.shape[1])]
      return np.stack(cols, axis=1)

    return cls(matmat, (dim, dim), dt, trace=trace, name="matvec")

  @classmethod
  def from_array(cls, k: Any, *, symmetric: bool = False,
                 block_bytes: int = DEFAULT_BLOCK_BYTES, name: str = "kernel") -> KernelOperator:
    """An interleaved kernel ``[N1, N2(, O, O, ...)]`` multiplied in row blocks.

    A ``np.memmap`` of a whole ``.npy`` file (``ntk_blocked(..., out=path)``'s
    return value) is read from the file instead (see :meth:`from_npy`).

    Args:
      k: NumPy / JAX array or memory map with an even number of axes.
      symmetric: the kernel is symmetric (a train-train kernel): products read
        only its upper block triangle (half the data) and mirror it.
      block_bytes: float64 bytes of one row block (memory per product).
      name: used in error messages.

    Returns:
      The operator of the flattened ``[N1·O, N2·O]`` kernel.

    Example:
      >>> import numpy as np, ntklayers.predict as npr
      >>> k = np.eye(6).reshape(3, 2, 3, 2).transpose(0, 2, 1, 3)  # [3, 3, 2, 2]
      >>> op = npr.KernelOperator.from_array(k, symmetric=True)
      >>> op.shape, float(op.trace())
      ((6, 6), 6.0)
    """
    filename = getattr(k, "filename", None) if isinstance(k, np.memmap) else None
    if filename is not None:
      try:
        header = _npy_header(os.fspath(filename))
      except (OSError, ValueError):  # not a whole .npy file: read it through the array
        header = None
      if (header is not None and header[:2] == (k.shape, k.dtype) and not header[2]
          and k.flags.c_contiguous):
        # from_npy refuses an unfinished ntk_blocked file: that error must reach the caller.
        return cls.from_npy(filename, symmetric=symmetric, block_bytes=block_bytes, name=name)
    shape = tuple(int(s) for s in np.shape(k))
    return cls._blocked(lambda a, b, c: np.asarray(k[a:b, c:]), shape, np.dtype(k.dtype),
                        block_bytes, name, symmetric)

  @classmethod
  def from_npy(cls, path: str | os.PathLike, *, symmetric: bool = False,
               block_bytes: int = DEFAULT_BLOCK_BYTES, name: str | None = None
               ) -> KernelOperator:
    """A kernel stored as ``.npy`` (``[N1, N2(, O, O)]``), read block by block.

    Args:
      path: the file (C order), e.g. written by ``ntklayers.ntk_blocked(out=path)``.
      symmetric: a symmetric (train-train) kernel: read only the upper block
        triangle, half the file, per product.
      block_bytes: float64 bytes of one row block.
      name: used in error messages (default: the path).

    Raises:
      ValueError: ``path`` is an ``ntk_blocked`` file whose run has not finished.

    Returns:
      The operator; each product reads the file once (half of it if
      ``symmetric``), in row blocks, with ``os.preadv`` into one reused buffer.
    """
    path = os.fspath(path)
    done = kernel_file_progress(path)
    if done is not None and done[0] < done[1]:
      raise ValueError(
          f"{path} is an unfinished ntk_blocked kernel ({done[0]} of {done[1]} blocks "
          f"written; the others read as zeros): run the same ntk_blocked(..., out=...) "
          f"call again to finish it before using it.")
    shape, dtype, fortran, offset = _npy_header(path)
    if fortran:
      raise ValueError(f"{path}: Fortran-ordered .npy files are not supported.")
    row_bytes = math.prod(shape[1:]) * dtype.itemsize
    col_bytes = row_bytes // max(1, shape[1])
    buffers: list[np.ndarray] = []

    def read(a: int, b: int, c: int) -> np.ndarray:
      """Rows ``[a, b)``, columns ``[c, N2)``."""
      tail = row_bytes - c * col_bytes
      nbytes = (b - a) * tail
      if not buffers or buffers[0].size < nbytes:
        buffers[:] = [np.empty(nbytes, np.uint8)]
      view = memoryview(buffers[0].data)
      fd = os.open(path, os.O_RDONLY)
      try:
        spans = [(offset + a * row_bytes, 0, nbytes)] if c == 0 else [
            (offset + n * row_bytes + c * col_bytes, (n - a) * tail, tail) for n in range(a, b)]
        for pos, at, size in spans:
          done = 0
          while done < size:
            got = os.preadv(fd, [view[at + done:at + size]], pos + done)
            if got <= 0:
              raise OSError(f"{path}: file ends before {shape_str(shape)} {dtype} entries.")
            done += got
      finally:
        os.close(fd)
      return buffers[0][:nbytes].view(dtype).reshape((b - a, shape[1] - c) + shape[2:])

    return cls._blocked(read, shape, dtype, block_bytes, name or path, symmetric)

  @classmethod
  def _blocked(cls, read: Callable[[int, int, int], np.ndarray], shape: tuple[int, ...],
               dtype: np.dtype, block_bytes: int, name: str,
               symmetric: bool) -> KernelOperator:
    nd = len(shape)
    if nd < 2 or nd % 2:
      raise ValueError(f"`{name}` must have an even number of axes ([N1, N2] or "
                       f"[N1, N2, O, O, ...]), got shape {shape_str(shape)}.")
    if tuple(shape[2::2]) != tuple(shape[3::2]):
      raise ValueError(f"`{name}` of shape {shape_str(shape)} is not interleaved "
                       "[N1, N2, O, O, ...].")
    if symmetric and shape[0] != shape[1]:
      raise ValueError(f"`{name}` of shape {shape_str(shape)} cannot be symmetric.")
    inner = math.prod(shape[2::2])
    n1, n2 = shape[0], shape[1]
    rows_m, cols_m = n1 * inner, n2 * inner
    step = max(1, int(block_bytes) // max(1, n2 * inner * inner * 8))
    perm = (0,) + tuple(range(2, nd, 2)) + (1,) + tuple(range(3, nd, 2))
    scratch: list[np.ndarray] = []

    def blocks(upper: bool) -> Iterator[tuple[int, np.ndarray]]:
      """``(r, K[r:r+k, c:] float64)`` with ``c = r`` if ``upper`` else 0; a reused buffer."""
      for a in range(0, n1, step):
        b = min(n1, a + step)
        c = a if upper else 0
        blk = np.asarray(read(a, b, c)).transpose(perm).reshape((b - a) * inner,
                                                                (n2 - c) * inner)
        if blk.dtype != np.float64:  # converted into one reused buffer (no page faults)
          if not scratch:
            scratch.append(np.empty(step * inner * cols_m))
          buf = scratch[0][:blk.size].reshape(blk.shape)
          np.copyto(buf, blk)
          blk = buf
        yield a * inner, blk

    def matmat(v: np.ndarray) -> np.ndarray:
      if symmetric:  # K v from the upper block triangle: K[r, r:] v[r:] and its mirror
        out = np.zeros((rows_m, v.shape[1]))
        for r, blk in blocks(True):
          e = r + blk.shape[0]
          out[r:e] += blk @ v[r:]
          out[e:] += blk[:, e - r:].T @ v[r:e]
        return out
      out = np.empty((rows_m, v.shape[1]))
      for r, blk in blocks(False):
        out[r:r + blk.shape[0]] = blk @ v
      return out

    def rmatmat(u: np.ndarray) -> np.ndarray:
      if symmetric:
        return matmat(u)
      out = np.zeros((cols_m, u.shape[1]))
      for r, blk in blocks(False):
        out += blk.T @ u[r:r + blk.shape[0]]
      return out

    def diagonal() -> np.ndarray:
      if rows_m != cols_m:
        raise ValueError(f"`{name}` of shape {shape_str(shape)} is not square.")
      out = np.empty(rows_m)
      for r, blk in blocks(symmetric):
        k = blk.shape[0]
        out[r:r + k] = np.diagonal(blk[:, :k] if symmetric else blk[:, r:r + k])
      return out

    return cls(matmat, (rows_m, cols_m), dtype, diagonal=diagonal, rmatmat=rmatmat, name=name)

  @classmethod
  def test_train(cls, f: Callable[..., Any], params: Any, x_test: Any, x_train: Any, *,
                 block_size: int | None = None, trainable: Any = None,
                 model_kwargs: dict[str, Any] | None = None) -> KernelOperator:
    """The test-train NTK ``[N_test·O, N_train·O]`` without forming it.

    Built on ``ntklayers.metrics.ntk_matvec`` over the concatenated batch
    ``[x_train; x_test]``: ``K_td u`` is the test block of ``K [u; 0]`` and
    ``K_dt w`` the train block of ``K [0; w]`` (one product over both sets).

    Args:
      f, params: the model ``f(params, x) -> [N, ...]`` and its parameters.
      x_test: test batch ``[N_test, ...]`` (array or pytree of arrays).
      x_train: train batch ``[N_train, ...]``.
      block_size, trainable, model_kwargs: as for ``ntk_matvec``.

    Returns:
      The rectangular operator (with transposed products).
    """
    n_train = int(jax.tree.leaves(x_train)[0].shape[0])
    both = jax.tree.map(lambda a, b: jnp.concatenate([jnp.asarray(a), jnp.asarray(b)]),
                        x_train, x_test)
    mv, dim, dtype = ntk_matvec(f, params, both, block_size=block_size,
                                        trainable=trainable, model_kwargs=model_kwargs)
    full = cls.from_matvec(mv, dim, dtype)
    o = dim // (n_train + int(jax.tree.leaves(x_test)[0].shape[0]))
    m_train = n_train * o

    def matmat(v: np.ndarray) -> np.ndarray:
      pad = np.zeros((dim, v.shape[1]))
      pad[:m_train] = v
      return full.matmat(pad)[m_train:]

    def rmatmat(u: np.ndarray) -> np.ndarray:
      pad = np.zeros((dim, u.shape[1]))
      pad[m_train:] = u
      return full.matmat(pad)[:m_train]

    return cls(matmat, (dim - m_train, m_train), dtype, rmatmat=rmatmat, name="test_train")


def as_operator(k: Any, name: str, symmetric: bool = False) -> KernelOperator:
  """A :class:`KernelOperator` from an operator, an ``ntk_matvec`` triple, a path or an array.

  ``symmetric``: paths and arrays are train-train kernels (read half of them).
  """
  if isinstance(k, KernelOperator):
    return k
  if isinstance(k, (str, os.PathLike)):
    return KernelOperator.from_npy(k, symmetric=symmetric, name=name)
  if isinstance(k, tuple) and len(k) == 3 and callable(k[0]):
    return KernelOperator.from_matvec(*k)
  if isinstance(k, (np.ndarray, jax.Array)):
    return KernelOperator.from_array(k, symmetric=symmetric, name=name)
  raise TypeError(f"`{name}` must be a KernelOperator, an (matvec, dim, dtype) triple from "
                  f"`ntk_matvec`, a .npy path or an array, got {type(k).__name__}.")
