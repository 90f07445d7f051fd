"""NTK metrics: spectrum, conditioning, alignment, kernel change, stability bound.

Pure, jittable functions of a kernel returned by :func:`ntklayers.ntk_fn`, read
as a matrix by one rule (see :func:`flatten`): ``[N1, N2, O, O] -> [N1·O, N2·O]``
with row ``n·O + o``, ``[N1, N2]`` as is, ``[N1, N2, A, A, C, C] -> [N1·A·C,
N2·A·C]``. Diagonal layouts (``diagonal_axes``) are accepted by :func:`trace` and
:func:`relative_change` only. :func:`lambda_max_matrix_free` gets ``λmax``
without forming the kernel.

Example:
  >>> import haiku as hk, jax, jax.numpy as jnp, ntklayers, ntklayers.metrics as nm
  >>> net = hk.without_apply_rng(hk.transform(lambda x: ntklayers.Linear(3)(x)))
  >>> x = jnp.arange(8.).reshape(4, 2)
  >>> params = net.init(jax.random.key(0), x)
  >>> K = ntklayers.ntk_fn(net.apply)(params, x)     # [4, 4, 3, 3]
  >>> nm.eigvalsh(K).shape
  (12,)
"""

from ntklayers.metrics._lanczos import lambda_max_matrix_free
from ntklayers.metrics._lanczos import lanczos_lambda_max
from ntklayers.metrics._lanczos import ntk_matvec
from ntklayers.metrics._spectral import condition_number
from ntklayers.metrics._spectral import effective_rank
from ntklayers.metrics._spectral import eigvalsh
from ntklayers.metrics._spectral import flatten
from ntklayers.metrics._spectral import lambda_max
from ntklayers.metrics._spectral import lambda_min
from ntklayers.metrics._spectral import max_stable_lr
from ntklayers.metrics._spectral import trace
from ntklayers.metrics._similarity import alignment
from ntklayers.metrics._similarity import relative_change

__all__ = (
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
    "relative_change",
    "trace",
)
