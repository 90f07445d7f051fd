"""Closed-form gradient flow on the MSE loss: ``gradient_descent_mse``, ``max_learning_rate``.

Conventions (neural-tangents 0.6.5): the loss is ``0.5 · mean((f - y)²)`` over all
``y_train.size`` entries, so the train outputs follow
``f(t) = y + exp(-η t K / size) (f(0) - y)`` and the test outputs
``f_test(t) = f_test(0) + K_td K⁻¹ (I - exp(-η t K / size)) (y - f(0))``, with
``K`` regularized by ``diag_reg`` (relative to the mean diagonal unless
``diag_reg_absolute_scale``).
"""

from __future__ import annotations

import functools
import math
from typing import Any, Protocol

import jax
import jax.numpy as jnp
import jax.scipy.linalg as jsl
import numpy as np

from ntklayers.predict import _checks as C
from ntklayers.predict._layout import Axes, Layout, shape_str
from ntklayers.predict._operators import KernelOperator
from ntklayers.predict._solvers import lanczos_extreme

HIGHEST = jax.lax.Precision.HIGHEST


class PredictFn(Protocol):
  """``predict_fn(t, fx_train_0, fx_test_0, k_test_train)`` of :func:`gradient_descent_mse`."""

  def __call__(self, t: Any = None, fx_train_0: Any = 0., fx_test_0: Any = None,
               k_test_train: Any = None) -> Any:
    ...


def regularize(k2: jax.Array, diag_reg: Any, absolute: bool) -> jax.Array:
  """``K + diag_reg · I`` (``diag_reg`` times the mean diagonal unless ``absolute``)."""
  m = k2.shape[0]
  reg = jnp.asarray(diag_reg, k2.dtype)
  if not absolute:
    reg = reg * jnp.trace(k2) / m
  return k2 + reg * jnp.eye(m, dtype=k2.dtype)


@functools.partial(jax.jit, static_argnames=("absolute",))
def _eigh(k2: jax.Array, diag_reg: float, absolute: bool) -> tuple[jax.Array, jax.Array]:
  return jnp.linalg.eigh(regularize(k2, diag_reg, absolute))


@functools.partial(jax.jit, static_argnames=("absolute",))
def _cholesky(k2: jax.Array, diag_reg: float, absolute: bool) -> tuple[jax.Array, jax.Array]:
  c, _ = jsl.cho_factor(regularize(k2, diag_reg, absolute), lower=True)
  return c, jnp.isfinite(c).all()


class Factorization:
  """Lazily computed, cached factorizations of the regularized ``[M, M]`` kernel.

  ``eigh()`` (for finite times) and ``cholesky()`` (for ``t=None``) are each
  computed at most once, eagerly even when first requested under ``jax.jit`` of
  the returned ``predict_fn`` (``jax.ensure_compile_time_eval``), and checked for
  positive (semi)definiteness when concrete.
  """

  def __init__(self, k2: jax.Array, diag_reg: float, absolute: bool, name: str):
    self.k2, self.diag_reg, self.absolute, self.name = k2, diag_reg, absolute, name
    self._eigh: tuple[jax.Array, jax.Array] | None = None
    self._cho: tuple[jax.Array, bool] | None = None

  def eigh(self) -> tuple[jax.Array, jax.Array]:
    """``(evals [M], evecs [M, M])`` of the regularized kernel."""
    if self._eigh is None:
      with jax.ensure_compile_time_eval():
        evals, evecs = _eigh(self.k2, self.diag_reg, self.absolute)
      C.check_psd(evals, self.name, self.diag_reg, self.k2.dtype)
      self._eigh = (evals, evecs)
    return self._eigh

  def cholesky(self) -> tuple[jax.Array, bool]:
    """Cholesky factor (``jax.scipy.linalg.cho_factor``) of the regularized kernel."""
    if self._cho is None:
      with jax.ensure_compile_time_eval():
        c, finite = _cholesky(self.k2, self.diag_reg, self.absolute)
      if C.is_concrete(finite) and not bool(finite):
        evals, _ = self.eigh()  # raises NotPositiveSemidefiniteError if indefinite
        raise C.NotPositiveSemidefiniteError(
            f"`{self.name}` (with diag_reg={self.diag_reg}) is singular to working "
            f"precision: smallest eigenvalue {float(evals.min()):.4g}, largest "
            f"{float(evals.max()):.4g}. Pass `diag_reg` > 0.")
      self._cho = (c, True)
    return self._cho

  def solve(self, b2: jax.Array) -> jax.Array:
    """``(K + reg I)⁻¹ b`` for ``b [M, k]`` by Cholesky."""
    return jsl.cho_solve(self.cholesky(), b2)


