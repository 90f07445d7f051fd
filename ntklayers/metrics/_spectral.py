"""Spectral and alignment metrics of NTKs: pure, jittable functions of a kernel.

Flattening rule. ``ntk_fn`` returns kernels in neural-tangents' interleaved
layout: ``[N1, N2]`` (scalar outputs or ``trace_axes=(-1,)``), ``[N1, N2, O, O]``
for outputs ``[N, O]``, generally ``[N1, N2, A, A, C, C, ...]``. Every metric reads
it as the matrix ``[N1·A·C·..., N2·A·C·...]`` whose row ``n·O + o`` (row-major
over ``(n, a, c, ...)``) is example ``n``, output ``o``: the Gram matrix ``J Jᵀ``
of the Jacobian of the flattened outputs. Kernels with ``diagonal_axes`` (``[N,
O, O]`` for ``(0,)``, ``[N1, N2, O]`` for ``(-1,)``) do not hold that matrix and
cannot always be told apart by shape (``[N1, N2, A, B]`` may be either), so
functions take the ``diagonal_axes`` given to ``ntk_fn``; only :func:`trace` and
:func:`relative_change` accept diagonal layouts, the others raise.

Non-finite kernels. A kernel with a NaN or an inf anywhere (an off-diagonal entry
included) gives NaN for every metric (every eigenvalue for :func:`eigvalsh`): a
``jnp.where`` on one all-finite flag, so it stays jittable. No metric returns a
finite number, ``0`` or ``inf`` for such a kernel.

Layerwise dicts. Every metric also takes the ``{name: kernel}`` dict of
``ntk_fn(..., layerwise=True)`` and returns ``{name: value}``, the metric of each
layer's component (per-layer traces sum to the model's trace; the other metrics
are not additive: the model's value is the metric of ``sum(K.values())``).
:func:`flatten` (one matrix) and ``max_stable_lr`` (the model's bound is that of
the sum) refuse dicts.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from ntklayers.metrics._lanczos import symmetric_eigenvalues

Kernels = Any  # an array, or a dict {name: array} from ``ntk_fn(layerwise=True)``
Values = Any  # a metric's value: an array, or {name: array} for a layerwise dict

_LAYOUT = (
    "`{fn}` expects a kernel in ntk_fn's full layout: [N1, N2], [N1, N2, O, O] or "
    "generally [N1, N2, A, A, C, C, ...]; got shape {shape}. Kernels computed with "
    "`diagonal_axes` ([N, O, O] for diagonal_axes=(0,), [N1, N2, O] for "
    "diagonal_axes=(-1,)) do not hold the full matrix: recompute with "
    "diagonal_axes=(), or use `trace(K, diagonal_axes=...)`.")


def _kernel(K: ArrayLike, fn: str = "metrics") -> jax.Array:
  if isinstance(K, Mapping):
    raise ValueError(f"`{fn}` takes one kernel array, got a dict with keys "
                     f"{sorted(K)} (ntk_fn(..., layerwise=True)?): pass one layer's "
                     f"kernel, or the model's, sum(K.values()).")
  K = jnp.asarray(K)
  return K if jnp.issubdtype(K.dtype, jnp.inexact) else K.astype(jnp.result_type(float))


def _per_layer(fn: Callable[..., Any], K: Mapping[str, Any], **kwargs: Any) -> dict:
  """``{name: fn(kernel, **kwargs)}`` of a layerwise dict (an empty one is refused)."""
  if not K:
    raise ValueError(f"`{fn.__name__}`: the layerwise kernel dict is empty.")
  return {name: fn(k, **kwargs) for name, k in K.items()}


def finite(x: jax.Array) -> jax.Array:
  """``[]`` bool: every entry of ``x`` is finite (no NaN, no ±inf)."""
  return jnp.all(jnp.isfinite(x))


def nan_unless(ok: jax.Array, value: jax.Array) -> jax.Array:
  """``value`` where ``ok``, else NaN of its dtype (jittable)."""
  return jnp.where(ok, value, jnp.full_like(value, jnp.nan))


def _axes(diagonal_axes: int | Sequence[int]) -> tuple[int, ...]:
  return (diagonal_axes,) if isinstance(diagonal_axes, int) else tuple(diagonal_axes)


def flatten(K: ArrayLike, *, diagonal_axes: int | Sequence[int] = ()) -> jax.Array:
  """Reshapes a kernel to the matrix ``[N1·A·C·..., N2·A·C·...]``.

  ``[N1, N2, O, O] -> [N1·O, N2·O]`` with row ``n·O + o``; ``[N1, N2]`` as is;
  ``[N1, N2, A, A, C, C] -> [N1·A·C, N2·A·C]``.

  Args:
    K: kernel from ``ntk_fn`` with ``diagonal_axes=()``.
    diagonal_axes: the ``diagonal_axes`` the kernel was computed with; must be
      empty (diagonal layouts do not hold the full matrix).

  Returns:
    The flattened ``[N1·M, N2·M]`` matrix (``M`` = product of the output sizes).

  Raises:
    ValueError: if ``diagonal_axes`` is not empty, the shape is not
      ``[N1, N2, (A, A)*]``, or ``K`` is a layerwise dict (flatten each value).

  Example:
    >>> import jax.numpy as jnp, ntklayers.metrics as nm
    >>> nm.flatten(jnp.zeros((4, 4, 3, 3))).shape
    (12, 12)
  """
  K = _kernel(K, "flatten")
  shape, nd = K.shape, K.ndim
  if _axes(diagonal_axes) or nd < 2 or nd % 2 or any(
      shape[i] != shape[i + 1] for i in range(2, nd, 2)):
    raise ValueError(_LAYOUT.format(fn="flatten", shape=shape))
  perm = [0, *range(2, nd, 2), 1, *range(3, nd, 2)]
  m = math.prod(shape[2::2])
  return jnp.transpose(K, perm).reshape(shape[0] * m, shape[1] * m)


def _square(K: ArrayLike, diagonal_axes, fn: str) -> jax.Array:
  K = _kernel(K, fn)
  try:
    mat = flatten(K, diagonal_axes=diagonal_axes)
  except ValueError:
    raise ValueError(_LAYOUT.format(fn=fn, shape=jnp.shape(K))) from None
  if mat.shape[0] != mat.shape[1]:
    raise ValueError(f"`{fn}` needs a square kernel K(x, x) (N1 == N2); got shape "
                     f"{jnp.shape(K)}.")
  return mat


def eigvalsh(K: Kernels, *, diagonal_axes: int | Sequence[int] = ()) -> Values:
  """Eigenvalues of the symmetrized flattened kernel ``(K + Kᵀ)/2``, ascending.

  Args:
    K: ``[N, N, O, O]``, ``[N, N]`` or ``[N, N, A, A, C, C, ...]``.
    diagonal_axes: must be empty (see :func:`flatten`).

  Returns:
    ``[N·O]`` eigenvalues in ascending order (all NaN for a non-finite kernel),
    or ``{name: [N·O]}`` for a layerwise dict.

  Example:
    >>> import jax.numpy as jnp, ntklayers.metrics as nm
    >>> [round(v, 6) for v in nm.eigvalsh(jnp.diag(jnp.array([3., 1., 2.]))).tolist()]
    [1.0, 2.0, 3.0]
  """
  if isinstance(K, Mapping):
    return _per_layer(eigvalsh, K, diagonal_axes=diagonal_axes)
  return _spectrum(K, diagonal_axes, "eigvalsh")


def eigen(mat: jax.Array) -> jax.Array:
  """Ascending eigenvalues of ``(mat + matᵀ)/2``, all NaN if ``mat`` is not finite.

  The eigensolver never sees a non-finite matrix (it gets zeros instead), so its
  cost and result do not depend on where the NaN sits.
  """
  ok = finite(mat)
  ev = symmetric_eigenvalues(jnp.where(ok, (mat + mat.T) / 2, jnp.zeros_like(mat)))
  return nan_unless(ok, ev)


def _spectrum(K: ArrayLike, diagonal_axes, fn: str) -> jax.Array:
  return eigen(_square(K, diagonal_axes, fn))


def lambda_max(K: Kernels, *, diagonal_axes: int | Sequence[int] = ()) -> Values:
  """Largest eigenvalue ``λmax`` of the flattened ``[N·O, N·O]`` kernel (scalar).

  For kernels too large to form, see :func:`lambda_max_matrix_free`. Shapes and
  ``diagonal_axes`` as in :func:`eigvalsh`.

  References:
    Lee et al. 2019 (``η_critical = 2N/λmax``, see :func:`max_stable_lr`).

  Example:
    >>> import jax.numpy as jnp, ntklayers.metrics as nm
    >>> float(nm.lambda_max(jnp.diag(jnp.array([3., 1.]))))
    3.0
  """
  if isinstance(K, Mapping):
    return _per_layer(lambda_max, K, diagonal_axes=diagonal_axes)
  return _spectrum(K, diagonal_axes, "lambda_max")[-1]


def lambda_min(K: Kernels, *, diagonal_axes: int | Sequence[int] = ()) -> Values:
  """Smallest eigenvalue ``λmin`` of the flattened ``[N·O, N·O]`` kernel (scalar).

  ``0`` (up to round-off) when ``N·O`` exceeds the number of parameters.

  References:
    Xiao, Pennington, Schoenholz, "Disentangling trainability and
    generalization in deep neural networks", ICML 2020.

  Example:
    >>> import jax.numpy as jnp, ntklayers.metrics as nm
    >>> round(float(nm.lambda_min(jnp.diag(jnp.array([3., 1.])))), 6)
    1.0
  """
  if isinstance(K, Mapping):
    return _per_layer(lambda_min, K, diagonal_axes=diagonal_axes)
  return _spectrum(K, diagonal_axes, "lambda_min")[0]


def condition_number(K: Kernels, *,
                     diagonal_axes: int | Sequence[int] = ()) -> Values:
  """Condition number ``κ = λmax / λmin`` of the flattened kernel.

  This is the convention of TE-NAS (Chen et al. 2021) and Xiao et al. (2020);
  torchNTK reports the inverse ``λmin / λmax``. Policy: if ``λmin <= 0`` (a
  singular kernel, e.g. ``N·O > P`` parameters, or one made indefinite by
  round-off) the result is ``inf``, never a substitute constant; a NaN kernel
  gives NaN. Round-off can also leave a singular kernel with a tiny positive
  ``λmin`` and a huge finite ``κ`` (about ``1/eps``): compare against
  :func:`effective_rank` or use float64.

  Args:
    K: ``[N, N, O, O]``, ``[N, N]`` or the general full layout.
    diagonal_axes: must be empty (see :func:`flatten`).

  Returns:
    Scalar ``κ >= 1``, ``inf``, or NaN for a non-finite kernel.

  References:
    Chen, Gong, Wang, "Neural architecture search on ImageNet in four GPU hours:
    a theoretically inspired perspective" (TE-NAS), ICLR 2021.

  Example:
    >>> import jax.numpy as jnp, ntklayers.metrics as nm
    >>> round(float(nm.condition_number(jnp.diag(jnp.array([4., 1.])))), 6)
    4.0
    >>> float(nm.condition_number(jnp.diag(jnp.array([4., -1.]))))  # indefinite
    inf
  """
  if isinstance(K, Mapping):
    return _per_layer(condition_number, K, diagonal_axes=diagonal_axes)
  ev = _spectrum(K, diagonal_axes, "condition_number")
  lo, hi = ev[0], ev[-1]
  kappa = jnp.where(lo <= 0, jnp.inf, hi / jnp.where(lo <= 0, 1, lo))
  return nan_unless(~jnp.isnan(hi), kappa)


def trace(K: Kernels, *, diagonal_axes: int | Sequence[int] = ()) -> Values:
  """Trace ``tr Θ = Σ_{n,o} ‖∂f_o(x_n)/∂θ‖²`` (a sum of eigenvalues).

  Works on every layout: ``[N, N, O, O]`` and ``[N, N]`` as well as diagonal ones
  given the ``diagonal_axes`` used by ``ntk_fn`` (``[N, O, O]`` with ``(0,)``,
  ``[N, N, O]`` with ``(-1,)``; axes count among the kernel's output axes).
  A ``trace_axes=(-1,)`` kernel averages over ``O``, so its trace is ``1/O`` of
  the full kernel's.

  References:
    Shu et al., "NASI: label- and data-agnostic neural architecture search at
    initialization", ICLR 2022 (trace norm).

  Example:
    >>> import jax.numpy as jnp, ntklayers.metrics as nm
    >>> float(nm.trace(jnp.ones((2, 2, 3, 3))))
    6.0
    >>> float(nm.trace(jnp.ones((2, 3, 3)), diagonal_axes=(0,)))
    6.0
  """
  if isinstance(K, Mapping):
    return _per_layer(trace, K, diagonal_axes=diagonal_axes)
  K = _kernel(K, "trace")
  diag = _axes(diagonal_axes)
  rank2 = K.ndim + len(diag)
  if rank2 % 2 or rank2 < 2:
    raise ValueError(f"`trace`: shape {K.shape} does not fit diagonal_axes={diag}.")
  rank = rank2 // 2
  if any(not -rank <= a < rank for a in diag):
    raise ValueError(f"`trace`: diagonal_axes={diag} out of range for a kernel of "
                     f"{rank} output axes (batch included), shape {K.shape}.")
  diag_set = {a % rank for a in diag}
  letters, i = [], 0
  for axis, c in zip(range(rank), "abcdefghijklmnopqrstuvwxyz"):
    if axis in diag_set:
      letters.append(c)
      i += 1
    else:
      if K.shape[i] != K.shape[i + 1]:
        raise ValueError(f"`trace` needs matching axes ({i}, {i + 1}) in shape "
                         f"{K.shape} (diagonal_axes={tuple(diag_set)}).")
      letters += [c, c]
      i += 2
  return nan_unless(finite(K), jnp.einsum("".join(letters) + "->", K))


def effective_rank(K: Kernels, *,
                   diagonal_axes: int | Sequence[int] = ()) -> Values:
  """Effective rank ``exp(-Σ p_i log p_i)`` with ``p = λ⁺ / Σ λ⁺``, ``λ⁺ = max(λ, 0)``.

  Between 1 (one dominant direction) and ``N·O`` (flat spectrum); 0 for a zero
  kernel; NaN for a non-finite one.

  References:
    Roy and Vetterli, "The effective rank: a measure of effective
    dimensionality", EUSIPCO 2007.

  Example:
    >>> import jax.numpy as jnp, ntklayers.metrics as nm
    >>> round(float(nm.effective_rank(jnp.eye(5))), 6)
    5.0
  """
  if isinstance(K, Mapping):
    return _per_layer(effective_rank, K, diagonal_axes=diagonal_axes)
  spectrum = _spectrum(K, diagonal_axes, "effective_rank")
  ev = jnp.clip(spectrum, 0)
  total = jnp.sum(ev)
  p = ev / jnp.where(total > 0, total, 1)
  entropy = -jnp.sum(jnp.where(p > 0, p * jnp.log(jnp.where(p > 0, p, 1)), 0))
  return nan_unless(~jnp.isnan(spectrum[-1]), jnp.where(total > 0, jnp.exp(entropy), 0))
