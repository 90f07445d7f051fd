"""NTK metrics: spectrum, conditioning, alignment, kernel change, stability bound.

Pure, jittable functions of a kernel returned by :func:`ntklayers.ntk_fn`, read
as a matrix by one rule (see :func:`flatten`): ``[N1, N2, O, O] -> [N1·O, N2·O]``
with row ``n·O + o``, ``[N1, N2]`` as is, ``[N1, N2, A, A, C, C] -> [N1·A·C,
N2·A·C]``. Diagonal layouts (``diagonal_axes``) are accepted by :func:`trace` and
:func:`relative_change` only. :func:`lambda_max_matrix_free` gets ``λmax``
without forming the kernel; the matrix-free spectral estimators go further:
:func:`top_eigenpairs` (block Lanczos or LOBPCG), :func:`trace_estimate`
(Hutchinson, Hutch++; per layer) and :func:`spectral_density` (stochastic
Lanczos quadrature), each with an ``operator_`` form taking a ``matvec``.
Every metric of a kernel with a NaN or an inf is NaN; every metric but
:func:`max_stable_lr` (and the reshape :func:`flatten`) takes a
``layerwise=True`` dict and returns a dict. :func:`max_stable_lr` knows
mean squared error and softmax cross-entropy (``loss=``).

Example:
  >>> import haiku as hk, jax, jax.numpy as jnp, ntklayers, ntklayers.metrics as nm
  >>> net = hk.without_apply_rng(hk.transform(lambda x: ntklayers.Linear(3)(x)))
  >>> x = jnp.arange(8.).reshape(4, 2)
  >>> params = net.init(jax.random.key(0), x)
  >>> K = ntklayers.ntk_fn(net.apply)(params, x)     # [4, 4, 3, 3]
  >>> nm.eigvalsh(K).shape
  (12,)
"""

from ntklayers.metrics._eigenpairs import Eigenpairs
from ntklayers.metrics._eigenpairs import operator_top_eigenpairs
from ntklayers.metrics._eigenpairs import top_eigenpairs
from ntklayers.metrics._estimators import TraceEstimate
from ntklayers.metrics._lanczos import lambda_max_matrix_free
from ntklayers.metrics._lanczos import lanczos_lambda_max
from ntklayers._large import ntk_matvec
from ntklayers.metrics._losses import max_stable_lr
from ntklayers.metrics._spectral import condition_number
from ntklayers.metrics._spectral import effective_rank
from ntklayers.metrics._spectral import eigvalsh
from ntklayers.metrics._spectral import flatten
from ntklayers.metrics._spectral import lambda_max
from ntklayers.metrics._spectral import lambda_min
from ntklayers.metrics._spectral import trace
from ntklayers.metrics._similarity import alignment
from ntklayers.metrics._similarity import relative_change
from ntklayers.metrics._slq import SpectralDensity
from ntklayers.metrics._slq import operator_spectral_density
from ntklayers.metrics._slq import spectral_density
from ntklayers.metrics._stochastic import operator_trace_estimate
from ntklayers.metrics._stochastic import trace_estimate

# Shared with ntklayers.optax and ntklayers.trainability through this door (the
# loss-aware stability bound, the finiteness flag, label handling); not public API.
from ntklayers.metrics._losses import LOSSES  # noqa: E402,F401
from ntklayers.metrics._losses import check_logits  # noqa: E402,F401
from ntklayers.metrics._losses import check_loss  # noqa: E402,F401
from ntklayers.metrics._losses import kernel_bound  # noqa: E402,F401
from ntklayers.metrics._losses import label as loss_label  # noqa: E402,F401
from ntklayers.metrics._losses import matrix_free_bound  # noqa: E402,F401
from ntklayers.metrics._losses import needs_outputs  # noqa: E402,F401
from ntklayers.metrics._similarity import default_num_classes  # noqa: E402,F401
from ntklayers.metrics._spectral import _axes as diagonal_axes_tuple  # noqa: E402,F401
from ntklayers.metrics._spectral import finite  # noqa: E402,F401

__all__ = (
    "Eigenpairs",
    "SpectralDensity",
    "TraceEstimate",
    "alignment",
    "condition_number",
    "effective_rank",
    "eigvalsh",
    "flatten",
    "lambda_max",
    "lambda_max_matrix_free",
    "lambda_min",
    "lanczos_lambda_max",
    "max_stable_lr",
    "ntk_matvec",
    "operator_spectral_density",
    "operator_top_eigenpairs",
    "operator_trace_estimate",
    "relative_change",
    "spectral_density",
    "top_eigenpairs",
    "trace",
    "trace_estimate",
)
