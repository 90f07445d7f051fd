"""Randomized Nyström preconditioner for conjugate gradients on kernel operators.

Kernels of networks have a few large eigenvalues and a long decaying tail, so
plain CG needs many iterations (``O(√cond)``), each a full pass over the kernel.
A rank-``r`` Nyström approximation ``K ≈ U Λ Uᵀ`` costs one pass with ``r``
columns (a matrix-matrix product, far cheaper per column than ``r`` passes) and
turns the spectrum of ``K + μ I`` into roughly ``[λ_min + μ, λ_r + μ]`` /
``(λ_r + μ)``, so CG needs ``O(√((λ_r + μ) / (λ_min + μ)))`` iterations.

Reference: Frangella, Tropp and Udell, "Randomized Nyström preconditioning",
SIAM J. Matrix Anal. Appl. 44 (2023), Algorithm 2.1 (the stable, shifted
Nyström approximation of Tropp, Yurtsever, Udell and Cevher, 2017).
"""

from __future__ import annotations

import time

import numpy as np

from ntklayers.predict._checks import NotPositiveSemidefiniteError
from ntklayers.predict._operators import KernelOperator


class NystromPreconditioner:
  """``r ↦ P⁻¹ r`` for ``K + shift·I`` from a randomized rank-``rank`` Nyström approximation.

  ``P⁻¹ = U diag((λ_r + shift) / (λ + shift)) Uᵀ + (I - U Uᵀ)``, with ``U [M, r]``
  and ``λ [r]`` the approximate top eigenpairs (``λ_r`` the smallest of them).

  Attributes:
    u: ``[M, rank]`` orthonormal approximate eigenvectors.
    eigenvalues: ``[rank]`` approximate eigenvalues, descending.
    shift: the diagonal shift it preconditions for.
    seconds: time to build it (one operator product with ``rank`` columns).

  Example:
    >>> import numpy as np, ntklayers.predict as npr
    >>> q, _ = np.linalg.qr(np.random.default_rng(0).standard_normal((200, 200)))
    >>> k = (q * np.geomspace(1e4, 1e-2, 200)) @ q.T  # condition number 1e6
    >>> op = npr.KernelOperator.from_array(k)
    >>> b = np.ones(200)
    >>> _, plain = npr.cg(op, b, tol=1e-8, maxiter=5000)
    >>> pre = npr.NystromPreconditioner(op, rank=100)
    >>> _, fast = npr.cg(op, b, tol=1e-8, preconditioner=pre)
    >>> fast.iterations < plain.iterations / 2, fast.converged
    (True, True)
  """

  def __init__(self, op: KernelOperator, rank: int, *, shift: float = 0., seed: int = 0):
    start = time.perf_counter()
    m = op.shape[0]
    if op.shape[0] != op.shape[1]:
      raise ValueError(f"{op.name}: a Nyström preconditioner needs a square operator.")
    if isinstance(rank, bool) or not isinstance(rank, (int, np.integer)) or not 0 < rank <= m:
      raise ValueError(f"`rank` must be an int in [1, {m}], got {rank!r}.")
    omega, _ = np.linalg.qr(np.random.default_rng(seed).standard_normal((m, int(rank))))
    y = op.matmat(omega)
    nu = np.sqrt(m) * np.finfo(np.float64).eps * np.linalg.norm(y)
    y += nu * omega
    core = omega.T @ y
    try:
      chol = np.linalg.cholesky((core + core.T) / 2)
    except np.linalg.LinAlgError as e:
      raise NotPositiveSemidefiniteError(
          f"{op.name}: the Nyström core Ωᵀ K Ω is not positive definite: the kernel is "
          "not positive semidefinite.") from e
    b = np.linalg.solve(chol, y.T).T
    u, sigma, _ = np.linalg.svd(b, full_matrices=False)
    self.u = u
    self.eigenvalues = np.maximum(sigma ** 2 - nu, 0.0)
    self.shift = float(shift)
    floor = self.eigenvalues[-1] + self.shift
    denom = self.eigenvalues + self.shift
    self._scale = np.where(denom > 0, floor / np.where(denom > 0, denom, 1.0), 1.0) - 1.0
    self.seconds = time.perf_counter() - start

  @property
  def rank(self) -> int:
    return int(self.eigenvalues.size)

  def __call__(self, r: np.ndarray) -> np.ndarray:
    """``P⁻¹ r`` for ``r [M]`` or ``[M, k]``."""
    ur = self.u.T @ r
    scale = self._scale if r.ndim == 1 else self._scale[:, None]
    return r + self.u @ (scale * ur)
