"""Argument checks of ``ntklayers.predict``: clear errors naming the argument and shapes.

Checks that need values (signs, symmetry, definiteness) run only on concrete
arrays; under a trace (inside ``jax.jit`` of the whole construction) they are
skipped.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ntklayers.predict._layout import shape_str


class NotPositiveSemidefiniteError(ValueError):
  """A kernel that must be positive (semi)definite is not (beyond round-off)."""


def is_concrete(*xs: Any) -> bool:
  """Whether none of ``xs`` is a tracer of an ongoing JAX trace."""
  return not any(isinstance(x, jax.core.Tracer) for x in xs)


def float_dtype(*dtypes: Any) -> Any:
  """The kernel's float dtype (integer kernels: JAX's default float)."""
  dt = np.dtype(dtypes[0])
  if not np.issubdtype(dt, np.floating):
    dt = np.dtype(jnp.result_type(float))
  return jax.dtypes.canonicalize_dtype(dt)


def check_real_scalar(x: Any, name: str, *, positive: bool = False,
                      nonnegative: bool = False) -> float:
  """A finite real Python/NumPy scalar (not a bool); its value."""
  if isinstance(x, bool) or not isinstance(x, (int, float, np.integer, np.floating)) and not (
      isinstance(x, (np.ndarray, jax.Array)) and np.shape(x) == () and is_concrete(x)):
    raise TypeError(f"`{name}` must be a real scalar, got {type(x).__name__} {x!r}.")
  v = float(x)
  if not math.isfinite(v):
    raise ValueError(f"`{name}` must be finite, got {v}.")
  if positive and not v > 0:
    raise ValueError(f"`{name}` must be > 0, got {v}.")
  if nonnegative and not v >= 0:
    raise ValueError(f"`{name}` must be >= 0, got {v}.")
  return v


def check_learning_rate(learning_rate: Any) -> float:
  return check_real_scalar(learning_rate, "learning_rate", positive=True)


def check_diag_reg(diag_reg: Any) -> float:
  return check_real_scalar(diag_reg, "diag_reg", nonnegative=True)


def check_momentum(momentum: Any) -> float | None:
  if momentum is None:
    return None
  m = check_real_scalar(momentum, "momentum")
  if not 0 <= m < 1:
    raise ValueError(f"`momentum` must be in [0, 1) (or None for plain gradient descent), "
                     f"got {m}.")
  return m


def check_array(x: Any, name: str) -> Any:
  """``x`` as an array with a batch axis."""
  if not isinstance(x, (np.ndarray, jax.Array)):
    try:
      x = np.asarray(x)
    except Exception as e:  # pylint: disable=broad-except
      raise TypeError(f"`{name}` must be an array, got {type(x).__name__}.") from e
  if x.ndim < 1:
    raise ValueError(f"`{name}` must have a batch axis (shape [N, ...]), got a scalar.")
  if not (np.issubdtype(x.dtype, np.number) or x.dtype == np.bool_):
    raise TypeError(f"`{name}` must be numeric, got dtype {x.dtype}.")
  return x


def broadcast_to(x: Any, shape: tuple[int, ...], name: str, dtype: Any) -> jax.Array:
  """``x`` broadcast to ``shape`` (a clear error if it does not fit)."""
  x = jnp.asarray(x)
  try:
    np.broadcast_shapes(x.shape, shape)
  except ValueError as e:
    raise ValueError(f"`{name}` of shape {shape_str(x.shape)} does not broadcast to the "
                     f"output shape {shape_str(shape)}.") from e
  if np.broadcast_shapes(x.shape, shape) != shape:
    raise ValueError(f"`{name}` of shape {shape_str(x.shape)} does not broadcast to the "
                     f"output shape {shape_str(shape)}.")
  return jnp.broadcast_to(x.astype(dtype), shape)


def check_times(t: Any, dtype: Any) -> jax.Array:
  """``t`` as an array of times (any shape); negative or NaN times are refused."""
  try:
    t = jnp.asarray(t, dtype)
  except TypeError as e:
    raise TypeError(f"`t` must be a scalar or an array of times, got {type(t).__name__}.") from e
  if is_concrete(t):
    tn = np.asarray(t)
    if np.isnan(tn).any():
      raise ValueError("`t` contains NaN.")
    if (tn < 0).any():
      raise ValueError(f"`t` must be >= 0 (training time), got min(t) = {tn.min()}.")
  return t


def check_outputs(fx_train_0: Any, fx_test_0: Any, k_test_train: Any) -> None:
  """neural-tangents' rules for which outputs are requested."""
  if fx_train_0 is None and fx_test_0 is None:
    raise ValueError("Both `fx_train_0` and `fx_test_0` are None: nothing to predict.")
  if fx_test_0 is not None and k_test_train is None:
    raise ValueError("`fx_test_0` is given but `k_test_train` is None: test predictions "
                     "need the test-train kernel.")