def spectral_weights(evals: jax.Array, s: jax.Array) -> tuple[jax.Array, jax.Array]:
  """``(expm1(-λ s), expm1(-λ s) / λ)`` on ``[T, M]`` for times ``s [T]``.

  Eigenvalues below round-off (``λ <= M · eps · max|λ|``, negative ones included)
  are treated as zero and contribute nothing to either (as neural-tangents does
  for negative eigenvalues; it returns NaN for exact zeros).
  """
  m = evals.shape[0]
  eps = float(np.finfo(np.dtype(evals.dtype)).eps)
  cutoff = m * eps * jnp.max(jnp.abs(evals))
  pos = evals > cutoff
  lam = jnp.where(pos, evals, 1.0)[None, :]
  s = s[:, None]
  x = jnp.where(pos[None, :], -lam * s, 0.0)
  e = jnp.expm1(x)
  return e, jnp.where(pos[None, :], e / lam, 0.0)


@functools.partial(jax.jit, static_argnames=("layout", "rows", "dtype"))
def _predict_inf(layout: Layout, rows: tuple[int, ...] | None, dtype: Any, cho: jax.Array,
                 y: jax.Array, fx_train_0: Any, fx_test_0: Any, k_test_train: Any) -> Any:
  """Test outputs ``f_test(0) + K_td K⁻¹ (y - f(0))`` at ``t = ∞``."""
  assert rows is not None
  rhs = layout.targets_2d(y - C.broadcast_to(fx_train_0, y.shape, "fx_train_0", dtype))
  ktd2 = layout.kernel_2d(k_test_train, "k_test_train").astype(dtype)
  d = jnp.matmul(ktd2, jsl.cho_solve((cho, True), rhs), precision=HIGHEST)
  ft0 = C.broadcast_to(fx_test_0, layout.out_shape(rows), "fx_test_0", dtype)
  return ft0 + layout.outputs(d, rows)


@functools.partial(jax.jit, static_argnames=("layout", "rows", "dtype"))
def _predict_finite(layout: Layout, rows: tuple[int, ...] | None, dtype: Any,
                    evals: jax.Array, evecs: jax.Array, y: jax.Array, t: jax.Array,
                    fx_train_0: Any, fx_test_0: Any, k_test_train: Any) -> Any:
  """Train and test outputs at (learning-rate-scaled) times ``t`` from the eigenbasis."""
  s = t.reshape(-1) / layout.size
  e_train, e_test = spectral_weights(evals, s)
  f0 = C.broadcast_to(fx_train_0, y.shape, "fx_train_0", dtype)
  p = jnp.matmul(evecs.T, layout.targets_2d(f0 - y), precision=HIGHEST)
  fx_test = None
  d = jnp.einsum("ij,tj,jc->tic", evecs, e_train, p, precision=HIGHEST)
  fx_train = (f0.reshape((1,) * t.ndim + f0.shape) +
              layout.outputs(d, layout.kept_shape, lead=1).reshape(t.shape + y.shape))
  if fx_test_0 is not None and rows is not None:
    ktd2 = layout.kernel_2d(k_test_train, "k_test_train").astype(dtype)
    ft0 = C.broadcast_to(fx_test_0, layout.out_shape(rows), "fx_test_0", dtype)
    ku = jnp.matmul(ktd2, evecs, precision=HIGHEST)
    d = jnp.einsum("ij,tj,jc->tic", ku, e_test, p, precision=HIGHEST)
    fx_test = (ft0.reshape((1,) * t.ndim + ft0.shape) +
               layout.outputs(d, rows, lead=1).reshape(t.shape + ft0.shape))
  return fx_train, fx_test


