"""Gradient flow (with momentum) on any differentiable loss, by ODE integration."""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any, NamedTuple, Protocol

import jax
import jax.numpy as jnp
from jax.experimental import ode

from ntklayers.predict import _checks as C
from ntklayers.predict._layout import Axes, Layout

HIGHEST = jax.lax.Precision.HIGHEST


class ODEState(NamedTuple):
  """State of the function-space ODE (neural-tangents' ``predict.ODEState``).

  Attributes:
    fx_train: train outputs ``[N_train, ...]``.
    fx_test: test outputs ``[N_test, ...]`` (or None).
    qx_train: train auxiliary variable (the velocity, with momentum).
    qx_test: test auxiliary variable (with momentum).
  """
  fx_train: Any = None
  fx_test: Any = None
  qx_train: Any = None
  qx_test: Any = None


class PredictFnODE(Protocol):
  """``predict_fn(t, fx_train_or_state_0, fx_test_0, k_test_train)`` of :func:`gradient_descent`."""

  def __call__(self, t: Any = None, fx_train_or_state_0: Any = 0., fx_test_0: Any = None,
               k_test_train: Any = None) -> Any:
    ...


def gradient_descent(loss: Callable[[Any, Any], Any], k_train_train: Any, y_train: Any,
                     learning_rate: float = 1., momentum: float | None = None,
                     trace_axes: Axes = (-1,), *, rtol: float = 1.4e-8,
                     atol: float = 1.4e-8) -> PredictFnODE:
  r"""Outputs of gradient flow on any loss, by integrating the function-space ODE.

  neural-tangents' ``predict.gradient_descent``: the linearized network trained
  by continuous-time gradient descent on ``loss(f(x_train), y_train)`` obeys
  ``df/dt = -η K ∂loss/∂f`` (test outputs: ``K_td`` instead of ``K``). With
  ``momentum`` ``μ`` it solves ``d²f/dτ² = -K ∂loss/∂f + (μ - 1)/√η · df/dτ`` in
  ``τ = √η t`` (so ``η`` and ``t`` are no longer interchangeable). Integration is
  ``jax.experimental.ode.odeint`` (adaptive Dormand-Prince) with tolerances
  ``rtol`` / ``atol``.

  Args:
    loss: ``loss(fx_train, y_train) -> scalar``, differentiable in ``fx_train``
      (e.g. ``lambda f, y: 0.5 * jnp.mean((f - y) ** 2)``, whose flow equals
      :func:`gradient_descent_mse`'s closed form).
    k_train_train: ``[N_train, N_train]`` (``trace_axes=(-1,)``) or
      ``[N_train, N_train, O, O]`` (``trace_axes=()``) kernel, symmetric.
    y_train: targets ``[N_train, O]`` (any ``[N_train, ...]``).
    learning_rate: ``η > 0``.
    momentum: ``None`` (plain gradient descent) or ``μ`` in ``[0, 1)``.
    trace_axes: axes of ``y_train`` that the kernel lacks (never 0).
    rtol: relative tolerance of the ODE solver.
    atol: absolute tolerance of the ODE solver.

  Returns:
    ``predict_fn(t, fx_train_or_state_0=0., fx_test_0=None, k_test_train=None)``:
    ``t`` a finite scalar or array of times ``>= 0`` in any order; outputs have
    leading axes ``t.shape``: ``fx_train_t [*t.shape, N_train, O]``, ``fx_test_t
    [*t.shape, N_test, O]`` (``k_test_train [N_test, N_train(, O, O)]``), or both
    as a tuple (as :func:`gradient_descent_mse`). Passing an :class:`ODEState`
    instead of ``fx_train_0`` (then ``fx_test_0=None``) returns the
    :class:`ODEState` at ``t`` (velocities included with momentum).

  Raises:
    ValueError / TypeError: a loss that is not scalar or not differentiable,
      mismatched shapes, bad ``learning_rate`` / ``momentum``, negative or
      infinite ``t``.

  Example:
    >>> import jax.numpy as jnp, ntklayers.predict as npr
    >>> k = jnp.array([[2., 1.], [1., 2.]])
    >>> y = jnp.array([[1.], [-1.]])
    >>> mse = lambda f, y: 0.5 * jnp.mean((f - y) ** 2)
    >>> ode_fn = npr.gradient_descent(mse, k, y)
    >>> exact_fn = npr.gradient_descent_mse(k, y)
    >>> t = jnp.array([0.5, 2.])
    >>> bool(jnp.allclose(ode_fn(t, 0.), exact_fn(t, 0.), atol=1e-7))
    True
  """
  lr = C.check_learning_rate(learning_rate)
  mom = C.check_momentum(momentum)
  rtol = C.check_real_scalar(rtol, "rtol", positive=True)
  atol = C.check_real_scalar(atol, "atol", positive=True)
  y_train = jnp.asarray(C.check_array(y_train, "y_train"))
  k_train_train = C.check_array(k_train_train, "k_train_train")
  layout = Layout(y_train.shape, trace_axes)
  dtype = C.float_dtype(k_train_train.dtype)
  k2 = jnp.asarray(layout.kernel_2d(k_train_train, "k_train_train", square=True), dtype)
  C.check_symmetric(k2, "k_train_train")
  grad_loss = C.check_loss(loss, y_train, dtype)
  time_scale = lr if mom is None else math.sqrt(lr)
  friction = None if mom is None else (mom - 1.0) / math.sqrt(lr)
  shape = tuple(y_train.shape)

  def flow(state: ODEState, unused_t: Any, ktd2: Any, rows: tuple[int, ...]) -> ODEState:
    g2 = layout.targets_2d(grad_loss(state.fx_train).astype(dtype))
    d_train = -layout.outputs(jnp.matmul(k2, g2, precision=HIGHEST), layout.kept_shape)
    d_test = None
    if state.fx_test is not None:
      d_test = -layout.outputs(jnp.matmul(ktd2, g2, precision=HIGHEST), rows)
    if friction is None:
      return ODEState(d_train, d_test)
    acc_test = None if d_test is None else d_test + friction * state.qx_test
    return ODEState(state.qx_train, state.qx_test, d_train + friction * state.qx_train, acc_test)

  @functools.partial(jax.jit, static_argnames=("rows",))
  def integrate(state0: ODEState, times: jax.Array, ktd2: Any, rows: tuple[int, ...]) -> Any:
    """The states at ``times [T]`` (any order, >= 0): ``[T, ...]`` leaves."""
    order = jnp.argsort(times)
    grid = jnp.concatenate([jnp.zeros((1,), dtype), times[order]])
    traj = ode.odeint(lambda s, tt: flow(s, tt, ktd2, rows), state0, grid, rtol=rtol,
                      atol=atol)
    # The solver interpolates 0/0 at a time equal to the start: times 0 take the state itself.
    zero = grid[1:] == 0
    inverse = jnp.argsort(order)

    def pick(x: jax.Array, x0: jax.Array) -> jax.Array:
      mask = zero.reshape(zero.shape + (1,) * x0.ndim)
      return jnp.where(mask, x0[None], x[1:])[inverse]

    return jax.tree.map(pick, traj, state0)

  def predict_fn(t: Any = None, fx_train_or_state_0: Any = 0., fx_test_0: Any = None,
                 k_test_train: Any = None) -> Any:
    is_state = isinstance(fx_train_or_state_0, ODEState)
    if is_state:
      if fx_test_0 is not None:
        raise ValueError("`fx_test_0` must be None when an ODEState is passed (its "
                         "`fx_test` holds the test outputs).")
      s0 = fx_train_or_state_0
      f0, ft0, q0, qt0 = s0.fx_train, s0.fx_test, s0.qx_train, s0.qx_test
    else:
      f0, ft0, q0, qt0 = fx_train_or_state_0, fx_test_0, None, None
    C.check_outputs(f0, ft0, k_test_train)
    if t is None:
      raise ValueError("`t=None` (infinite time) is not supported by `gradient_descent`: "
                       "the ODE is integrated numerically; pass finite times (for the MSE "
                       "loss, `gradient_descent_mse` has the closed form at t=None).")
    t = C.check_times(t, dtype)
    if C.is_concrete(t) and not bool(jnp.isfinite(t).all()):
      raise ValueError("`t` must be finite for `gradient_descent` (ODE integration).")
    if mom is None and (q0 is not None or qt0 is not None):
      raise ValueError("The ODEState has momentum variables (qx_train / qx_test) but "
                       "`momentum` is None.")

    state = [C.broadcast_to(0. if f0 is None else f0, shape, "fx_train_0", dtype), None,
             None, None]
    ktd2, rows = None, layout.kept_shape
    if ft0 is not None:
      ktd2 = jnp.asarray(layout.kernel_2d(k_test_train, "k_test_train"), dtype)
      rows = layout.check_kernel(k_test_train, "k_test_train", square=False)
      state[1] = C.broadcast_to(ft0, layout.out_shape(rows), "fx_test_0", dtype)
    if mom is not None:
      state[2] = C.broadcast_to(0. if q0 is None else q0, shape, "qx_train", dtype)
      if ft0 is not None:
        state[3] = C.broadcast_to(0. if qt0 is None else qt0, layout.out_shape(rows), "qx_test",
                                  dtype)
    state0 = ODEState(*state)

    out = jax.tree.map(lambda x: x.reshape(t.shape + x.shape[1:]),
                       integrate(state0, t.reshape(-1) * time_scale, ktd2, rows))

    if is_state:
      return out
    if ft0 is None:
      return out.fx_train
    if f0 is None:
      return out.fx_test
    return out.fx_train, out.fx_test

  return predict_fn