def psd_rtol(dtype: Any, m: int) -> float:
  """Relative size of negative eigenvalues accepted as round-off."""
  eps = float(np.finfo(np.dtype(dtype)).eps)
  return max(1e-6, 10.0 * m * eps)


def check_symmetric(k2: Any, name: str) -> None:
  """Refuses a concrete ``[M, M]`` matrix that is not symmetric (beyond round-off)."""
  if not is_concrete(k2):
    return
  a = np.asarray(k2)
  scale = float(np.max(np.abs(a))) if a.size else 0.0
  asym = float(np.max(np.abs(a - a.T))) if a.size else 0.0
  if not math.isfinite(scale):
    raise ValueError(f"`{name}` contains NaN or infinite entries.")
  if asym > psd_rtol(a.dtype, a.shape[0]) * scale:
    raise ValueError(f"`{name}` (flattened {shape_str(a.shape)}) is not symmetric: "
                     f"max |K - K^T| = {asym:.3g} vs max |K| = {scale:.3g}.")


def check_psd(evals: Any, name: str, diag_reg: float, dtype: Any) -> None:
  """Refuses eigenvalues of a (regularized) kernel with large negative values."""
  if not is_concrete(evals):
    return
  ev = np.asarray(evals)
  if not np.isfinite(ev).all():
    raise ValueError(f"`{name}` has NaN or infinite eigenvalues (NaN entries?).")
  top = float(np.max(np.abs(ev))) if ev.size else 0.0
  low = float(ev.min()) if ev.size else 0.0
  if low < -psd_rtol(dtype, ev.size) * top:
    raise NotPositiveSemidefiniteError(
        f"`{name}` is not positive semidefinite: its smallest eigenvalue "
        f"(with diag_reg={diag_reg}) is {low:.4g}, largest |eigenvalue| {top:.4g} "
        f"(round-off tolerance {psd_rtol(dtype, ev.size):.1g} relative). Is it a kernel "
        "(a Gram matrix), symmetric and in the layout of `y_train`?")


def check_loss(loss: Callable[..., Any], y_train: Any, dtype: Any) -> Callable[[Any], Any]:
  """``fx -> d loss(fx, y_train) / d fx``, after checking ``loss`` is scalar and differentiable."""
  if not callable(loss):
    raise TypeError(f"`loss` must be callable as loss(fx_train, y_train), got "
                    f"{type(loss).__name__}.")
  fx = jax.ShapeDtypeStruct(tuple(y_train.shape), dtype)
  try:
    out = jax.eval_shape(loss, fx, y_train)
  except Exception as e:  # pylint: disable=broad-except
    raise TypeError(f"`loss(fx_train, y_train)` failed on fx_train {shape_str(fx.shape)} "
                    f"{np.dtype(dtype).name}, y_train {shape_str(y_train.shape)}: "
                    f"{type(e).__name__}: {e}") from e
  if not isinstance(out, jax.ShapeDtypeStruct) or out.shape != ():
    shape = getattr(out, "shape", None)
    raise ValueError(f"`loss` must return a scalar, got "
                     f"{shape_str(shape) if shape is not None else type(out).__name__} "
                     f"for fx_train {shape_str(fx.shape)}.")
  if not np.issubdtype(out.dtype, np.floating):
    raise TypeError(f"`loss` must return a real float scalar to be differentiable, got "
                    f"dtype {out.dtype}.")
  grad = jax.grad(lambda f: loss(f, y_train))
  try:
    jax.eval_shape(grad, fx)
  except Exception as e:  # pylint: disable=broad-except
    raise TypeError(f"`loss` is not differentiable with respect to its first argument "
                    f"(jax.grad failed: {type(e).__name__}: {e}).") from e
  return grad
