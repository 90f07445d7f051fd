"""Spectral density by stochastic Lanczos quadrature (Ubaru, Chen and Saad, SIMAX 2017).

``m`` Lanczos steps from each normalized Rademacher probe give a Gauss quadrature
(nodes ``θ_j``, weights ``τ_j``) of the probe's spectral measure; averaged over
probes they estimate the spectral density, and ``tr f(K) ≈ dim · mean Σ_j τ_j
f(θ_j)`` (exact per probe for polynomials of degree ``< 2m``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ntklayers.metrics._estimators import (MatVec, TraceEstimate, batched, check_key,
                                           check_operator, model_operator, probes,
                                           progress_bar, restart_vectors, summarize)
from ntklayers.metrics._lanczos import _apply, _positive_int


@dataclasses.dataclass(frozen=True)
class SpectralDensity:
  """Stochastic Lanczos quadrature of a spectrum, and its smoothed density.

  Attributes:
    nodes: ``[P, m]`` Gauss nodes (Ritz values) of each probe's quadrature.
    weights: ``[P, m]`` their weights (each row sums to 1).
    dim: size of the operator (``N·O``).
    grid: ``[G]`` points where ``density`` is given.
    density: ``[G]`` the quadrature smoothed by a Gaussian of width ``sigma``:
      ``mean_p Σ_j weights[p, j] · N(grid; nodes[p, j], sigma²)``, a fraction of
      the eigenvalues per unit of ``λ`` (it integrates to 1; times ``dim`` it
      counts eigenvalues).
    sigma: the Gaussian's standard deviation.
    matvecs: products with the operator.
  """
  nodes: np.ndarray
  weights: np.ndarray
  dim: int
  grid: np.ndarray
  density: np.ndarray
  sigma: float
  matvecs: int

  def smoothed(self, grid: Any, sigma: float) -> np.ndarray:
    """The density on another ``grid [G]`` with Gaussian width ``sigma > 0``."""
    return _smooth(self.nodes, self.weights, _check_grid(grid), _check_sigma(sigma))

  def trace(self, fn: Callable[[np.ndarray], np.ndarray]) -> TraceEstimate:
    """``tr fn(K)`` and its standard error over probes (``fn`` elementwise on nodes).

    Example:
      >>> import jax.numpy as jnp, ntklayers.metrics as nm
      >>> A = jnp.diag(jnp.arange(1., 101.))
      >>> sd = nm.operator_spectral_density(lambda v: A @ v, 100, num_probes=8)
      >>> round(sd.trace(lambda t: t).estimate / 5050, 1)   # tr A = 5050
      1.0
    """
    values = np.asarray(fn(self.nodes), np.float64)
    if values.shape != self.nodes.shape:
      raise ValueError(f"`fn` must map the nodes {list(self.nodes.shape)} elementwise, "
                       f"got shape {list(values.shape)}.")
    return summarize(self.dim * np.sum(self.weights * values, axis=1), 0.0, "slq",
                      self.matvecs)


def _check_sigma(sigma: Any) -> float:
  if isinstance(sigma, (bool, np.bool_)) or not isinstance(
      sigma, (int, float, np.floating, np.integer)) or not 0 < float(sigma) < np.inf:
    raise ValueError(f"`sigma` must be a positive float, got {sigma!r}.")
  return float(sigma)


def _check_grid(grid: Any) -> np.ndarray:
  grid = np.asarray(grid, np.float64)
  if grid.ndim != 1 or grid.size == 0 or not np.all(np.isfinite(grid)):
    raise ValueError(f"`grid` must be a non-empty 1-D array of finite values, got shape "
                     f"{list(grid.shape)}.")
  return grid


def _smooth(nodes: np.ndarray, weights: np.ndarray, grid: np.ndarray,
            sigma: float) -> np.ndarray:
  z = (grid[:, None, None] - nodes[None]) / sigma
  gauss = np.exp(-0.5 * z * z) / (sigma * np.sqrt(2 * np.pi))
  return np.einsum("gpm,pm->g", gauss, weights) / nodes.shape[0]


def _lanczos_quadrature(matvec: MatVec, dim: int, steps: int,
                        dtype: Any) -> Callable[[jax.Array], tuple[jax.Array, jax.Array]]:
  """Probes ``[b, dim]`` -> nodes and weights ``[b, steps]`` (jitted, vmapped)."""
  tiny = float(np.finfo(dtype).eps) * max(dim, 100) ** 0.5

  def one(v0: jax.Array) -> tuple[jax.Array, jax.Array]:

    def orth(basis, w):
      for _ in range(2):
        w = w - basis.T @ (basis @ w)
      return w

    def step(j, carry):
      basis, alpha, beta, scale = carry
      v = basis[j]
      w = _apply(matvec, v, dim).astype(dtype)
      a = jnp.vdot(v, w)
      scale = jnp.maximum(scale, jnp.linalg.norm(w))
      w = orth(basis, w)
      b = jnp.linalg.norm(w)
      broke = b <= tiny * scale  # an invariant subspace: later nodes get weight 0
      r = orth(basis, restart_vectors((1, dim), j, dtype)[0])
      nxt = jnp.where(broke, r / jnp.linalg.norm(r), w / jnp.where(broke, 1, b))
      basis = basis.at[j + 1].set(nxt, mode="drop")
      return basis, alpha.at[j].set(a), beta.at[j].set(jnp.where(broke, 0, b)), scale

    basis = jnp.zeros((steps, dim), dtype).at[0].set(v0 / jnp.sqrt(jnp.asarray(dim, dtype)))
    zeros = jnp.zeros((steps,), dtype)
    _, alpha, beta, _ = jax.lax.fori_loop(0, steps, step, (basis, zeros, zeros, zeros[0]))
    t = jnp.diag(alpha) + jnp.diag(beta[:-1], 1) + jnp.diag(beta[:-1], -1)
    theta, s = jnp.linalg.eigh(t)
    return theta, s[0] ** 2

  return jax.jit(jax.vmap(one))


def operator_spectral_density(matvec: MatVec, dim: int, *, num_probes: int = 16,
                              num_steps: int = 40, key: jax.Array | None = None,
                              sigma: float | None = None, grid: Any = None,
                              dtype: Any = None, matvec_batch: int | None = 8,
                              progress: bool | None = None) -> SpectralDensity:
  """Spectral density of a symmetric operator by stochastic Lanczos quadrature.

  Each Rademacher probe ``z / sqrt(dim)`` starts ``m = min(num_steps, dim)``
  Lanczos steps with full reorthogonalization; the eigenvalues of the ``[m, m]``
  tridiagonal matrix are the nodes and the squared first components of its
  eigenvectors the weights. Cost: ``num_probes · m`` products and
  ``O(matvec_batch · m · dim)`` memory.

  Args:
    matvec: symmetric ``v [dim] -> K v [dim]``, traceable by JAX.
    dim: size of the space.
    num_probes: probes ``P >= 1`` (the estimate's variance falls as ``1/P``).
    num_steps: Lanczos steps per probe ``m >= 1`` (nodes per probe).
    key: PRNG key of the probes (default ``jax.random.key(0)``).
    sigma: width of the Gaussian smoothing (default: 1% of the nodes' range).
    grid: ``[G]`` points of the smoothed density (default: 512 points from
      ``min − 3σ`` to ``max + 3σ`` of the nodes).
    dtype: float dtype of the vectors (default: JAX's default float).
    matvec_batch: probes run together (vmapped) per jitted call (``None``: all).
    progress: tqdm bar (``None``: on a terminal only).

  Returns:
    A :class:`SpectralDensity` (``nodes``, ``weights`` ``[P, m]``, the smoothed
    ``density`` on ``grid`` with its ``sigma``; NaN nodes when a product was
    not finite).

  Raises:
    ValueError: ``num_probes`` or ``num_steps`` not positive, bad ``sigma`` or
      ``grid``, ``matvec`` not mapping ``[dim]`` to ``[dim]``.

  Example:
    >>> import jax.numpy as jnp, numpy as np, ntklayers.metrics as nm
    >>> A = jnp.diag(jnp.linspace(0., 1., 200))
    >>> sd = nm.operator_spectral_density(lambda v: A @ v, 200, sigma=0.05)
    >>> sd.nodes.shape, round(float(np.trapezoid(sd.density, sd.grid)), 3)
    ((16, 40), 1.0)
  """
  dim, dtype = check_operator(matvec, dim, dtype)
  num_probes = _positive_int(num_probes, "num_probes")
  steps = min(_positive_int(num_steps, "num_steps"), dim)
  key = check_key(key)
  user_sigma = None if sigma is None else _check_sigma(sigma)
  user_grid = None if grid is None else _check_grid(grid)
  batch = num_probes if matvec_batch is None else _positive_int(matvec_batch, "matvec_batch")
  jax.eval_shape(batched(matvec, dim, dtype, None),  # checks matvec's shapes
                 jax.ShapeDtypeStruct((1, dim), dtype))
  quad = _lanczos_quadrature(matvec, dim, steps, dtype)
  nodes, weights = [], []
  with progress_bar(num_probes * steps, f"SLQ [{dim}]", progress) as bar:
    for i in range(0, num_probes, batch):
      b = min(batch, num_probes - i)
      theta, w = quad(probes(key, np.arange(i, i + b), dim, dtype))
      nodes.append(np.asarray(theta, np.float64))
      weights.append(np.asarray(w, np.float64))
      if bar is not None:
        bar.update(b * steps)
  nodes_a, weights_a = np.concatenate(nodes), np.concatenate(weights)
  finite = nodes_a[np.isfinite(nodes_a)]
  lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
  sigma_ = user_sigma if user_sigma is not None else (0.01 * (hi - lo) or 0.01 * abs(hi) or 1e-3)
  grid_ = (user_grid if user_grid is not None
           else np.linspace(lo - 3 * sigma_, hi + 3 * sigma_, 512))
  return SpectralDensity(nodes_a, weights_a, dim, grid_, _smooth(nodes_a, weights_a, grid_, sigma_),
                         sigma_, num_probes * steps)


def spectral_density(f: Callable[..., jax.Array], params: Any, x: Any, *,
                     num_probes: int = 16, num_steps: int = 40, key: jax.Array | None = None,
                     sigma: float | None = None, grid: Any = None, trainable: Any = None,
                     block_size: int | None = None,
                     model_kwargs: Mapping[str, Any] | None = None,
                     independent_samples: bool | None = None, matvec_batch: int | None = 8,
                     progress: bool | None = None) -> SpectralDensity:
  """Spectral density of the NTK of ``f`` on ``x`` by stochastic Lanczos quadrature.

  :func:`operator_spectral_density` on ``v ↦ J (Jᵀ v)`` (:func:`ntk_matvec`), in
  the space of flattened outputs ``[N·O]``.

  Args:
    f: ``f(params, x, **model_kwargs) -> [N, ...]``.
    params: parameters (a pytree).
    x: batch, a pytree of arrays ``[N, ...]``.
    num_probes, num_steps, key, sigma, grid, matvec_batch, progress: as for
      :func:`operator_spectral_density`.
    trainable: optax-style mask like ``ntk_fn``'s.
    block_size, model_kwargs, independent_samples: as for :func:`ntk_matvec`.

  Returns:
    A :class:`SpectralDensity` (plot it with ``ntklayers.plot.spectral_density``).

  Example:
    >>> import haiku as hk, jax, jax.numpy as jnp, ntklayers, ntklayers.metrics as nm
    >>> net = hk.without_apply_rng(hk.transform(
    ...     lambda x: ntklayers.Linear(2)(jnp.tanh(ntklayers.Linear(16)(x)))))
    >>> x = jax.random.normal(jax.random.key(0), (30, 3))
    >>> params = net.init(jax.random.key(1), x)
    >>> sd = nm.spectral_density(net.apply, params, x, num_probes=4, num_steps=20)
    >>> sd.nodes.shape, sd.dim
    ((4, 20), 60)
  """
  matvec, dim, dtype = model_operator(f, params, x, block_size=block_size,
                                      trainable=trainable, model_kwargs=model_kwargs,
                                      independent_samples=independent_samples,
                                      caller="spectral_density")
  return operator_spectral_density(matvec, dim, num_probes=num_probes, num_steps=num_steps,
                                   key=key, sigma=sigma, grid=grid, dtype=dtype,
                                   matvec_batch=matvec_batch, progress=progress)