def gradient_descent_mse(k_train_train: Any, y_train: Any, learning_rate: float = 1.,
                         diag_reg: float = 0., diag_reg_absolute_scale: bool = False,
                         trace_axes: Axes = (-1,)) -> PredictFn:
  r"""Outputs of gradient flow on the MSE loss, in closed form, at any times ``t``.

  neural-tangents' ``predict.gradient_descent_mse``: the network linearized at
  initialization and trained by continuous-time gradient descent with
  learning rate ``η`` on ``0.5 · mean((f(x_train) - y_train)²)`` has train
  outputs ``y + exp(-η t K / y.size)(f(0) - y)`` and test outputs
  ``f_test(0) + K_td K⁻¹ (I - exp(-η t K / y.size))(y - f(0))`` (``K`` =
  ``k_train_train`` + ``diag_reg`` on the diagonal). One eigendecomposition of
  ``K`` serves every finite ``t`` (computed on the first call, then cached);
  ``t=None`` uses a (cached) Cholesky solve and returns ``y_train`` as the train
  outputs.

  Kernel layouts: ``y_train [N, O]`` with ``trace_axes=(-1,)`` takes a kernel
  ``[N_train, N_train]`` (``Θ ⊗ I`` over the outputs); ``trace_axes=()`` the full
  ``[N_train, N_train, O, O]`` kernel of ``ntklayers.ntk_fn``. In general the
  kernel has the non-traced axes of ``y_train`` twice, interleaved.

  Args:
    k_train_train: train-train kernel, ``[N_train, N_train]`` (``trace_axes=(-1,)``)
      or ``[N_train, N_train, O, O]`` (``trace_axes=()``); symmetric, PSD.
    y_train: targets ``[N_train, O]`` (any ``[N_train, ...]``).
    learning_rate: ``η > 0``; times are in units of ``η`` (``η t`` is what counts).
    diag_reg: ``>= 0``, added to the kernel's diagonal.
    diag_reg_absolute_scale: ``True``: ``diag_reg`` in absolute units; ``False``:
      times the mean of the kernel's (flattened) diagonal.
    trace_axes: axes of ``y_train`` that the kernel lacks (never 0).

  Returns:
    ``predict_fn(t=None, fx_train_0=0., fx_test_0=None, k_test_train=None)``
    returning ``fx_train_t`` (``[*t.shape, N_train, O]``), ``fx_test_t``
    (``[*t.shape, N_test, O]``, when ``fx_train_0`` is None) or both as a tuple.
    ``t``: scalar or array of times ``>= 0`` (``None`` = infinity);
    ``fx_train_0`` / ``fx_test_0``: outputs at ``t = 0`` (broadcast to the target
    shapes; ``None`` skips that set); ``k_test_train``: ``[N_test, N_train]``
    or ``[N_test, N_train, O, O]``, needed with ``fx_test_0``.

  Raises:
    ValueError: mismatched shapes, a non-symmetric kernel, negative ``t``, bad
      ``learning_rate`` / ``diag_reg``; ``NotPositiveSemidefiniteError`` (a
      ``ValueError``) for an indefinite kernel (or a singular one at ``t=None``).

  Example:
    >>> import jax.numpy as jnp, ntklayers.predict as npr
    >>> k = jnp.array([[2., 1.], [1., 2.]])
    >>> y = jnp.array([[1.], [-1.]])
    >>> predict_fn = npr.gradient_descent_mse(k, y)
    >>> predict_fn(t=jnp.array([0., 1e9]), fx_train_0=0.)[:, :, 0]
    Array([[ 0.,  0.],
           [ 1., -1.]], dtype=float64)
    >>> k_test_train = jnp.array([[1., 0.5]])
    >>> predict_fn(None, 0., 0., k_test_train)[1]
    Array([[0.5]], dtype=float64)
  """
  lr = C.check_learning_rate(learning_rate)
  reg = C.check_diag_reg(diag_reg)
  y_train = C.check_array(y_train, "y_train")
  k_train_train = C.check_array(k_train_train, "k_train_train")
  layout = Layout(y_train.shape, trace_axes)
  dtype = C.float_dtype(k_train_train.dtype)
  k2 = jnp.asarray(layout.kernel_2d(k_train_train, "k_train_train", square=True), dtype)
  C.check_symmetric(k2, "k_train_train")
  y = jnp.asarray(y_train).astype(dtype)
  fact = Factorization(k2, reg, bool(diag_reg_absolute_scale), "k_train_train")

  def predict_fn(t: Any = None, fx_train_0: Any = 0., fx_test_0: Any = None,
                 k_test_train: Any = None) -> Any:
    C.check_outputs(fx_train_0, fx_test_0, k_test_train)
    rows = None
    if fx_test_0 is not None:
      rows = layout.check_kernel(k_test_train, "k_test_train", square=False)
    else:
      k_test_train = None
    # `fx_train_0=None` computes as 0 (neural-tangents' convention), discarded afterwards:
    # one compiled program serves both cases.
    f0 = 0. if fx_train_0 is None else fx_train_0
    if t is None:
      fx_train, fx_test = y, None
      if fx_test_0 is not None:
        fx_test = _predict_inf(layout, rows, dtype, fact.cholesky()[0], y, f0, fx_test_0,
                               k_test_train)
    else:
      t = C.check_times(t, dtype)
      evals, evecs = fact.eigh()
      fx_train, fx_test = _predict_finite(layout, rows, dtype, evals, evecs, y, t * lr, f0,
                                          fx_test_0, k_test_train)
    if fx_test_0 is None:
      return fx_train
    if fx_train_0 is None:
      return fx_test
    return fx_train, fx_test

  return predict_fn


