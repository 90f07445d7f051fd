"""Eigenvalues of NTKs: of a formed matrix, and matrix-free ``λmax`` by Lanczos.

:func:`symmetric_eigenvalues` serves every spectral metric of a formed kernel.
For kernels too large to form, the kernel ``Θ = J Jᵀ`` of a batch (``J`` the
Jacobian of the flattened outputs ``[N·O]`` with respect to the parameters) is
never formed: each Lanczos step applies ``v ↦ J (Jᵀ v)``, one VJP and one JVP
through the model (:func:`ntklayers._large._matvec.ntk_matvec`). By default the whole
batch is linearized once, so the operator is exact even when examples interact
(batch statistics); memory is ``O(num_iters · N·O)`` plus one linearization of
the model. With ``block_size=b`` the products run over tiles of ``b`` examples:
``O(num_iters · N·O)`` plus ``O(b)`` activations.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

# Also re-exported from here (`ntklayers.metrics._lanczos.ntk_matvec`, `metrics.ntk_matvec`).
from ntklayers._large import make_matvec


@jax.custom_jvp
def symmetric_eigenvalues(mat: jax.Array) -> jax.Array:
  """Ascending eigenvalues of a symmetric ``[M, M]`` matrix, without eigenvectors.

  Householder tridiagonalization (``lax.linalg.tridiagonal``, LAPACK ``sytrd``
  on CPU) then bisection on Sturm counts (``eigh_tridiagonal``), to absolute
  error ``eps·‖mat‖`` like LAPACK. On 2 CPU cores about half the time of
  ``jnp.linalg.eigvalsh``, which always forms the eigenvectors (``M = 640``,
  float32: 12 vs 27 ms; float64: 32 vs 37 ms). Differentiable: the tangent
  ``dλ_i = v_iᵀ dA v_i`` uses ``eigh``.
  """
  if mat.shape[0] <= 1:
    return mat.reshape(-1)
  _, d, e, _ = jax.lax.linalg.tridiagonal(mat, lower=True)
  return jnp.sort(jax.scipy.linalg.eigh_tridiagonal(d, e, eigvals_only=True))


@symmetric_eigenvalues.defjvp
def _symmetric_eigenvalues_jvp(primals, tangents):
  (mat,), (dmat,) = primals, tangents
  w, v = jnp.linalg.eigh(mat)
  return w, jnp.einsum("ij,ik,kj->j", v, dmat, v)


def _positive_int(value: Any, name: str) -> int:
  if (isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer))
      or value < 1):
    raise ValueError(f"`{name}` must be a positive int, got {value!r}.")
  return int(value)


def _check_key(key: Any) -> jax.Array:
  """A PRNG key: typed (``jax.random.key``) or raw ``uint32[2]`` (``PRNGKey``)."""
  dtype, shape = getattr(key, "dtype", None), getattr(key, "shape", None)
  typed = dtype is not None and jnp.issubdtype(dtype, jax.dtypes.prng_key)
  if not (typed and shape == () or dtype == jnp.uint32 and shape == (2,)):
    raise TypeError(f"`key` must be a PRNG key (jax.random.key(seed)) or None, got "
                    f"{type(key).__name__} of dtype {dtype} and shape {shape}.")
  return key


def _apply(matvec: Callable, v: jax.Array, dim: int) -> jax.Array:
  """``matvec(v)``, which must map ``[dim]`` to ``[dim]`` (errors name ``dim``)."""
  try:
    w = matvec(v)
  except Exception as e:  # pylint: disable=broad-except
    raise ValueError(f"`matvec` failed on a vector of shape [{dim}] (`dim`={dim}: is it "
                     f"the operator's size?): {type(e).__name__}: {e}") from e
  if getattr(w, "shape", None) != (dim,) or not jnp.issubdtype(w.dtype, jnp.number):
    raise ValueError(f"`matvec` must map [{dim}] (`dim`) to [{dim}], got "
                     f"{jax.tree.map(lambda a: f'{a.dtype}{list(a.shape)}', w)}.")
  return w


def lanczos_lambda_max(matvec: Callable[[jax.Array], jax.Array], dim: int, *,
                       num_iters: int = 32, key: jax.Array | None = None,
                       dtype: Any = None,
                       return_bound: bool = False) -> Any:
  """Largest eigenvalue of a symmetric linear operator by Lanczos iteration.

  Runs ``k = min(num_iters, dim)`` steps with full reorthogonalization (classical
  Gram-Schmidt, applied twice) in a ``lax.fori_loop`` of fixed length, so it is
  jittable. On breakdown (an invariant subspace, e.g. a low-rank kernel) it
  continues from a random vector orthogonal to the basis. The estimate is the
  largest eigenvalue ``θ`` of the ``[k, k]`` tridiagonal matrix; it never exceeds
  ``λmax`` and equals it (up to round-off) when ``k = dim``.

  Args:
    matvec: symmetric ``v [dim] -> A v [dim]``.
    dim: size of the vector space.
    num_iters: Lanczos steps (matvecs). Convergence is fast when ``λmax`` is
      separated from the rest of the spectrum; ``return_bound`` tells how close.
    key: PRNG key of the start vector (default ``jax.random.key(0)``).
    dtype: float dtype of the vectors (default: JAX's default float).
    return_bound: also return the residual norm ``‖A u − θ u‖`` of the Ritz
      vector ``u``, which bounds the distance from ``θ`` to an eigenvalue of ``A``.

  Returns:
    Scalar ``θ ≈ λmax``, or ``(θ, residual)`` if ``return_bound``; NaN (both)
    when a product was not finite (a kernel with NaN or inf).

  References:
    Golub and Van Loan, "Matrix Computations", 4th ed., §10.1 (Lanczos) and
    §10.3 (reorthogonalization).

  Example:
    >>> import jax.numpy as jnp, ntklayers.metrics as nm
    >>> A = jnp.diag(jnp.arange(1., 11.))
    >>> round(float(nm.lanczos_lambda_max(lambda v: A @ v, 10)), 4)
    10.0
  """
  if not callable(matvec):
    raise TypeError(f"`matvec` must be callable as matvec(v), got {type(matvec).__name__}.")
  dim = _positive_int(dim, "dim")
  num_iters = _positive_int(num_iters, "num_iters")
  if not isinstance(return_bound, (bool, np.bool_)):
    raise TypeError(f"`return_bound` must be a bool, got {return_bound!r}.")
  k = min(num_iters, dim)
  key = jax.random.key(0) if key is None else _check_key(key)
  dtype = jnp.dtype(jnp.result_type(float) if dtype is None else dtype)
  if not jnp.issubdtype(dtype, jnp.floating):
    raise ValueError(f"`dtype` must be a float dtype, got {dtype}.")
  tiny = jnp.finfo(dtype).eps * max(dim, 100) ** 0.5

  def orthogonalize(V, w):
    for _ in range(2):  # "twice is enough"
      w = w - V.T @ (V @ w)
    return w

  def step(j, carry):
    V, alpha, beta, scale = carry
    v = V[j]
    w = _apply(matvec, v, dim).astype(dtype)
    a = jnp.vdot(v, w)
    scale = jnp.maximum(scale, jnp.linalg.norm(w))
    w = orthogonalize(V, w)
    b = jnp.linalg.norm(w)
    broke = b <= tiny * scale
    r = orthogonalize(V, jax.random.normal(jax.random.fold_in(key, j + 1), (dim,), dtype))
    nxt = jnp.where(broke, r / jnp.linalg.norm(r), w / jnp.where(broke, 1, b))
    V = V.at[j + 1].set(nxt, mode="drop")  # dropped on the last step
    return V, alpha.at[j].set(a), beta.at[j].set(jnp.where(broke, 0, b)), scale

  v0 = jax.random.normal(key, (dim,), dtype)
  V = jnp.zeros((k, dim), dtype).at[0].set(v0 / jnp.linalg.norm(v0))
  zeros = jnp.zeros((k,), dtype)
  _, alpha, beta, _ = jax.lax.fori_loop(0, k, step, (V, zeros, zeros, zeros[0]))
  T = jnp.diag(alpha) + jnp.diag(beta[:-1], 1) + jnp.diag(beta[:-1], -1)
  evals, evecs = jnp.linalg.eigh(T)
  # A non-finite product anywhere makes the estimate NaN (eigh may otherwise
  # return the largest finite eigenvalue of a partly NaN matrix).
  finite = jnp.all(jnp.isfinite(alpha)) & jnp.all(jnp.isfinite(beta))
  theta = jnp.where(finite, evals[-1], jnp.nan)
  if return_bound:
    return theta, jnp.where(finite, jnp.abs(beta[-1] * evecs[-1, -1]), jnp.nan)
  return theta


def lambda_max_matrix_free(f: Callable[..., jax.Array], params: Any, x: Any, *,
                           num_iters: int = 32, key: jax.Array | None = None,
                           trainable: Any = None, return_bound: bool = False,
                           block_size: int | None = None,
                           model_kwargs: Mapping[str, Any] | None = None,
                           independent_samples: bool | None = None) -> Any:
  """``λmax`` of the NTK of ``f`` on the batch ``x`` without forming the kernel.

  Lanczos (:func:`lanczos_lambda_max`) on ``v ↦ J (Jᵀ v)`` in the space of
  flattened outputs ``[N·O]``: the same ``λmax`` as
  ``lambda_max(ntk_fn(f, trainable=trainable)(params, x))`` of the
  ``[N, N, O, O]`` kernel, at the cost of ``num_iters`` VJP/JVP pairs and
  ``O(num_iters · N·O)`` memory instead of ``(N·O)²``. Jittable (close over
  ``f``). For the MSE loss ``1/N Σ ½‖f − y‖²`` the stability bound is
  ``2·N / λmax``; other losses weigh the kernel by the loss's output Hessian (see
  :func:`max_stable_lr` and its ``loss``; ``ntklayers.optax.step_size_guard``
  does both matrix-free).

  Args:
    f: ``f(params, x, **model_kwargs) -> [N, ...]``.
    params: parameters (a pytree).
    x: batch (a pytree of arrays ``[N, ...]``).
    num_iters: Lanczos steps (capped at ``N·O``).
    key: PRNG key of the start vector (default ``jax.random.key(0)``).
    trainable: optax-style mask like ``ntk_fn``'s (pytree of bools, a prefix of
      ``params``, or a callable returning one); frozen leaves are excluded.
    return_bound: also return the Ritz residual norm (see
      :func:`lanczos_lambda_max`).
    block_size: ``None`` (one linearization of the whole batch) or ``b``: each
      matvec runs over tiles of ``b`` examples, so memory holds ``O(b)``
      activations instead of ``O(N)``; requires examples proven independent from
      the program, eagerly and under ``jax.jit`` alike (see :func:`ntk_matvec`),
      else ``InteractingExamplesError``.
    model_kwargs: keyword arguments of ``f`` (default none), as in :func:`ntk_matvec`.
    independent_samples: ``None`` proves that tiles are exact; ``True`` promises
      it (skips the proof); ``False`` refuses ``block_size`` (see :func:`ntk_matvec`).

  Returns:
    Scalar ``λmax`` in the output dtype, or ``(λmax, residual)``.

  Example:
    >>> import haiku as hk, jax, jax.numpy as jnp, ntklayers, ntklayers.metrics as nm
    >>> net = hk.without_apply_rng(hk.transform(lambda x: ntklayers.Linear(2)(x)))
    >>> x = jnp.arange(12.).reshape(4, 3) / 10
    >>> params = net.init(jax.random.key(0), x)
    >>> lam = nm.lambda_max_matrix_free(net.apply, params, x)
    >>> K = ntklayers.ntk_fn(net.apply)(params, x)
    >>> bool(jnp.isclose(lam, nm.lambda_max(K), rtol=1e-4))
    True
  """
  matvec, dim, dtype = make_matvec(f, params, x, block_size=block_size,
                                   trainable=trainable, model_kwargs=model_kwargs,
                                   independent_samples=independent_samples,
                                   caller="lambda_max_matrix_free")
  return lanczos_lambda_max(matvec, dim, num_iters=num_iters, key=key, dtype=dtype,
                            return_bound=return_bound)
