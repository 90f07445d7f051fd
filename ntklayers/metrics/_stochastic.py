"""Stochastic trace estimates from matrix-vector products: Hutchinson and Hutch++.

* Hutchinson: ``tr K ≈ mean_i zᵢᵀ K zᵢ`` over Rademacher probes ``zᵢ``, with
  the standard error of the mean over probes.
* Hutch++ (Meyer, Musco, Musco and Woodruff, SOSA 2021): a third of the
  products sketches the top of the spectrum, ``Q = orth(K S)``, whose trace
  ``tr(Qᵀ K Q)`` is exact; the rest estimates the trace of the deflated
  ``(I − QQᵀ) K (I − QQᵀ)`` by Hutchinson. On a kernel with a fast-decaying
  spectrum (NTKs) its variance is far below Hutchinson's at equal cost.

Probe ``i`` is drawn on the host from ``(key, i)``, so results do not depend
on ``matvec_batch``; probes are applied ``matvec_batch`` at a time in jitted
calls, and a progress bar follows the batches.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ntklayers.metrics._estimators import (MatVec, TraceEstimate, batched, check_key,
                                           check_operator, layer_masks, mask_tree,
                                           model_operator, probes, progress_bar, summarize)
from ntklayers.metrics._lanczos import _positive_int

_METHODS = ("hutch++", "hutchinson")


def _in_batches(fn: Callable[[np.ndarray], jax.Array], count: int, batch: int,
                bar: Any) -> np.ndarray:
  """``concat(fn(arange(i, i + b)))`` over batches (one compile per batch size)."""
  out = []
  for i in range(0, count, batch):
    b = min(batch, count - i)
    out.append(np.asarray(fn(np.arange(i, i + b))))
    if bar is not None:
      bar.update(b)
  return np.concatenate(out)


def operator_trace_estimate(matvec: MatVec, dim: int, *, method: str = "hutch++",
                            num_probes: int = 30, key: jax.Array | None = None,
                            dtype: Any = None, matvec_batch: int | None = 8,
                            progress: bool | None = None) -> TraceEstimate:
  """Hutchinson or Hutch++ estimate of ``tr K`` from ``num_probes`` products.

  Args:
    matvec: symmetric ``v [dim] -> K v [dim]``, traceable by JAX.
    dim: size of the space.
    method: ``"hutch++"`` (``num_probes // 3`` products sketch ``Q = orth(K S)``,
      as many give ``K Q``, the rest are Hutchinson probes of the deflated
      kernel) or ``"hutchinson"`` (every product is a probe).
    num_probes: products with ``K`` in all (the budget): ``>= 1``, ``>= 3`` for
      Hutch++.
    key: PRNG key of the Rademacher probes (default ``jax.random.key(0)``).
    dtype: float dtype of the vectors (default: JAX's default float).
    matvec_batch: products per jitted, vmapped call (``None``: all at once).
    progress: tqdm bar (``None``: on a terminal only).

  Returns:
    A :class:`TraceEstimate` (``estimate``, ``std_error``, per-probe ``samples``).

  Raises:
    ValueError: an unknown ``method``, ``num_probes`` too small, bad ``dim``.

  Example:
    >>> import jax.numpy as jnp, ntklayers.metrics as nm
    >>> A = jnp.diag(0.5 ** jnp.arange(300.))        # trace 2 - 2**-299
    >>> est = nm.operator_trace_estimate(lambda v: A @ v, 300, num_probes=30)
    >>> round(est.estimate, 2), est.std_error < 1e-2
    (2.0, True)
  """
  dim, dtype = check_operator(matvec, dim, dtype)
  if method not in _METHODS:
    raise ValueError(f"`method` must be one of {_METHODS}, got {method!r}.")
  num_probes = _positive_int(num_probes, "num_probes")
  if method == "hutch++" and num_probes < 3:
    raise ValueError(f"method='hutch++' needs `num_probes` >= 3 (a sketch, its product, "
                     f"and at least one probe), got {num_probes}.")
  key = check_key(key)
  matmat = batched(matvec, dim, dtype, matvec_batch)
  batch = num_probes if matvec_batch is None else _positive_int(matvec_batch, "matvec_batch")
  with progress_bar(num_probes, f"{method} trace [{dim}]", progress) as bar:
    if method == "hutchinson":
      samples = _in_batches(_quadratic_forms(matmat, key, dim, dtype, None), num_probes,
                            batch, bar)
      return summarize(samples, 0.0, method, num_probes)
    s = min(num_probes // 3, dim)
    run = jax.jit(matmat)
    sketch = _in_batches(lambda i: run(probes(key, i, dim, dtype, salt=1)), s, batch, bar)
    q64, _ = np.linalg.qr(sketch.astype(np.float64).T)  # [dim, s], on the host
    q = q64.astype(dtype)
    kq = _in_batches(lambda i: run(q[:, i].T), s, batch, bar)  # [s, dim]
    exact = float(np.sum(q.astype(np.float64).T * kq))
    samples = _in_batches(_quadratic_forms(matmat, key, dim, dtype, q),
                          num_probes - 2 * s, batch, bar)
    return summarize(samples, exact, method, num_probes)


def _quadratic_forms(matmat: Callable, key: jax.Array, dim: int, dtype: Any,
                     q: np.ndarray | None) -> Callable[[np.ndarray], jax.Array]:
  """Probe indices ``[b] -> yᵢᵀ K yᵢ [b]`` (``y = z``, or ``(I − QQᵀ) z``)."""
  def forms(q: Any, y: jax.Array) -> jax.Array:
    if q is not None:
      y = y - (y @ q) @ q.T
    return jnp.sum(y * matmat(y), axis=1)
  run = jax.jit(forms)
  return lambda idx: run(q, probes(key, idx, dim, dtype))


def trace_estimate(f: Callable[..., jax.Array], params: Any, x: Any, *,
                   method: str = "hutch++", num_probes: int = 30,
                   key: jax.Array | None = None, layerwise: bool = False,
                   group_fn: Callable[[tuple[Any, ...]], str | None] | None = None,
                   trainable: Any = None, block_size: int | None = None,
                   model_kwargs: Mapping[str, Any] | None = None,
                   independent_samples: bool | None = None, matvec_batch: int | None = 8,
                   progress: bool | None = None) -> Any:
  """Stochastic estimate of the trace of the NTK of ``f`` on ``x``, or of each layer's.

  :func:`operator_trace_estimate` on ``v ↦ J (Jᵀ v)`` (:func:`ntk_matvec`). A
  layer's component is the NTK of its parameters alone (``ntk_matvec`` with
  ``trainable`` selecting them), as ``ntk_fn(..., layerwise=True)`` splits the
  kernel; every layer uses the same probes (the same ``key``), so Hutchinson's
  layer estimates sum to the whole kernel's. The exact trace is also cheap:
  ``ntklayers.ntk_trace`` (linear in ``N``); the estimators are checks on
  matrix-free pipelines and serve any operator.

  Args:
    f: ``f(params, x, **model_kwargs) -> [N, ...]``.
    params: parameters (a pytree).
    x: batch, a pytree of arrays ``[N, ...]``.
    method, num_probes, key, matvec_batch, progress: as for
      :func:`operator_trace_estimate`.
    layerwise: return ``{layer: TraceEstimate}``.
    group_fn: ``path -> layer name or None`` for ``layerwise`` (e.g.
      ``ntklayers.init.module_path``); default: the leaf's path without its last
      key (``ntk_fn``'s layerwise names for parameters under a module).
    trainable: optax-style mask like ``ntk_fn``'s.
    block_size, model_kwargs, independent_samples: as for :func:`ntk_matvec`.

  Returns:
    A :class:`TraceEstimate`, or ``{layer: TraceEstimate}`` with ``layerwise``.

  Example:
    >>> import haiku as hk, jax, jax.numpy as jnp, ntklayers, ntklayers.metrics as nm
    >>> net = hk.without_apply_rng(hk.transform(
    ...     lambda x: ntklayers.Linear(2)(jnp.tanh(ntklayers.Linear(16)(x)))))
    >>> x = jax.random.normal(jax.random.key(0), (20, 3))
    >>> params = net.init(jax.random.key(1), x)
    >>> parts = nm.trace_estimate(net.apply, params, x, layerwise=True)
    >>> sorted(parts)
    ['linear', 'linear_1']
    >>> est = nm.trace_estimate(net.apply, params, x, num_probes=60)
    >>> exact = ntklayers.ntk_trace(net.apply, params, x)
    >>> abs(est.estimate - exact) < 4 * est.std_error + 1e-3 * exact
    True
  """
  if not isinstance(layerwise, (bool, np.bool_)):
    raise TypeError(f"`layerwise` must be a bool, got {layerwise!r}.")
  options: dict[str, Any] = dict(method=method, num_probes=num_probes, key=key,
                                 matvec_batch=matvec_batch, progress=progress)
  operator: dict[str, Any] = dict(block_size=block_size, model_kwargs=model_kwargs,
                                  independent_samples=independent_samples,
                                  caller="trace_estimate")
  if not layerwise:
    if group_fn is not None:
      raise ValueError("`group_fn` names layers: pass it with layerwise=True.")
    matvec, dim, dtype = model_operator(f, params, x, trainable=trainable, **operator)
    return operator_trace_estimate(matvec, dim, dtype=dtype, **options)
  out = {}
  for name, mask in layer_masks(params, trainable, group_fn).items():
    matvec, dim, dtype = model_operator(f, params, x, trainable=mask_tree(params, mask),
                                        **operator)
    out[name] = operator_trace_estimate(matvec, dim, dtype=dtype, **options)
  return out
