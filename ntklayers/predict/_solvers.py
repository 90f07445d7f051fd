"""Krylov solvers on :class:`KernelOperator`: conjugate gradients and Lanczos ``f(K) v``.

Host loops in float64 NumPy (one operator product per iteration and column), so
products may read a kernel from disk or run a JAX model; a tqdm bar follows long
solves.
"""

from __future__ import annotations

import dataclasses
import math
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np

from ntklayers._progress import progress_bar
from ntklayers.predict._checks import NotPositiveSemidefiniteError
from ntklayers.predict._layout import shape_str
from ntklayers.predict._operators import KernelOperator


class ConvergenceWarning(RuntimeWarning):
  """An iterative solve stopped at ``maxiter`` before reaching its tolerance."""


@dataclasses.dataclass
class SolveInfo:
  """What an iterative solve did.

  Attributes:
    method: ``"cg"`` or ``"lanczos"``.
    iterations: iterations (Krylov dimension for Lanczos; for a block of
      columns, the most any column took).
    matvecs: operator-vector products, all columns together (the final
      residual check included).
    residual: achieved accuracy, worst column: for CG the *true* relative
      residual ``‖b - (K + s I) x‖ / ‖b‖`` recomputed at the end; for Lanczos the
      a posteriori error estimate ``β_m |e_mᵀ f(T_m) e_1| ‖v‖ / ‖f(K) v‖``.
    tol: the requested tolerance.
    converged: ``residual <= tol``.
    seconds: wall time.
  """
  method: str
  iterations: int
  matvecs: int
  residual: float
  tol: float
  converged: bool
  seconds: float


