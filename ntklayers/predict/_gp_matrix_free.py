"""Matrix-free and out-of-core ``gp_inference``: posterior means and covariances by CG."""

from __future__ import annotations

from typing import Any

import numpy as np

from ntklayers.predict import _checks as C
from ntklayers.predict._gp import Gaussian, canonicalize_get, pack
from ntklayers.predict._layout import Axes, Layout, first_field, get_field, has_field, shape_str
from ntklayers.predict._matrix_free import (_check_rank, _is_collection, _shift, _Solves,
                                            _test_operator, _train_operator)
from ntklayers.predict._operators import KernelOperator
from ntklayers.predict._solvers import SolveInfo


class MatrixFreeGP:
  """``predict_fn(get, k_test_train, k_test_test)`` of :func:`gp_inference_matrix_free`.

  Attributes:
    info: :class:`SolveInfo` of each CG solve done by the last call.
  """

  def __init__(self, k_train_train: Any, layout: Layout, y: np.ndarray, reg: float,
               absolute: bool, tol: float, maxiter: int | None, progress: bool | None,
               rank: int = 0):
    self._k, self.layout, self.y, self.reg, self.absolute = k_train_train, layout, y, reg, absolute
    self._opts = (tol, maxiter, progress, rank)
    self._solves: dict[str, _Solves] = {}
    self.info: list[SolveInfo] = []
    self.dtype = C.float_dtype(self._ops("nngp" if has_field(k_train_train, "nngp") else "ntk")
                               .op.dtype)

  def _ops(self, g: str) -> _Solves:
    if g not in self._solves:
      if _is_collection(self._k):
        name, field = f"k_train_train.{g}", get_field(self._k, g, "k_train_train")
      else:
        name, field = "k_train_train", self._k
      op = _train_operator(self.layout, field, name)
      self._solves[g] = _Solves(op, _shift(op, self.reg, self.absolute), *self._opts)
    return self._solves[g]

  def _test(self, k: Any, g: str) -> tuple[KernelOperator, tuple[int, ...]]:
    if _is_collection(k):
      return _test_operator(self.layout, get_field(k, g, "k_test_train"), f"k_test_train.{g}")
    return _test_operator(self.layout, k, "k_test_train")

  def __call__(self, get: Any = None, k_test_train: Any = None, k_test_test: Any = None) -> Any:
    """Posterior means [and covariances], as :func:`gp_inference`'s (NumPy arrays)."""
    single, gets = canonicalize_get(get)
    layout = self.layout
    out: dict[str, Any] = {}
    for sv in self._solves.values():
      sv.info = []
    y2 = layout.targets_2d(self.y)
    for g in gets:
      kk = "ntk" if g == "ntkgp" else g
      sv = self._ops(kk)
      if k_test_train is None:
        mean, rows = self.y, layout.kept_shape
      else:
        kop, rows = self._test(k_test_train, kk)
        mean = layout.outputs(kop.matmat(sv.solve(y2)), rows)
      mean = np.asarray(mean, self.dtype)
      if k_test_test is None:
        out[g] = mean
        continue
      if k_test_train is None:
        out[g] = Gaussian(mean, np.zeros(layout.kernel_shape(), self.dtype))
        continue
      if g == "ntk" and not (has_field(self._k, "nngp") and has_field(k_test_train, "nngp")):
        raise ValueError("The NTK posterior covariance needs both NTK and NNGP kernels: pass "
                         "`k_train_train` and `k_test_train` as dicts / namedtuples with "
                         "`nngp` and `ntk` fields.")
      g_init = "ntk" if g == "ntkgp" else "nngp"
      kinit, _ = self._test(k_test_train, g_init)
      mt = int(np.prod(rows))
      eye = np.eye(mt)
      ktt = (get_field(k_test_test, g_init, "k_test_test") if _is_collection(k_test_test)
             else k_test_test)
      if isinstance(ktt, KernelOperator):
        ktt2 = ktt.matmat(eye)
      else:
        want = tuple(s for r in rows for s in (r, r))
        if tuple(np.shape(ktt)) != want:
          raise ValueError(f"`k_test_test` has shape {shape_str(np.shape(ktt))}, expected "
                           f"{shape_str(want)}.")
        nd = len(want)
        ktt2 = np.asarray(ktt, np.float64).transpose(
            tuple(range(0, nd, 2)) + tuple(range(1, nd, 2))).reshape(mt, mt)
      cross = kop.matmat(sv.solve(kinit.rmatmat(eye)))
      if g in ("nngp", "ntkgp"):
        cov2 = ktt2 - cross
      else:
        a_t = sv.solve(kop.rmatmat(eye))
        cov2 = a_t.T @ self._ops("nngp").op.matmat(a_t) - cross - cross.T + ktt2
      out[g] = Gaussian(mean, np.asarray(layout.covariance(cov2, rows), self.dtype))
    self.info = [i for sv in self._solves.values() for i in sv.info]
    return pack(out, single, gets)


def gp_inference_matrix_free(k_train_train: Any, y_train: Any, diag_reg: float = 0.,
                             diag_reg_absolute_scale: bool = False, trace_axes: Axes = (-1,),
                             *, tol: float = 1e-6, maxiter: int | None = None,
                             progress: bool | None = None,
                             preconditioner_rank: int = 0) -> MatrixFreeGP:
  r""":func:`gp_inference` with conjugate-gradient solves on kernel operators.

  Means ``K_td (K + s I)⁻¹ y`` need one block CG solve per kernel (``O`` columns
  for ``trace_axes=(-1,)``); covariances one with ``N_test·O`` columns (keep the
  test set small).

  Args:
    k_train_train: one kernel (see :func:`gradient_descent_mse_matrix_free`) or a
      dict / namedtuple of them with ``nngp`` and/or ``ntk`` fields.
    y_train: targets ``[N_train, O]``.
    diag_reg, diag_reg_absolute_scale, trace_axes: see :func:`gp_inference`.
    tol: relative residual of the CG solves.
    maxiter: CG iterations at most.
    progress: tqdm bars (``None``: on a terminal only).
    preconditioner_rank: rank of a :class:`NystromPreconditioner` per kernel
      (``0``: plain CG).

  Returns:
    A :class:`MatrixFreeGP` called as ``predict_fn(get=None, k_test_train=None,
    k_test_test=None)`` like :func:`gp_inference`'s (NumPy outputs; test kernels
    as arrays, paths or operators); ``info`` lists the solves.

  Example:
    >>> import numpy as np, ntklayers.predict as npr
    >>> k = np.array([[2., 1.], [1., 2.]])
    >>> predict_fn = npr.gp_inference_matrix_free(k, np.array([[1.], [-1.]]), tol=1e-10)
    >>> predict_fn("nngp", np.array([[1., 0.5]]))
    array([[0.5]])
  """
  reg = C.check_diag_reg(diag_reg)
  y_train = C.check_array(y_train, "y_train")
  layout = Layout(y_train.shape, trace_axes)
  if _is_collection(k_train_train):
    first_field(k_train_train, "k_train_train")
  return MatrixFreeGP(k_train_train, layout, np.asarray(y_train, np.float64), reg,
                      bool(diag_reg_absolute_scale), tol, maxiter, progress,
                      _check_rank(preconditioner_rank))
