"""Predictions from kernels: neural-tangents' ``predict`` on ntklayers' kernels.

Dense (JAX, jittable ``predict_fn``), with neural-tangents 0.6.5's semantics:

* :func:`gradient_descent_mse`: gradient flow on the MSE loss in closed form at
  any times ``t`` (one eigendecomposition for all finite ``t``);
* :func:`gradient_descent`: any differentiable loss, with momentum, by ODE
  integration;
* :func:`gp_inference`: NNGP / NTK / NTK-GP posterior means and covariances;
* :func:`max_learning_rate`: the largest stable learning rate.

Beyond memory (host NumPy, float64), on a :class:`KernelOperator` (the
matrix-free ``ntklayers.metrics.ntk_matvec``, or a kernel on disk from
``ntklayers.ntk_blocked(..., out=path)`` multiplied in row blocks):

* :func:`gradient_descent_mse_matrix_free` and :func:`gp_inference_matrix_free`;
* the solvers behind them, :func:`cg` (optionally preconditioned by a
  :class:`NystromPreconditioner`) and :func:`lanczos_apply`, which report
  iterations and achieved residuals in a :class:`SolveInfo`.

For example, ``t = inf`` predictions from a train kernel on disk::

  ntklayers.ntk_blocked(f, params, x_train, out="k.npy", max_memory="2GiB")
  k_test_train = ntklayers.ntk_blocked(f, params, x_test, x_train)
  predict_fn = ntklayers.predict.gradient_descent_mse_matrix_free(
      "k.npy", y_train, trace_axes=(), tol=1e-6, preconditioner_rank=400)
  fx_train, fx_test = predict_fn(None, f(params, x_train), f(params, x_test),
                                 k_test_train)
  predict_fn.info  # [SolveInfo(method='cg', iterations=..., residual=...)]

Layouts: for outputs ``[N, O]``, a kernel ``[N, N]`` goes with
``trace_axes=(-1,)`` (the default, as in neural-tangents) and the full
``[N, N, O, O]`` kernel of ``ntklayers.ntk_fn`` with ``trace_axes=()``.

Example:
  >>> import jax.numpy as jnp, ntklayers.predict as npr
  >>> k = jnp.array([[2., 1.], [1., 2.]])
  >>> y = jnp.array([[1.], [-1.]])
  >>> fx_train, fx_test = npr.gradient_descent_mse(k, y)(
  ...     None, 0., 0., jnp.array([[1., 0.5]]))
  >>> fx_test
  Array([[0.5]], dtype=float64)
"""

from ntklayers.predict._checks import NotPositiveSemidefiniteError
from ntklayers.predict._gp import Gaussian
from ntklayers.predict._gp import gp_inference
from ntklayers.predict._gp_matrix_free import MatrixFreeGP
from ntklayers.predict._gp_matrix_free import gp_inference_matrix_free
from ntklayers.predict._matrix_free import MatrixFreeMSE
from ntklayers.predict._matrix_free import gradient_descent_mse_matrix_free
from ntklayers.predict._mse import gradient_descent_mse
from ntklayers.predict._mse import max_learning_rate
from ntklayers.predict._ode import ODEState
from ntklayers.predict._ode import gradient_descent
from ntklayers.predict._operators import KernelOperator
from ntklayers.predict._precondition import NystromPreconditioner
from ntklayers.predict._solvers import ConvergenceWarning
from ntklayers.predict._solvers import SolveInfo
from ntklayers.predict._solvers import cg
from ntklayers.predict._solvers import lanczos_apply

__all__ = (
    "ConvergenceWarning",
    "Gaussian",
    "KernelOperator",
    "MatrixFreeGP",
    "MatrixFreeMSE",
    "NotPositiveSemidefiniteError",
    "NystromPreconditioner",
    "ODEState",
    "SolveInfo",
    "cg",
    "gp_inference",
    "gp_inference_matrix_free",
    "gradient_descent",
    "gradient_descent_mse",
    "gradient_descent_mse_matrix_free",
    "lanczos_apply",
    "max_learning_rate",
)