def max_learning_rate(ntk_train_train: Any, y_train_size: int | None = None,
                      momentum: float = 0., eps: float = 1e-12) -> float:
  r"""Largest stable learning rate of (momentum) gradient descent on the MSE loss.

  neural-tangents' formula for the loss ``0.5 · mean((f - y)²)`` over
  ``y_train_size`` entries: ``2 (1 + momentum) · y_train_size / (λmax + eps)``,
  where ``λmax`` is the largest eigenvalue of the (flattened) kernel.

  Args:
    ntk_train_train: NTK on the training set, ``[N_train, N_train]`` or
      ``[N_train, N_train, O, O]`` (flattened to ``[N_train·O, N_train·O]``);
      or a :class:`KernelOperator` (``λmax`` by Lanczos, to relative accuracy
      ``1e-10``).
    y_train_size: ``y_train.size``; ``None`` takes the flattened kernel's side
      (right for ``trace_axes=()``; for an ``[N, N]`` kernel of ``O > 1`` outputs
      pass ``N · O``).
    momentum: momentum coefficient (``0`` for plain gradient descent).
    eps: added to ``λmax`` against division by zero.

  Returns:
    The learning rate, a Python float (a JAX scalar under a trace).

  Example:
    >>> import jax.numpy as jnp, ntklayers.predict as npr
    >>> round(npr.max_learning_rate(jnp.array([[3., 1.], [1., 3.]])), 9)  # 2·2 / 4
    1.0
  """
  mom = C.check_real_scalar(momentum, "momentum")
  eps = C.check_real_scalar(eps, "eps", nonnegative=True)
  if isinstance(ntk_train_train, KernelOperator):
    m = ntk_train_train.dim
    lam_max: Any = lanczos_extreme(ntk_train_train, tol=1e-10)
  else:
    k = C.check_array(ntk_train_train, "ntk_train_train")
    if k.ndim % 2 or k.ndim < 2:
      raise ValueError(f"`ntk_train_train` must have an even number of axes "
                       f"([N, N] or [N, N, O, O]), got shape {shape_str(k.shape)}.")
    half = k.shape[0::2]
    if tuple(k.shape[1::2]) != tuple(half):
      raise ValueError(f"`ntk_train_train` of shape {shape_str(k.shape)} is not square "
                       "(expected [N, N, O, O, ...]).")
    m = math.prod(half)
    nd = k.ndim
    if C.is_concrete(k):
      k2 = np.asarray(k).transpose(tuple(range(0, nd, 2)) + tuple(range(1, nd, 2)))
      k2 = k2.reshape(m, m).astype(np.float64)
      C.check_symmetric(k2, "ntk_train_train")
      lam_max = float(np.linalg.eigvalsh(k2)[-1])
    else:
      k2 = jnp.transpose(k, tuple(range(0, nd, 2)) + tuple(range(1, nd, 2))).reshape(m, m)
      lam_max = jnp.linalg.eigvalsh(k2)[-1]
  if y_train_size is None:
    factor = m
  else:
    if isinstance(y_train_size, bool) or not isinstance(y_train_size, (int, np.integer)) or (
        y_train_size < 1):
      raise ValueError(f"`y_train_size` must be a positive int or None, got {y_train_size!r}.")
    factor = int(y_train_size)
  return 2 * (1 + mom) * factor / (lam_max + eps)
