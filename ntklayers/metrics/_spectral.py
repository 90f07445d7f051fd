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
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from ntklayers.metrics._lanczos import symmetric_eigenvalues

Kernels = Any  # an array, or a dict {name: array} from ``ntk_fn(layerwise=True)``

_LAYOUT = (
    "`{fn}` expects a kernel in ntk_fn's full layout: [N1, N2], [N1, N2, O, O] or "
    "generally [N1, N2, A, A, C, C, ...]; got shape {shape}. Kernels computed with "
    "`diagonal_axes` ([N, O, O] for diagonal_axes=(0,), [N1, N2, O] for "
    "diagonal_axes=(-1,)) do not hold the full matrix: recompute with "
    "diagonal_axes=(), or use `trace(K, diagonal_axes=...)`.")
LOSSES = ("mean", "sum", "elementwise_mean")


def _kernel(K: ArrayLike) -> jax.Array:
  K = jnp.asarray(K)
  return K if jnp.issubdtype(K.dtype, jnp.inexact) else K.astype(jnp.result_type(float))


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
    ValueError: if ``diagonal_axes`` is not empty or the shape is not
      ``[N1, N2, (A, A)*]``.

  Example:
    >>> import jax.numpy as jnp, ntklayers.metrics as nm
    >>> nm.flatten(jnp.zeros((4, 4, 3, 3))).shape
    (12, 12)
  """
  K = _kernel(K)
  shape, nd = K.shape, K.ndim
  if _axes(diagonal_axes) or nd < 2 or nd % 2 or any(
      shape[i] != shape[i + 1] for i in range(2, nd, 2)):
    raise ValueError(_LAYOUT.format(fn="flatten", shape=shape))
  perm = [0, *range(2, nd, 2), 1, *range(3, nd, 2)]
  m = math.prod(shape[2::2])
  return jnp.transpose(K, perm).reshape(shape[0] * m, shape[1] * m)


def _square(K: ArrayLike, diagonal_axes, fn: str) -> jax.Array:
  try:
    mat = flatten(K, diagonal_axes=diagonal_axes)
  except ValueError:
    raise ValueError(_LAYOUT.format(fn=fn, shape=jnp.shape(K))) from None
  if mat.shape[0] != mat.shape[1]:
    raise ValueError(f"`{fn}` needs a square kernel K(x, x) (N1 == N2); got shape "
                     f"{jnp.shape(K)}.")
  return mat


def eigvalsh(K: ArrayLike, *, diagonal_axes: int | Sequence[int] = ()) -> jax.Array:
  """Eigenvalues of the symmetrized flattened kernel ``(K + Kᵀ)/2``, ascending.

  Args:
    K: ``[N, N, O, O]``, ``[N, N]`` or ``[N, N, A, A, C, C, ...]``.
    diagonal_axes: must be empty (see :func:`flatten`).

  Returns:
    ``[N·O]`` eigenvalues in ascending order.

  Example:
    >>> import jax.numpy as jnp, ntklayers.metrics as nm
    >>> [round(v, 6) for v in nm.eigvalsh(jnp.diag(jnp.array([3., 1., 2.]))).tolist()]
    [1.0, 2.0, 3.0]
  """
  return _spectrum(K, diagonal_axes, "eigvalsh")


def _spectrum(K: ArrayLike, diagonal_axes, fn: str) -> jax.Array:
  mat = _square(K, diagonal_axes, fn)
  return symmetric_eigenvalues((mat + mat.T) / 2)


def lambda_max(K: ArrayLike, *, diagonal_axes: int | Sequence[int] = ()) -> jax.Array:
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
  return _spectrum(K, diagonal_axes, "lambda_max")[-1]


def lambda_min(K: ArrayLike, *, diagonal_axes: int | Sequence[int] = ()) -> jax.Array:
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
  return _spectrum(K, diagonal_axes, "lambda_min")[0]


def condition_number(K: ArrayLike, *,
                     diagonal_axes: int | Sequence[int] = ()) -> jax.Array:
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
    Scalar ``κ >= 1``, or ``inf``.

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
  ev = _spectrum(K, diagonal_axes, "condition_number")
  lo, hi = ev[0], ev[-1]
  return jnp.where(lo <= 0, jnp.inf, hi / jnp.where(lo <= 0, 1, lo))


def trace(K: ArrayLike, *, diagonal_axes: int | Sequence[int] = ()) -> jax.Array:
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
  K = _kernel(K)
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
  return jnp.einsum("".join(letters) + "->", K)


def effective_rank(K: ArrayLike, *,
                   diagonal_axes: int | Sequence[int] = ()) -> jax.Array:
  """Effective rank ``exp(-Σ p_i log p_i)`` with ``p = λ⁺ / Σ λ⁺``, ``λ⁺ = max(λ, 0)``.

  Between 1 (one dominant direction) and ``N·O`` (flat spectrum); 0 for a zero
  kernel.

  References:
    Roy and Vetterli, "The effective rank: a measure of effective
    dimensionality", EUSIPCO 2007.

  Example:
    >>> import jax.numpy as jnp, ntklayers.metrics as nm
    >>> round(float(nm.effective_rank(jnp.eye(5))), 6)
    5.0
  """
  ev = jnp.clip(_spectrum(K, diagonal_axes, "effective_rank"), 0)
  total = jnp.sum(ev)
  p = ev / jnp.where(total > 0, total, 1)
  entropy = -jnp.sum(jnp.where(p > 0, p * jnp.log(jnp.where(p > 0, p, 1)), 0))
  return jnp.where(total > 0, jnp.exp(entropy), 0)


def max_stable_lr(K: ArrayLike, *, loss: str = "mean",
                  diagonal_axes: int | Sequence[int] = ()) -> jax.Array:
  """Largest stable learning rate of full-batch gradient descent on MSE.

  For ``L = (c/2) Σ_{n,o} (f_o(x_n) − y_no)²`` the linearized dynamics are
  ``f_{t+1} − y = (I − η c Θ)(f_t − y)`` (``Θ`` the flattened ``[N·O, N·O]``
  kernel), which converge iff ``|1 − η c λ_i| < 1`` for all ``i``, i.e.
  ``η < 2 / (c λmax)``:

  * ``loss="mean"``: ``L = 1/N Σ_n ½‖f(x_n) − y_n‖²``, ``c = 1/N``: ``η < 2N/λmax``;
  * ``loss="sum"``: ``L = Σ_n ½‖f(x_n) − y_n‖²``, ``c = 1``: ``η < 2/λmax``;
  * ``loss="elementwise_mean"``: ``optax.l2_loss(f, y).mean()``, ``c = 1/(N·O)``:
    ``η < 2NO/λmax``.

  Args:
    K: kernel ``[N, N, O, O]`` (or ``[N, N]``, general full layout).
    loss: the loss normalization, as above.
    diagonal_axes: must be empty (see :func:`flatten`).

  Losses without the ½ (``optax.squared_error``) halve the bound. Use the full
  ``[N, N, O, O]`` kernel of the batch being trained on; for ``[N, N]`` kernels
  ``O = 1``. For Adam or cross-entropy this is only a heuristic. A nonlinear
  model above the bound first moves away from the minimum; it then diverges or
  "catapults" to flatter params whose own bound is ``η`` (the edge of stability;
  Lewkowycz et al. 2020, Cohen et al. 2021; ``tests/test_optax.py``).

  Returns:
    Scalar bound (``inf`` for a zero kernel).

  References:
    Lee et al., "Wide neural networks of any depth evolve as linear models under
    gradient descent", NeurIPS 2019 (η_critical).

  Example:
    >>> import jax.numpy as jnp, ntklayers.metrics as nm
    >>> float(nm.max_stable_lr(4 * jnp.eye(8)))  # 2 * 8 / 4
    4.0
  """
  if loss not in LOSSES:
    raise ValueError(f"`loss` must be one of {LOSSES}, got {loss!r}.")
  ev = _spectrum(K, diagonal_axes, "max_stable_lr")
  n, m = jnp.shape(K)[0], ev.shape[0]
  scale = {"mean": n, "sum": 1, "elementwise_mean": m}[loss]
  hi = ev[-1]
  return jnp.where(hi > 0, 2 * scale / jnp.where(hi > 0, hi, 1), jnp.inf)
