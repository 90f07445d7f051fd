"""Matrix-free top-k eigenpairs of an NTK: block Lanczos, or LOBPCG.

:func:`top_eigenpairs` runs block Lanczos with full reorthogonalization (the
Rayleigh-Ritz projection ``Qᵀ K Q`` on a growing orthonormal Krylov basis; a
block of ``p`` start vectors finds eigenvalues of multiplicity up to ``p``), or
JAX's LOBPCG, and reports each pair's true residual ``‖K u − θ u‖``, which
bounds the distance from ``θ`` to an eigenvalue of ``K``.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ntklayers.metrics._estimators import (MatMat, MatVec, batched, check_key, check_operator,
                                           check_tol, host_rng, model_operator, progress_bar,
                                           restart_vectors)
from ntklayers.metrics._lanczos import _positive_int


@dataclasses.dataclass(frozen=True)
class Eigenpairs:
  """The largest eigenpairs of a symmetric operator found by :func:`top_eigenpairs`.

  Attributes:
    eigenvalues: ``[k]``, decreasing.
    eigenvectors: ``[dim, k]`` orthonormal columns (for a model, ``dim = N·O``:
      ``eigenvectors[:, i].reshape(N, O)``), each signed so that its entry of
      largest magnitude is positive.
    residuals: ``[k]`` true residual norms ``‖K u_i − θ_i u_i‖`` (one more
      product per pair): ``θ_i`` is within ``residuals[i]`` of an eigenvalue of
      ``K`` (and within ``residuals[i]² / gap`` when the other eigenvalues are
      ``gap`` away).
    converged: ``[k]`` bools, ``residuals <= tol · max|θ|``.
    tol: the tolerance used.
    method: ``"lanczos"``, ``"lobpcg"`` or ``"dense"`` (``dim <= max_vectors``:
      the operator was formed by ``dim`` products and diagonalized).
    iterations: block steps (Lanczos, LOBPCG), 1 for ``"dense"``.
    matvecs: products with the operator, the residual check included.
  """
  eigenvalues: jax.Array
  eigenvectors: jax.Array
  residuals: jax.Array
  converged: jax.Array
  tol: float
  method: str
  iterations: int
  matvecs: int


def _finish(matmat: MatMat, theta: Any, coef: Any, basis: jax.Array | None, tol: float,
            method: str, iterations: int, matvecs: int) -> Eigenpairs:
  """Orders, signs and checks the pairs ``basisᵀ coef [dim, k]`` (one program)."""
  def pairs(theta, coef, basis):
    vecs = coef if basis is None else basis.T @ coef
    order = jnp.argsort(-theta)
    theta, vecs = theta[order], vecs[:, order]
    big = jnp.argmax(jnp.abs(vecs), axis=0)
    sign = jnp.sign(jnp.take_along_axis(vecs, big[None], axis=0)[0])
    vecs = vecs * jnp.where(sign == 0, 1, sign).astype(vecs.dtype)[None, :]
    res = jnp.linalg.norm(matmat(vecs.T) - theta[:, None] * vecs.T, axis=1)
    return theta, vecs, res, res <= tol * jnp.max(jnp.abs(theta))

  theta, vecs, res, ok = jax.jit(pairs)(theta, coef, basis)
  return Eigenpairs(theta, vecs, res, ok, tol, method, iterations, matvecs + vecs.shape[1])


def _lanczos_step(matmat: MatMat, p: int, dim: int, dtype: Any) -> Callable:
  """One block step: ``W = K Q_j``, its projections ``Qᵀ W`` (a column block of the
  projected matrix ``H``), and the next block from ``W``'s part outside the
  basis; a rank-deficient block (an invariant subspace) is completed by random
  vectors orthogonal to the basis."""
  tiny = float(np.finfo(dtype).eps) * max(dim, 100) ** 0.5

  def orth(q, w):
    c = q @ w.T  # [rows, p]
    w = w - c.T @ q
    c2 = q @ w.T
    return w - c2.T @ q, c + c2

  def step(j, carry):
    q, h, _, scale = carry
    w = matmat(jax.lax.dynamic_slice_in_dim(q, j * p, p))  # [p, dim]
    scale = jnp.maximum(scale, jnp.max(jnp.linalg.norm(w, axis=1)))
    w, c = orth(q, w)
    h = jax.lax.dynamic_update_slice(h, c, (0, j * p))
    _, r0 = jnp.linalg.qr(w.T)
    bad = jnp.abs(jnp.diagonal(r0)) <= tiny * scale
    z, _ = orth(q, restart_vectors((p, dim), j, dtype))
    qn, _ = jnp.linalg.qr(jnp.where(bad[:, None], z, w).T)
    qn, _ = orth(q, qn.T)  # once more against the basis (round-off)
    qn = qn / jnp.linalg.norm(qn, axis=1, keepdims=True)
    r = qn @ w.T  # [p, p]: W = rᵀ qn (the off-diagonal block of H)
    q = jax.lax.dynamic_update_slice(q, qn, ((j + 1) * p, 0))
    return q, h, r, scale

  return step


def _ritz(h: np.ndarray, r: np.ndarray, used: int, p: int, k: int):
  """Top ``k`` Ritz values, their coefficient vectors and residual estimates."""
  hs = np.triu(h[:used, :used])
  hs = hs + np.triu(hs, 1).T
  theta, s = np.linalg.eigh(hs)
  theta, s = theta[::-1][:k], s[:, ::-1][:, :k]
  est = np.linalg.norm(r @ s[used - p:used], axis=0)
  return theta, s, est


def operator_top_eigenpairs(matvec: MatVec, dim: int, k: int, *, method: str = "lanczos",
                            tol: float | None = None, max_vectors: int | None = None,
                            start_vectors: int | None = None, key: jax.Array | None = None,
                            dtype: Any = None, matvec_batch: int | None = None,
                            progress: bool | None = None) -> Eigenpairs:
  """The ``k`` largest eigenpairs of a symmetric operator ``[dim, dim]``, matrix-free.

  ``"lanczos"``: block Lanczos from ``start_vectors`` random vectors, with full
  reorthogonalization (twice), Rayleigh-Ritz on the whole basis; it stops when
  the top ``k`` Ritz pairs' residual estimates are below ``tol · max|θ|``
  (checked after every ~25% more steps), or at ``max_vectors`` basis vectors.
  When ``dim <= max_vectors`` (or ``dim < 2 p``) the operator is formed by
  ``dim`` products and diagonalized (``method="dense"`` in the result). ``"lobpcg"``:
  ``jax.experimental.sparse.linalg.lobpcg_standard`` (one jitted call, no
  progress bar; needs ``5 k < dim``). Either way each pair's true residual is
  computed afterwards.

  Args:
    matvec: symmetric ``v [dim] -> K v [dim]``, traceable by JAX (jit, vmap).
    dim: size of the space.
    k: number of pairs, ``1 <= k <= dim``.
    method: ``"lanczos"`` or ``"lobpcg"``.
    tol: relative residual ``‖K u − θ u‖ / max|θ|`` to reach (default
      ``sqrt(eps)`` of ``dtype``: 1.5e-8 in float64, 3.5e-4 in float32).
    max_vectors: Krylov basis size at most (memory ``max_vectors × dim``;
      LOBPCG: its iterations). Default ``min(dim, max(20 k, 300))``.
    start_vectors: Lanczos block size ``p`` (default ``k``): eigenvalues of
      multiplicity up to ``p`` are all found.
    key: PRNG key of the start vectors (default ``jax.random.key(0)``).
    dtype: float dtype of the vectors (default: JAX's default float).
    matvec_batch: products applied together (vmapped) at most; ``None``: a
      whole block at once.
    progress: tqdm bar (``None``: on a terminal only).

  Returns:
    An :class:`Eigenpairs` (eigenvalues ``[k]`` decreasing, eigenvectors
    ``[dim, k]``, true residuals ``[k]``, converged flags).

  Raises:
    ValueError: ``k`` not in ``[1, dim]``, bad ``tol``, ``max_vectors < k``,
      ``start_vectors`` not in ``[1, k]``, an unknown ``method``, LOBPCG with
      ``5 k >= dim``, ``matvec`` not mapping ``[dim]`` to ``[dim]``.

  Example:
    >>> import jax.numpy as jnp, ntklayers.metrics as nm
    >>> A = jnp.diag(0.9 ** jnp.arange(400.))        # eigenvalues 1, 0.9, 0.81, ...
    >>> pairs = nm.operator_top_eigenpairs(lambda v: A @ v, 400, 3, max_vectors=60)
    >>> [round(float(t), 6) for t in pairs.eigenvalues], bool(pairs.converged.all())
    ([1.0, 0.9, 0.81], True)
  """
  dim, dtype = check_operator(matvec, dim, dtype)
  k = _positive_int(k, "k")
  if k > dim:
    raise ValueError(f"`k`={k} exceeds the operator's size `dim`={dim} (N·O for a model).")
  if method not in ("lanczos", "lobpcg"):
    raise ValueError(f"`method` must be 'lanczos' or 'lobpcg', got {method!r}.")
  tol = check_tol(tol, dtype)
  key = check_key(key)
  max_vectors = (min(dim, max(20 * k, 300)) if max_vectors is None
                 else _positive_int(max_vectors, "max_vectors"))
  if max_vectors < k:
    raise ValueError(f"`max_vectors`={max_vectors} must be >= `k`={k}.")
  p = k if start_vectors is None else _positive_int(start_vectors, "start_vectors")
  if p > k:
    raise ValueError(f"`start_vectors`={p} must be <= `k`={k}.")
  matmat = batched(matvec, dim, dtype, matvec_batch)
  with progress_bar(min(dim, max_vectors), f"top-{k} eigenpairs [{dim}]", progress) as bar:
    if method == "lobpcg":
      return _lobpcg(matmat, dim, k, tol, max_vectors, key, dtype)
    if dim <= max_vectors or dim < 2 * p:
      theta, vecs = jax.jit(lambda eye: _dense_top(matmat(eye), k))(np.eye(dim, dtype=dtype))
      if bar is not None:
        bar.update(dim)
      return _finish(matmat, theta, vecs, None, tol, "dense", 1, dim)
    return _block_lanczos(matmat, dim, k, p, tol, max_vectors, key, dtype, bar)


def _dense_top(mat: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
  theta, vecs = jnp.linalg.eigh((mat + mat.T) / 2)
  return theta[-k:], vecs[:, -k:]


def _block_lanczos(matmat: MatMat, dim: int, k: int, p: int, tol: float, max_vectors: int,
                   key: jax.Array, dtype: Any, bar: Any) -> Eigenpairs:
  blocks = max(min(max_vectors, dim - p) // p, 1)  # the next block must fit in dim too
  rows = (blocks + 1) * p
  step = _lanczos_step(matmat, p, dim, dtype)
  run = jax.jit(lambda c, a, b: jax.lax.fori_loop(a, b, step, c))
  q0, _ = np.linalg.qr(host_rng(key).standard_normal((dim, p)))
  basis = np.zeros((rows, dim), dtype)
  basis[:p] = q0.T
  carry = (basis, np.zeros((rows, rows), dtype), np.zeros((p, p), dtype), np.zeros((), dtype))
  j, check = 0, max(1, -(-k // p))
  while True:
    stop = min(blocks, check)
    carry = run(carry, j, stop)
    if bar is not None:
      bar.update((stop - j) * p)
    j = stop
    theta, s, est = _ritz(np.asarray(carry[1], np.float64), np.asarray(carry[2], np.float64),
                          j * p, p, k)
    worst = float(np.max(est)) / max(float(np.max(np.abs(theta))), 1e-300)
    if bar is not None:
      bar.set_postfix(residual=f"{worst:.1e}", refresh=False)
    if j >= blocks or worst <= tol or not math.isfinite(worst):
      break
    check = j + max(1, j // 4)
  coef = np.zeros((rows, k), dtype)
  coef[:j * p] = s
  return _finish(matmat, theta.astype(dtype), coef, carry[0], tol, "lanczos", j, j * p)


def _lobpcg(matmat: MatMat, dim: int, k: int, tol: float, max_vectors: int, key: jax.Array,
            dtype: Any) -> Eigenpairs:
  from jax.experimental.sparse.linalg import lobpcg_standard  # pylint: disable=g-import-not-at-top
  if 5 * k >= dim:
    raise ValueError(f"method='lobpcg' needs 5·`k` < `dim` (JAX's LOBPCG), got k={k}, "
                     f"dim={dim}: use method='lanczos'.")
  x0 = host_rng(key).standard_normal((dim, k)).astype(dtype)
  # JAX's criterion: ‖K u − θ u‖ < tol' · 10 · dim · (θ + ‖K u‖) ≈ tol · θmax.
  theta, vecs, its = jax.jit(lambda x: lobpcg_standard(
      lambda v: matmat(v.T).T, x, m=max_vectors, tol=tol / (20 * dim)))(x0)
  its = int(its)
  return _finish(matmat, theta, vecs, None, tol, "lobpcg", its, k + 4 * k * its)


def top_eigenpairs(f: Callable[..., jax.Array], params: Any, x: Any, k: int, *,
                   method: str = "lanczos", tol: float | None = None,
                   max_vectors: int | None = None, start_vectors: int | None = None,
                   key: jax.Array | None = None, trainable: Any = None,
                   block_size: int | None = None,
                   model_kwargs: Mapping[str, Any] | None = None,
                   independent_samples: bool | None = None, matvec_batch: int | None = None,
                   progress: bool | None = None) -> Eigenpairs:
  """The ``k`` largest eigenpairs of the NTK of ``f`` on ``x``, without forming it.

  :func:`operator_top_eigenpairs` on ``v ↦ J (Jᵀ v)`` (:func:`ntk_matvec`) in the
  space of flattened outputs ``[N·O]`` (row ``n·O + o``): the eigenpairs of
  ``flatten(ntk_fn(f, trainable=trainable)(params, x))``.

  Args:
    f: ``f(params, x, **model_kwargs) -> [N, ...]``.
    params: parameters (a pytree).
    x: batch, a pytree of arrays ``[N, ...]``.
    k: number of pairs, ``1 <= k <= N·O``.
    method, tol, max_vectors, start_vectors, key, matvec_batch, progress: as for
      :func:`operator_top_eigenpairs`.
    trainable: optax-style mask like ``ntk_fn``'s; frozen leaves are excluded.
    block_size: ``None`` (one linearization of the batch) or tiles of ``b``
      examples (see :func:`ntk_matvec`); likewise ``model_kwargs`` and
      ``independent_samples``.

  Returns:
    An :class:`Eigenpairs`; ``eigenvectors[:, i].reshape(N, O)`` is the
    ``i``-th eigenfunction on the batch.

  Example:
    >>> import haiku as hk, jax, jax.numpy as jnp, ntklayers, ntklayers.metrics as nm
    >>> net = hk.without_apply_rng(hk.transform(
    ...     lambda x: ntklayers.Linear(2)(jnp.tanh(ntklayers.Linear(16)(x)))))
    >>> x = jax.random.normal(jax.random.key(0), (50, 3))
    >>> params = net.init(jax.random.key(1), x)
    >>> pairs = nm.top_eigenpairs(net.apply, params, x, 4, max_vectors=40)
    >>> pairs.eigenvectors.shape
    (100, 4)
    >>> exact = nm.eigvalsh(ntklayers.ntk_fn(net.apply)(params, x))[::-1][:4]
    >>> bool(jnp.allclose(pairs.eigenvalues, exact, rtol=1e-4))
    True
  """
  matvec, dim, dtype = model_operator(f, params, x, block_size=block_size,
                                      trainable=trainable, model_kwargs=model_kwargs,
                                      independent_samples=independent_samples,
                                      caller="top_eigenpairs")
  return operator_top_eigenpairs(matvec, dim, k, method=method, tol=tol,
                                 max_vectors=max_vectors, start_vectors=start_vectors,
                                 key=key, dtype=dtype, matvec_batch=matvec_batch,
                                 progress=progress)
