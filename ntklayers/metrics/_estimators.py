"""Matrix-free spectral estimators of NTKs: what they share.

Every estimator sees the kernel only through products ``v ↦ K v`` on the
flattened outputs ``[N·O]`` (row ``n·O + o``): an operator-level form
(``operator_top_eigenpairs``, ``operator_trace_estimate``,
``operator_spectral_density``) takes a jittable ``matvec`` and its ``dim``; a
model-level form builds it with :func:`ntklayers.metrics.ntk_matvec` (whole
batch, or tile by tile with ``block_size``). Products are applied
``matvec_batch`` at a time (vmapped, by ``lax.map``) inside jitted loops; the
host checks convergence and moves a progress bar (tqdm, optional:
``progress=None`` shows one on a terminal only). Random vectors (probes, start
vectors) are drawn on the host from the PRNG key: a threefry program costs
seconds to compile on a CPU, and probe ``i`` stays the same whatever the
batching.

* ``_eigenpairs.py``: top-k eigenpairs (block Lanczos, LOBPCG);
* ``_stochastic.py``: Hutchinson and Hutch++ traces, per layer;
* ``_slq.py``: stochastic Lanczos quadrature of the spectral density.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ntklayers import _core
from ntklayers import _progress
from ntklayers._large import make_matvec
from ntklayers.metrics._lanczos import _apply, _check_key, _positive_int

MatVec = Callable[[jax.Array], jax.Array]
MatMat = Callable[[jax.Array], jax.Array]  # [b, dim] -> [b, dim], one product per row


# --- shared checks and helpers ---------------------------------------------------------

@contextlib.contextmanager
def progress_bar(total: int, desc: str, progress: Any) -> Iterator[Any]:
  """A tqdm bar (``None``: on a terminal only; ``True``: always; tqdm optional)."""
  if progress is not None and not isinstance(progress, (bool, np.bool_)):
    raise TypeError(f"`progress` must be None, True or False, got {progress!r}.")
  with _progress.progress_bar(total, desc, None if progress is None else bool(progress),
                              unit="matvec") as bar:
    yield bar


def check_key(key: Any) -> jax.Array:
  """A PRNG key (default ``jax.random.key(0)``)."""
  return jax.random.key(0) if key is None else _check_key(key)


def host_rng(key: jax.Array, *salt: int) -> np.random.Generator:
  """A NumPy generator seeded by ``key`` and ``salt`` (random numbers on the host
  cost no compilation; a threefry program takes seconds to compile on a CPU)."""
  data = jax.random.key_data(key) if jnp.issubdtype(key.dtype, jax.dtypes.prng_key) else key
  return np.random.default_rng(np.random.SeedSequence(
      [int(d) for d in np.asarray(data).ravel()] + [int(s) for s in salt]))


def restart_vectors(shape: tuple[int, int], j: jax.Array, dtype: Any) -> jax.Array:
  """Deterministic pseudo-random vectors ``shape`` for Lanczos restarts at step ``j``
  (a hash of the indices: full support, generic, no PRNG in the jitted loop)."""
  i = jnp.arange(shape[0] * shape[1], dtype=dtype).reshape(shape)
  h = jnp.sin(i * 12.9898 + (j + 1).astype(dtype) * 78.233) * 43758.5453
  return h - jnp.floor(h) - 0.5


def check_tol(tol: Any, dtype: Any) -> float:
  """``tol`` in ``(0, 1)``; ``None``: ``sqrt(eps)`` of ``dtype``."""
  if tol is None:
    return float(np.sqrt(np.finfo(dtype).eps))
  if isinstance(tol, (bool, np.bool_)) or not isinstance(tol, (int, float, np.floating)) or not (
      0 < float(tol) < 1):
    raise ValueError(f"`tol` must be a float in (0, 1) or None, got {tol!r}.")
  return float(tol)


def check_operator(matvec: Any, dim: Any, dtype: Any) -> tuple[int, np.dtype]:
  """``(dim, dtype)`` of an operator-level call; ``matvec`` must be callable."""
  if not callable(matvec):
    raise TypeError(f"`matvec` must be callable as matvec(v), got {type(matvec).__name__}.")
  dim = _positive_int(dim, "dim")
  dtype = np.dtype(jnp.result_type(float) if dtype is None else dtype)
  if not np.issubdtype(dtype, np.floating):
    raise ValueError(f"`dtype` must be a float dtype, got {dtype}.")
  return dim, dtype


def batched(matvec: MatVec, dim: int, dtype: Any, matvec_batch: Any) -> MatMat:
  """``V [b, dim] -> [matvec(v) for v in V]``, ``matvec_batch`` products at a time
  (vmapped; ``None``: all rows at once); jittable."""
  if matvec_batch is not None:
    matvec_batch = _positive_int(matvec_batch, "matvec_batch")

  def one(v: jax.Array) -> jax.Array:
    return _apply(matvec, v, dim).astype(dtype)

  def matmat(vs: jax.Array) -> jax.Array:
    if matvec_batch is None or matvec_batch >= vs.shape[0]:
      return jax.vmap(one)(vs)
    return jax.lax.map(one, vs, batch_size=matvec_batch)

  return matmat


def model_operator(f: Any, params: Any, x: Any, *, block_size: Any, trainable: Any,
                   model_kwargs: Any, independent_samples: Any,
                   caller: str) -> tuple[MatVec, int, Any]:
  """``(matvec, dim, dtype)`` of the NTK of ``f`` on ``x`` (errors name ``caller``)."""
  return make_matvec(f, params, x, block_size=block_size, trainable=trainable,
                     model_kwargs=model_kwargs, independent_samples=independent_samples,
                     caller=caller)


def _key_name(k: Any) -> str:
  return str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k))))


def layer_masks(params: Any, trainable: Any, group_fn: Any) -> dict[str, list[bool]]:
  """``{layer: bool per leaf}`` for the trainable leaves of each layer.

  The default layers are those of ``ntk_fn(..., layerwise=True)``: a leaf's path
  in ``params`` without its last key (``"linear"`` for Haiku's
  ``{"linear": {"w", "b"}}``, ``"params/Dense_0"`` for linen), ``"params"`` for
  leaves at the root. ``group_fn(path) -> name or None`` (e.g.
  ``ntklayers.init.module_path``) overrides it; ``None`` leaves a leaf out.
  """
  if group_fn is not None and not callable(group_fn):
    raise TypeError(f"`group_fn` must be None or a callable of a key path, got "
                    f"{type(group_fn).__name__}.")
  paths = [p for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
  train = _core.resolve_trainable(trainable, params)
  groups: dict[str, list[bool]] = {}
  for i, (path, t) in enumerate(zip(paths, train)):
    if group_fn is None:
      name = "/".join(_key_name(k) for k in path[:-1]) or "params"
    else:
      name = group_fn(path)
      if name is not None and not isinstance(name, str):
        raise TypeError(f"`group_fn` must return a str or None, got {name!r} for leaf "
                        f"{jax.tree_util.keystr(path)}.")
    if name is None or not t:
      continue
    groups.setdefault(name, [False] * len(paths))[i] = True
  if not groups:
    raise ValueError("No trainable parameters: every leaf of `params` is masked out by "
                     "`trainable` (or `group_fn`).")
  return groups


def mask_tree(params: Any, mask: list[bool]) -> Any:
  return jax.tree.unflatten(jax.tree.structure(params), mask)


@dataclasses.dataclass(frozen=True)
class TraceEstimate:
  """A stochastic estimate of a trace and its standard error.

  Attributes:
    estimate: the trace estimate.
    std_error: standard error over the probes (sample standard deviation of
      ``samples`` over ``sqrt(len(samples))``; NaN with one probe). For Hutch++
      the sketched part is exact, so only its probes' spread counts.
    method: ``"hutchinson"``, ``"hutch++"`` or ``"slq"``.
    samples: ``[num probes]`` per-probe values whose mean (plus ``exact_part``)
      is ``estimate``.
    exact_part: Hutch++'s ``tr(Qᵀ K Q)`` (0 otherwise).
    matvecs: products with the operator.
  """
  estimate: float
  std_error: float
  method: str
  samples: np.ndarray
  exact_part: float
  matvecs: int

  def __float__(self) -> float:
    return self.estimate


def summarize(samples: np.ndarray, exact: float, method: str, matvecs: int) -> TraceEstimate:
  samples = np.asarray(samples, np.float64)
  err = (float(np.std(samples, ddof=1) / np.sqrt(samples.size)) if samples.size > 1
         else float("nan"))
  return TraceEstimate(exact + float(np.mean(samples)), err, method, samples, exact, matvecs)

def probes(key: jax.Array, idx: np.ndarray, dim: int, dtype: Any, salt: int = 0) -> jax.Array:
  """Rademacher probes ``[len(idx), dim]``, probe ``i`` drawn from ``(key, salt, i)``."""
  out = np.empty((len(idx), dim), np.int8)
  for row, i in enumerate(idx):
    out[row] = host_rng(key, salt, int(i)).integers(0, 2, dim, dtype=np.int8) * 2 - 1
  return jnp.asarray(out.astype(dtype))