def _check_tol(tol: float, maxiter: int | None, dim: int) -> int:
  if not (isinstance(tol, (int, float, np.floating)) and 0 < float(tol) < 1):
    raise ValueError(f"`tol` must be in (0, 1), got {tol!r}.")
  if maxiter is None:
    return max(10, 10 * dim) if dim < 1000 else max(1000, dim // 10)
  if isinstance(maxiter, bool) or not isinstance(maxiter, (int, np.integer)) or maxiter < 1:
    raise ValueError(f"`maxiter` must be a positive int or None, got {maxiter!r}.")
  return int(maxiter)


def _warn(info: SolveInfo, what: str) -> None:
  if not info.converged:
    warnings.warn(f"{what}: {info.method} stopped after {info.iterations} iterations at "
                  f"relative residual {info.residual:.2e} > tol {info.tol:.1e}; raise "
                  "`maxiter`, loosen `tol`, or add `diag_reg`.", ConvergenceWarning,
                  stacklevel=3)


def cg(op: KernelOperator, b: Any, *, shift: float = 0., tol: float = 1e-6,
       maxiter: int | None = None, progress: bool | None = None, desc: str = "cg",
       preconditioner: Callable[[np.ndarray], np.ndarray] | None = None,
       ) -> tuple[np.ndarray, SolveInfo]:
  r"""Solves ``(K + shift·I) x = b`` by conjugate gradients, one column at a time in a block.

  Each column runs its own CG recurrence (all columns share the operator
  products) until ``‖r‖ <= tol ‖b‖``; then the true residual is recomputed and,
  if round-off left it above ``tol``, CG restarts from ``x`` (within ``maxiter``).

  Args:
    op: symmetric positive (semi)definite square operator ``[M, M]``.
    b: right-hand sides ``[M]`` or ``[M, k]``.
    shift: ``>= 0`` added to the diagonal (absolute).
    tol: relative residual to reach, in ``(0, 1)``.
    maxiter: iterations at most (default ``10 M`` for ``M < 1000``, else
      ``max(1000, M / 10)``).
    progress: tqdm bar: ``None`` on a terminal only, ``True`` / ``False``.
    desc: the bar's label.
    preconditioner: ``r [M, k] -> M⁻¹ r``, symmetric positive definite (e.g.
      :class:`NystromPreconditioner`); ``None`` for plain CG.

  Returns:
    ``(x, info)``: ``x`` float64 of ``b``'s shape and a :class:`SolveInfo`
    (warns ``ConvergenceWarning`` if ``tol`` was not reached).

  Raises:
    NotPositiveSemidefiniteError: ``pᵀ (K + shift I) p <= 0`` for a search
      direction ``p`` (an indefinite or singular operator).

  Example:
    >>> import numpy as np, ntklayers.predict as npr
    >>> op = npr.KernelOperator.from_array(np.array([[4., 1.], [1., 3.]]))
    >>> x, info = npr.cg(op, np.array([1., 2.]), tol=1e-12)
    >>> np.round(x, 6), info.converged
    (array([0.090909, 0.636364]), True)
  """
  m = op.shape[0]
  if op.shape[0] != op.shape[1]:
    raise ValueError(f"cg needs a square operator, got {shape_str(op.shape)}.")
  maxiter = _check_tol(tol, maxiter, m)
  b = np.asarray(b, np.float64)
  vec = b.ndim == 1
  b2 = b[:, None] if vec else b
  if b2.ndim != 2 or b2.shape[0] != m:
    raise ValueError(f"`b` of shape {shape_str(b.shape)} does not fit the operator "
                     f"{shape_str(op.shape)}.")
  start, calls0 = time.perf_counter(), op.matvecs
  bnorm = np.linalg.norm(b2, axis=0)
  x = np.zeros_like(b2)
  r = b2.copy()
  its = 0
  residual = 0.0
  precond = (lambda v: v) if preconditioner is None else preconditioner
  with progress_bar(maxiter, f"{desc} [{m}x{b2.shape[1]}]", progress) as bar:
    while True:
      z = precond(r)
      p = z.copy()
      rz = np.sum(r * z, axis=0)
      rr = np.sum(r * r, axis=0)
      while its < maxiter:
        active = np.sqrt(rr) > tol * bnorm
        if not active.any():
          break
        its += 1
        pa = p[:, active]
        ap = op.matmat(pa) + shift * pa
        pap = np.sum(pa * ap, axis=0)
        if (pap <= 0).any():
          raise NotPositiveSemidefiniteError(
              f"{op.name}: CG found a direction p with pᵀ(K + {shift:.3g} I)p = "
              f"{pap.min():.3g} <= 0 at iteration {its}: the kernel is not positive "
              "definite (indefinite, or singular without `diag_reg`).")
        alpha = rz[active] / pap
        x[:, active] += alpha * pa
        r[:, active] -= alpha * ap
        ra = r[:, active]
        za = precond(ra)
        rz_new = np.sum(ra * za, axis=0)
        p[:, active] = za + (rz_new / rz[active]) * pa
        rz[active] = rz_new
        rr[active] = np.sum(ra * ra, axis=0)
        if bar is not None:
          bar.update(1)
          worst = np.max(np.sqrt(rr) / np.where(bnorm > 0, bnorm, 1.0))
          bar.set_postfix(residual=f"{worst:.1e}", refresh=False)
      r = b2 - (op.matmat(x) + shift * x)
      rel = np.linalg.norm(r, axis=0) / np.where(bnorm > 0, bnorm, 1.0)
      residual = float(rel.max()) if rel.size else 0.0
      if residual <= tol or its >= maxiter:
        break
  info = SolveInfo("cg", its, op.matvecs - calls0, residual, float(tol), residual <= tol,
                   time.perf_counter() - start)
  _warn(info, op.name)
  return (x[:, 0] if vec else x), info


def lanczos_apply(op: KernelOperator, v: Any, fns: Sequence[Callable[[np.ndarray], np.ndarray]],
                  *, shift: float = 0., tol: float = 1e-6, maxiter: int | None = None,
                  progress: bool | None = None,
                  desc: str = "lanczos") -> tuple[list[np.ndarray], SolveInfo]:
  r"""``f(K + shift I) v`` for several functions ``f``, by Lanczos with full reorthogonalization.

  One Krylov basis per column of ``v`` serves every function: ``f(K) v ≈ ‖v‖ Q_m
  f(T_m) e_1``. Each function maps eigenvalues ``[m]`` to values ``[T, m]`` (e.g.
  ``T`` times), so one run answers all times at once. Iterations stop when the
  a posteriori estimate ``β_m |e_mᵀ f(T_m) e_1| ‖v‖`` is below ``tol ‖f(K) v‖``
  for every function and time, or on breakdown (an invariant subspace: exact).
  Memory: the basis, ``[M, m]`` float64.

  Args:
    op: symmetric square operator ``[M, M]``.
    v: ``[M]`` or ``[M, k]``.
    fns: functions of the eigenvalues, ``λ [m] -> [T, m]``.
    shift: added to the diagonal.
    tol: relative accuracy to reach.
    maxiter: Krylov dimension at most (default ``min(M, 500)``).
    progress: tqdm bar (``None``: on a terminal only).
    desc: the bar's label.

  Returns:
    ``([f(K) v as [T, M(, k)] for f in fns], info)``.

  Example:
    >>> import numpy as np, ntklayers.predict as npr
    >>> op = npr.KernelOperator.from_array(np.diag([1., 2., 3.]))
    >>> (ev,), info = npr.lanczos_apply(op, np.ones(3), [lambda lam: np.exp(-lam)[None]])
    >>> np.allclose(ev[0], np.exp(-np.array([1., 2., 3.]))), info.converged
    (True, True)
  """
  m = op.shape[0]
  if op.shape[0] != op.shape[1]:
    raise ValueError(f"lanczos needs a square operator, got {shape_str(op.shape)}.")
  maxiter = min(m, 500 if maxiter is None else _check_tol(tol, maxiter, m))
  _check_tol(tol, 1, m)
  v = np.asarray(v, np.float64)
  vec = v.ndim == 1
  v2 = v[:, None] if vec else v
  if v2.ndim != 2 or v2.shape[0] != m:
    raise ValueError(f"`v` of shape {shape_str(v.shape)} does not fit the operator "
                     f"{shape_str(op.shape)}.")
  start, calls0 = time.perf_counter(), op.matvecs
  outs: list[list[np.ndarray]] = [[] for _ in fns]
  worst_its, worst_err = 0, 0.0
  with progress_bar(maxiter * v2.shape[1], f"{desc} [{m}x{v2.shape[1]}]", progress) as bar:
    for j in range(v2.shape[1]):
      cols, its, err = _lanczos_column(op, v2[:, j], fns, shift, tol, maxiter, bar)
      for i, c in enumerate(cols):
        outs[i].append(c)
      worst_its, worst_err = max(worst_its, its), max(worst_err, err)
  results = [np.stack(o, axis=-1) for o in outs]
  if vec:
    results = [r[..., 0] for r in results]
  info = SolveInfo("lanczos", worst_its, op.matvecs - calls0, worst_err, float(tol),
                   worst_err <= tol, time.perf_counter() - start)
  _warn(info, op.name)
  return results, info


class _Lanczos:
  """Lanczos on ``K + shift I`` from ``v / ‖v‖``, with full reorthogonalization (twice).

  Iterating yields ``(alphas, betas, beta, breakdown)`` after each step (``T_k``
  has ``alphas`` on its diagonal and ``betas`` beside it; ``beta`` is the next
  off-diagonal entry); ``q[:, :k]`` holds the basis.
  """

  def __init__(self, op: KernelOperator, v: np.ndarray, shift: float, maxiter: int):
    self.op, self.shift, self.maxiter = op, shift, maxiter
    self.q = np.empty((v.shape[0], maxiter))
    self.q[:, 0] = v / np.linalg.norm(v)

  def __iter__(self) -> Iterator[tuple[np.ndarray, np.ndarray, float, bool]]:
    q = self.q
    alphas: list[float] = []
    betas: list[float] = []
    for k in range(self.maxiter):
      w = self.op.matmat(q[:, k]) + self.shift * q[:, k]
      alphas.append(float(q[:, k] @ w))
      for _ in range(2):
        w -= q[:, :k + 1] @ (q[:, :k + 1].T @ w)
      beta = float(np.linalg.norm(w))
      scale = max(abs(a) for a in alphas) + (max(betas) if betas else 0.0)
      breakdown = beta <= 1e-13 * scale
      yield np.array(alphas), np.array(betas), beta, breakdown
      if breakdown:
        return
      if k + 1 < self.maxiter:
        q[:, k + 1] = w / beta
        betas.append(beta)


def _tridiag_eigh(alphas: np.ndarray, betas: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  t = np.diag(alphas) + np.diag(betas, 1) + np.diag(betas, -1)
  return np.linalg.eigh(t)


def _lanczos_column(op: KernelOperator, v: np.ndarray, fns: Sequence[Callable], shift: float,
                    tol: float, maxiter: int, bar: Any) -> tuple[list[np.ndarray], int, float]:
  """``[f(K) v [T, M] for f in fns]``, iterations and error estimate, for one vector."""
  m = v.shape[0]
  vnorm = float(np.linalg.norm(v))
  if vnorm == 0:
    return [np.zeros((np.asarray(f(np.zeros(1))).shape[0], m)) for f in fns], 0, 0.0
  err, check, k = math.inf, 1, 0
  coefs: list[np.ndarray] = []
  lz = _Lanczos(op, v, shift, maxiter)
  for alphas, betas, beta, breakdown in lz:
    k = alphas.size
    if bar is not None:
      bar.update(1)
    if not (breakdown or k == maxiter or k >= check):
      continue
    check = max(check + 1, int(check * 1.25))
    theta, s = _tridiag_eigh(alphas, betas)
    coefs = [vnorm * (s * np.asarray(f(theta))[:, None, :]) @ s[0] for f in fns]  # [T, k]
    err = 0.0 if breakdown else max(
        float(np.max(beta * np.abs(c[:, -1]) / np.maximum(np.linalg.norm(c, axis=1), 1e-300)))
        for c in coefs)
    if bar is not None:
      bar.set_postfix(error=f"{err:.1e}", refresh=False)
    if breakdown or err <= tol:
      break
  return [c @ lz.q[:, :k].T for c in coefs], k, err


def lanczos_extreme(op: KernelOperator, *, tol: float = 1e-10, maxiter: int | None = None,
                    seed: int = 0) -> float:
  """Largest eigenvalue of a symmetric operator by Lanczos.

  Stops when the top Ritz pair's residual bound ``β |s_m|`` is below
  ``tol · θ`` (then ``θ`` is within that of an eigenvalue, Golub and Van Loan
  §10.1), on breakdown, or at ``maxiter``.

  Args:
    op: square symmetric operator.
    tol: relative residual bound to stop at.
    maxiter: Krylov dimension at most (default ``min(M, 300)``).
    seed: seed of the random start vector.

  Returns:
    ``λmax`` (a Python float).
  """
  m = op.shape[0]
  maxiter = min(m, 300) if maxiter is None else int(maxiter)
  v = np.random.default_rng(seed).standard_normal(m)
  top = -math.inf
  for alphas, betas, beta, breakdown in _Lanczos(op, v, 0.0, maxiter):
    theta, s = _tridiag_eigh(alphas, betas)
    top = float(theta[-1])
    if breakdown or beta * abs(s[-1, -1]) <= tol * abs(top):
      break
  return top
