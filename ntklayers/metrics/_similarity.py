"""Kernel comparisons: kernel-target alignment and the relative kernel change.

Pure, jittable; kernels are read by the flattening rule of
:func:`ntklayers.metrics.flatten`. A non-finite kernel (or target) gives NaN;
layerwise dicts give dicts.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from ntklayers.metrics._spectral import Kernels, Values, _kernel, _per_layer, _square
from ntklayers.metrics._spectral import finite, nan_unless


def default_num_classes(y: Any, num_classes: int | None,
                        out_shape: Sequence[int] | None) -> int | None:
  """``num_classes`` for integer labels ``[N]`` when not given: the model's ``O``.

  The rule of ``check_trainability`` and the monitor: labels ``[N]`` of a model
  with outputs ``[N, O]`` are one-hot over ``O`` classes; otherwise unchanged.
  """
  if num_classes is not None or y is None or out_shape is None or len(out_shape) != 2:
    return num_classes
  y = jnp.asarray(y)
  if jnp.issubdtype(y.dtype, jnp.integer) and y.ndim == 1:
    return int(out_shape[-1])
  return num_classes


def _targets(y: ArrayLike, n: int, m: int, num_classes: int | None, dtype) -> jax.Array:
  """Target matrix ``Y [M, k]`` with ``Y Yᵀ`` matched to the flattened kernel."""
  y = jnp.asarray(y)
  if jnp.issubdtype(y.dtype, jnp.integer) or y.dtype == bool:
    if num_classes is None:
      if y.ndim == 1:
        raise ValueError("`alignment`: integer labels need `num_classes` (one-hot "
                         "encoding); pass float targets for regression.")
      y = y.astype(dtype)
    else:
      y = jax.nn.one_hot(y, num_classes, dtype=dtype)
  elif num_classes is not None:
    raise ValueError(f"`num_classes` is for integer labels; got {y.dtype} targets.")
  if y.ndim == 0 or y.shape[0] != n:
    raise ValueError(f"`alignment`: `y` must have the kernel's batch size {n} on axis 0; "
                     f"got shape {y.shape}.")
  y = y.astype(dtype)
  if y.size == m:
    return y.reshape(m, 1)
  if m == n:
    return y.reshape(n, -1)
  raise ValueError(f"`alignment`: targets of shape {y.shape} match neither the "
                   f"flattened kernel's {m} rows (outputs) nor its {n} examples.")


def alignment(K: Kernels, y: ArrayLike, centered: bool = False, *,
              num_classes: int | None = None,
              diagonal_axes: int | Sequence[int] = ()) -> Values:
  """Kernel-target alignment ``⟨K, T⟩_F / (‖K‖_F ‖T‖_F)`` with ``T = Y Yᵀ``.

  ``y`` is integer labels ``[N]`` (with ``num_classes``: one-hot), one-hot or
  soft labels ``[N, C]``, or regression targets ``[N]`` / ``[N, O]``. Matching to
  the flattened ``[M, M]`` kernel: if ``y`` has ``M`` entries (``[N, O]`` against
  ``[N, N, O, O]``; ``[N]`` against ``[N, N]``) then ``Y = vec(y) [M, 1]``, row
  ``n·O + o``, the targets gradient descent fits; otherwise, for an ``[N, N]``
  kernel (``trace_axes=(-1,)``), ``Y = y [N, C]`` and ``T_ij = ⟨y_i, y_j⟩``
  (``1[label_i = label_j]`` for one-hot labels). ``centered=True`` replaces
  ``K, T`` by ``HKH, HTH`` with ``H = I − 11ᵀ/M`` (Cortes et al.). A zero
  (centered) kernel or target, e.g. a single class when centered, gives NaN, and
  so does a kernel or target with a NaN or an inf. A layerwise dict gives the
  alignment of each layer's component, ``{name: []}``.

  Args:
    K: ``[N, N, O, O]``, ``[N, N]`` or the general full layout.
    y: labels or targets as above.
    centered: use the centered alignment.
    num_classes: number of classes for integer labels.
    diagonal_axes: must be empty (see :func:`flatten`).

  Returns:
    Scalar in ``[-1, 1]`` (``[0, 1]`` uncentered for a PSD kernel), or NaN.

  References:
    Cristianini et al., "On kernel-target alignment", NeurIPS 2002. Cortes,
    Mohri, Rostamizadeh, "Algorithms for learning kernels based on centered
    alignment", JMLR 2012.

  Example:
    >>> import jax.numpy as jnp, ntklayers.metrics as nm
    >>> labels = jnp.array([0, 1, 0])
    >>> K = jnp.eye(2)[labels] @ jnp.eye(2)[labels].T  # [N, N], ideal kernel
    >>> round(float(nm.alignment(K, labels, num_classes=2)), 6)
    1.0
  """
  if isinstance(K, Mapping):
    return _per_layer(alignment, K, y=y, centered=centered, num_classes=num_classes,
                      diagonal_axes=diagonal_axes)
  mat = _square(K, diagonal_axes, "alignment")
  m, n = mat.shape[0], jnp.shape(K)[0]
  Y = _targets(y, n, m, num_classes, mat.dtype)
  ok = finite(mat) & finite(Y)
  mat = jnp.where(ok, mat, jnp.zeros_like(mat))
  Y = jnp.where(ok, Y, jnp.zeros_like(Y))
  T = Y @ Y.T
  mat = (mat + mat.T) / 2
  norm_k, norm_t = jnp.linalg.norm(mat), jnp.linalg.norm(T)
  if centered:
    H = jnp.eye(m, dtype=mat.dtype) - 1 / m
    mat, T = H @ mat @ H, H @ T @ H
  # Centering leaves round-off (not 0) where nothing survives: treat it as 0 -> NaN.
  tol = jnp.finfo(mat.dtype).eps * m
  nk = jnp.where(jnp.linalg.norm(mat) > tol * norm_k, jnp.linalg.norm(mat), jnp.nan)
  nt = jnp.where(jnp.linalg.norm(T) > tol * norm_t, jnp.linalg.norm(T), jnp.nan)
  return nan_unless(ok, jnp.sum(mat * T) / (nk * nt))


def relative_change(K_t: Kernels, K_0: Kernels) -> Kernels:
  """Relative kernel change ``‖K_t − K_0‖_F / ‖K_0‖_F`` (lazy vs rich training).

  Any layout; dicts from ``ntk_fn(..., layerwise=True)`` (or any matching
  pytrees) give a dict of per-layer changes. Near 0: lazy (kernel) regime. NaN
  when either kernel has a NaN or an inf.

  References:
    Chizat, Oyallon, Bach, "On lazy training in differentiable programming",
    NeurIPS 2019; Fort et al., "Deep learning versus kernel learning", 2020.

  Example:
    >>> import jax.numpy as jnp, ntklayers.metrics as nm
    >>> K0 = {"w": jnp.ones((2, 2)), "b": jnp.ones((2, 2))}
    >>> Kt = {"w": 2 * jnp.ones((2, 2)), "b": jnp.ones((2, 2))}
    >>> {k: float(v) for k, v in nm.relative_change(Kt, K0).items()}
    {'b': 0.0, 'w': 1.0}
  """
  def rel(a, b):
    a, b = _kernel(a), _kernel(b)
    if a.shape != b.shape:
      raise ValueError(f"`relative_change`: shapes differ, {a.shape} vs {b.shape}.")
    return nan_unless(finite(a) & finite(b),
                      jnp.linalg.norm((a - b).ravel()) / jnp.linalg.norm(b.ravel()))

  try:
    return jax.tree.map(rel, K_t, K_0)
  except ValueError as e:
    if str(e).startswith("`relative_change`"):
      raise
    keys = lambda k: sorted(k) if isinstance(k, Mapping) else jax.tree.structure(k)
    raise ValueError(f"`relative_change`: K_t and K_0 differ in structure: "
                     f"{keys(K_t)} vs {keys(K_0)}.") from e
