"""Matrix-free and out-of-core ``gradient_descent_mse`` (and the solves shared with GP).

The same semantics as the dense functions, with the train-train kernel as a
:class:`KernelOperator` (``ntk_matvec``, an in-memory array multiplied in row
blocks, or a ``.npy`` file read block by block): ``(K + s I)⁻¹ b`` by conjugate
gradients and ``exp(-t K) v``-type products by Lanczos, to a stated tolerance.
Inputs and outputs are host NumPy arrays; arithmetic is float64.
"""

from __future__ import annotations

import hashlib
import os
from typing import Any

import numpy as np

from ntklayers.predict import _checks as C
from ntklayers.predict._layout import Axes, Layout, shape_str
from ntklayers.predict._operators import KernelOperator, _npy_header, as_operator
from ntklayers.predict._precondition import NystromPreconditioner
from ntklayers.predict._solvers import SolveInfo, cg, lanczos_apply


def _test_operator(layout: Layout, k: Any, name: str) -> tuple[KernelOperator, tuple[int, ...]]:
  """A test-train kernel as an operator ``[M_test, M]`` and its rows (test kept shape)."""
  if isinstance(k, KernelOperator):
    inner = int(np.prod(layout.kept_shape[1:]))
    if k.shape[1] != layout.m or k.shape[0] % inner:
      raise ValueError(f"`{name}` operator has shape {shape_str(k.shape)}, expected "
                       f"[N_test·{inner}, {layout.m}] ({layout.hint()}).")
    return k, (k.shape[0] // inner,) + layout.kept_shape[1:]
  if isinstance(k, (str, os.PathLike)):
    shape = _npy_header(os.fspath(k))[0]
    rows = layout.check_kernel(_Shape(shape), name, square=False)
    return KernelOperator.from_npy(k, name=name), rows
  k = C.check_array(k, name)
  rows = layout.check_kernel(k, name, square=False)
  return KernelOperator.from_array(k, name=name), rows


def _is_collection(k: Any) -> bool:
  """A dict or namedtuple of kernels (not an ``ntk_matvec`` triple)."""
  return isinstance(k, dict) or (isinstance(k, tuple) and hasattr(k, "_fields"))


def _broadcast(x: Any, shape: tuple[int, ...], name: str) -> np.ndarray:
  x = np.asarray(x, np.float64)
  try:
    if np.broadcast_shapes(x.shape, shape) == shape:
      return np.broadcast_to(x, shape)
  except ValueError:
    pass
  raise ValueError(f"`{name}` of shape {shape_str(x.shape)} does not broadcast to the "
                   f"output shape {shape_str(shape)}.")


class _Shape:
  """Stands in for an array in shape checks (``np.shape``)."""

  def __init__(self, shape: tuple[int, ...]):
    self.shape = shape


def _train_operator(layout: Layout, k: Any, name: str) -> KernelOperator:
  op = as_operator(k, name, symmetric=True)
  if op.shape != (layout.m, layout.m):
    raise ValueError(f"`{name}` is {shape_str(op.shape)} once flattened, expected "
                     f"[{layout.m}, {layout.m}]: {layout.hint()}.")
  return op


def _shift(op: KernelOperator, diag_reg: float, absolute: bool) -> float:
  if diag_reg == 0:
    return 0.0
  return diag_reg if absolute else diag_reg * op.trace() / op.dim


def _check_rank(rank: Any) -> int:
  if isinstance(rank, bool) or not isinstance(rank, (int, np.integer)) or rank < 0:
    raise ValueError(f"`preconditioner_rank` must be an int >= 0, got {rank!r}.")
  return int(rank)


def _key(*arrays: np.ndarray) -> str:
  h = hashlib.sha1()
  for a in arrays:
    h.update(np.ascontiguousarray(a).tobytes())
    h.update(str(a.shape).encode())
  return h.hexdigest()


class _Solves:
  """CG / Lanczos on one operator, with the last few results cached by right-hand side."""

  def __init__(self, op: KernelOperator, shift: float, tol: float, maxiter: int | None,
               progress: bool | None, rank: int):
    self.op, self.shift, self.tol, self.maxiter, self.progress = op, shift, tol, maxiter, progress
    self.rank = rank
    self.preconditioner: NystromPreconditioner | None = None
    self.cache: dict[str, Any] = {}
    self.info: list[SolveInfo] = []

  def _remember(self, key: str, value: Any) -> Any:
    if len(self.cache) >= 8:
      self.cache.pop(next(iter(self.cache)))
    self.cache[key] = value
    return value

  def solve(self, b: np.ndarray) -> np.ndarray:
    key = "cg" + _key(b)
    if key not in self.cache:
      if self.rank and self.preconditioner is None:
        self.preconditioner = NystromPreconditioner(self.op, min(self.rank, self.op.dim),
                                                    shift=self.shift)
      x, info = cg(self.op, b, shift=self.shift, tol=self.tol, maxiter=self.maxiter,
                   progress=self.progress, desc=f"cg {self.op.name}",
                   preconditioner=self.preconditioner)
      self.info.append(info)
      self._remember(key, x)
    return self.cache[key]

  def exp_fns(self, r: np.ndarray, s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(expm1(-s K) r, expm1(-s K) K⁻¹ r)`` as ``[T, M, C]`` (``K`` with the shift)."""
    key = "lz" + _key(r, s)
    if key in self.cache:
      return self.cache[key]

    def weights(lam: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
      cutoff = lam.size * np.finfo(np.float64).eps * np.max(np.abs(lam))
      pos = lam > cutoff
      safe = np.where(pos, lam, 1.0)
      e = np.where(pos[None], np.expm1(-np.outer(s, safe)), 0.0)
      return e, np.where(pos[None], e / safe[None], 0.0)

    (e_train, e_test), info = lanczos_apply(
        self.op, r, [lambda lam: weights(lam)[0], lambda lam: weights(lam)[1]],
        shift=self.shift, tol=self.tol, maxiter=self.maxiter, progress=self.progress,
        desc=f"lanczos {self.op.name}")
    self.info.append(info)
    return self._remember(key, (e_train, e_test))


class MatrixFreeMSE:
  """``predict_fn`` of :func:`gradient_descent_mse_matrix_free`.

  Attributes:
    info: :class:`SolveInfo` of each solve done by the last call (cached results
      add none).
    operator: the train-train :class:`KernelOperator`.
  """

  @property
  def preconditioner(self) -> NystromPreconditioner | None:
    """The Nyström preconditioner once built (``preconditioner_rank > 0``), else None."""
    return self._solves.preconditioner

  def __init__(self, op: KernelOperator, layout: Layout, y: np.ndarray, lr: float,
               solves: _Solves, dtype: Any):
    self.operator, self.layout, self.y, self.lr = op, layout, y, lr
    self._solves, self.dtype = solves, dtype
    self.info: list[SolveInfo] = []

  def __call__(self, t: Any = None, fx_train_0: Any = 0., fx_test_0: Any = None,
               k_test_train: Any = None) -> Any:
    """Train [and test] outputs at time[s] ``t``, as :func:`gradient_descent_mse`'s."""
    layout, y, sv = self.layout, self.y, self._solves
    C.check_outputs(fx_train_0, fx_test_0, k_test_train)
    sv.info = []
    y2 = layout.targets_2d(y)
    f0 = None if fx_train_0 is None else _broadcast(fx_train_0, y.shape, "fx_train_0")
    if fx_test_0 is not None:
      kop, rows = _test_operator(layout, k_test_train, "k_test_train")
      ft0 = _broadcast(fx_test_0, layout.out_shape(rows), "fx_test_0")
    r2 = -y2 if f0 is None else layout.targets_2d(f0) - y2

    if t is None:
      fx_train = y
      if fx_test_0 is not None:
        d = kop.matmat(sv.solve(-r2))
        fx_test = ft0 + layout.outputs(d, rows)
    else:
      tt = np.asarray(t, np.float64)
      if np.isnan(tt).any() or (tt < 0).any():
        raise ValueError(f"`t` must be >= 0 and not NaN, got min(t) = {np.nanmin(tt)}.")
      s = tt.reshape(-1) * self.lr / layout.size
      fin = np.isfinite(s)
      e_train = np.empty((s.size,) + r2.shape)
      e_test = np.empty_like(e_train)
      if fin.any():
        e_train[fin], e_test[fin] = sv.exp_fns(r2, s[fin])
      if not fin.all():
        e_train[~fin] = -r2
        if fx_test_0 is not None:
          e_test[~fin] = -sv.solve(r2)
      if f0 is not None:
        fx_train = f0 + layout.outputs(e_train, layout.kept_shape, lead=1).reshape(
            tt.shape + y.shape)
      if fx_test_0 is not None:
        m, c = r2.shape
        flat = e_test.transpose(1, 0, 2).reshape(m, s.size * c)
        d = kop.matmat(flat).reshape(-1, s.size, c).transpose(1, 0, 2)
        fx_test = ft0 + layout.outputs(d, rows, lead=1).reshape(tt.shape + ft0.shape)

    self.info = list(sv.info)
    if fx_test_0 is None:
      return np.asarray(fx_train, self.dtype)
    if f0 is None:
      return np.asarray(fx_test, self.dtype)
    return np.asarray(fx_train, self.dtype), np.asarray(fx_test, self.dtype)


def gradient_descent_mse_matrix_free(
    k_train_train: Any, y_train: Any, learning_rate: float = 1., diag_reg: float = 0.,
    diag_reg_absolute_scale: bool = False, trace_axes: Axes = (-1,), *, tol: float = 1e-6,
    maxiter: int | None = None, progress: bool | None = None,
    preconditioner_rank: int = 0) -> MatrixFreeMSE:
  r""":func:`gradient_descent_mse` beyond memory: CG at ``t=None``, Lanczos at finite ``t``.

  ``t=None`` (and infinite entries of ``t``) solve ``(K + s I) α = y - f(0)`` by
  conjugate gradients to relative residual ``tol``, then the test outputs are
  ``f_test(0) + K_td α``; finite times use one Lanczos basis of ``f(0) - y``
  per output column for all times (``expm1(-η t K / size)`` and its ratio to
  ``K``), stopped when the error estimate is below ``tol``.

  Args:
    k_train_train: the train-train kernel ``[M, M]`` once flattened (``M =
      N_train`` for ``trace_axes=(-1,)``, ``N_train·O`` for ``trace_axes=()``): a
      :class:`KernelOperator`, ``ntk_matvec``'s ``(matvec, dim, dtype)`` (flattened
      outputs ``[N·O]``: use ``trace_axes=()``), a ``.npy`` path (e.g. from
      ``ntklayers.ntk_blocked(..., out=path)``) or an array / memory map
      ``[N_train, N_train(, O, O)]``.
    y_train: targets ``[N_train, O]``.
    learning_rate: ``η > 0``.
    diag_reg: ``>= 0``; relative to the mean diagonal (needs the operator's trace)
      unless ``diag_reg_absolute_scale``.
    diag_reg_absolute_scale: see :func:`gradient_descent_mse`.
    trace_axes: axes of ``y_train`` the kernel lacks.
    tol: relative residual (CG) / error estimate (Lanczos) to reach.
    maxiter: iterations per solve at most (default: see :func:`cg`; Lanczos
      ``min(M, 500)``).
    progress: tqdm bars on the solves (``None``: on a terminal only).
    preconditioner_rank: ``r > 0`` preconditions CG with a rank-``r``
      :class:`NystromPreconditioner` (built once, on the first solve, from one
      product with ``r`` columns); worth it when CG needs many iterations.

  Returns:
    A :class:`MatrixFreeMSE` called as ``predict_fn(t=None, fx_train_0=0.,
    fx_test_0=None, k_test_train=None)`` with :func:`gradient_descent_mse`'s
    outputs as NumPy arrays; ``k_test_train`` as an array / memory map / path
    ``[N_test, N_train(, O, O)]`` or an operator (e.g.
    :meth:`KernelOperator.test_train`). Its ``info`` lists the solves' iterations
    and residuals.

  Example:
    >>> import numpy as np, ntklayers.predict as npr
    >>> k = np.array([[2., 1.], [1., 2.]])
    >>> y = np.array([[1.], [-1.]])
    >>> predict_fn = npr.gradient_descent_mse_matrix_free(k, y, tol=1e-10)
    >>> predict_fn(None, 0., 0., np.array([[1., 0.5]]))[1]
    array([[0.5]])
    >>> predict_fn.info[0].converged
    True
  """
  lr = C.check_learning_rate(learning_rate)
  reg = C.check_diag_reg(diag_reg)
  y_train = C.check_array(y_train, "y_train")
  layout = Layout(y_train.shape, trace_axes)
  op = _train_operator(layout, k_train_train, "k_train_train")
  dtype = C.float_dtype(op.dtype)
  solves = _Solves(op, _shift(op, reg, bool(diag_reg_absolute_scale)), tol, maxiter, progress,
                   _check_rank(preconditioner_rank))
  return MatrixFreeMSE(op, layout, np.asarray(y_train, np.float64), lr, solves, dtype)
