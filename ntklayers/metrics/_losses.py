"""The gradient-descent stability bound of the loss actually trained.

One implementation serves :func:`max_stable_lr`, ``check_trainability``, the
monitor's ``max_stable_lr`` and ``step_size_guard`` (kernel and Lanczos).

Full-batch gradient descent ``θ ← θ − η ∇L`` on a loss ``L(f)`` of the flattened
outputs ``f [N·O]`` of the linearized model, with ``H`` the Hessian of ``L``
w.r.t. ``f`` at the current outputs, is locally ``f − f* ← (I − η Θ H)(f − f*)``
(``Θ`` the flattened ``[N·O, N·O]`` kernel). It is stable iff
``η < 2 / λmax(H^{1/2} Θ H^{1/2})`` (the nonzero eigenvalues of ``Θ H``):

* mean squared error, ``H = c·I``: ``2 / (c·λmax(Θ))`` (see :func:`max_stable_lr`);
* softmax cross-entropy on logits ``[N, C]``: ``H`` is block diagonal with
  blocks ``(diag p_n − p_n p_nᵀ)/N`` (``/1`` for the sum), ``p_n = softmax(f_n)``.
  ``H = L Lᵀ`` with the per-example factor ``L_n = diag(√p_n) − p_n √p_nᵀ``
  (``/√N``), and ``Lᵀ Θ L = Uᵀ (H^{1/2} Θ H^{1/2}) U`` with ``U`` orthogonal (the
  polar decomposition ``L = H^{1/2} U``): the same eigenvalues, without a matrix
  square root. Lanczos applies ``v ↦ Lᵀ J Jᵀ L v``.

For cross-entropy the bound is local: ``H`` changes with the outputs (it shrinks
as the softmax saturates), so it is the bound at the current params.

Glossary of shapes: ``N`` examples, ``C`` classes (outputs per example), ``M = N·C``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from ntklayers.metrics import _lanczos
from ntklayers.metrics import _spectral as _metrics

MSE = ("mean", "sum", "elementwise_mean")
CROSS_ENTROPY = ("softmax_cross_entropy", "softmax_cross_entropy_sum")
LOSSES = (*MSE, *CROSS_ENTROPY)
DEFAULT = "mean"
_NAMES = {
    "mean": ("MSE", "1/N Σ_n ½‖f_n − y_n‖²"),
    "sum": ("MSE", "Σ_n ½‖f_n − y_n‖²"),
    "elementwise_mean": ("MSE", "optax.l2_loss(f, y).mean()"),
    "softmax_cross_entropy": ("softmax cross-entropy",
                              "optax.softmax_cross_entropy(logits, onehot).mean()"),
    "softmax_cross_entropy_sum": ("softmax cross-entropy",
                                  "optax.softmax_cross_entropy(logits, onehot).sum()"),
}


def check_loss(loss: Any, fn: str, *, allow_default: bool = False) -> str:
  """The loss name, validated (``None`` is ``"mean"`` where ``allow_default``)."""
  if loss is None and allow_default:
    return DEFAULT
  if not isinstance(loss, str) or loss not in LOSSES:
    raise ValueError(
        f"`{fn}`: `loss` must be one of {LOSSES}, got {loss!r}. The bound covers mean "
        f"squared error ('mean': 1/N Σ ½‖f − y‖², 'sum', 'elementwise_mean': "
        f"optax.l2_loss(f, y).mean()) and softmax cross-entropy on logits [N, C] "
        f"('softmax_cross_entropy': optax.softmax_cross_entropy(logits, "
        f"onehot).mean(), 'softmax_cross_entropy_sum': its sum); no other loss.")
  return loss


def label(loss: str, is_default: bool = False) -> str:
  """Names the bound for a report or a warning, e.g. ``MSE bound of ... (loss='mean')``."""
  kind, formula = _NAMES[loss]
  where = " at the current logits" if loss in CROSS_ENTROPY else ""
  note = ""
  if is_default:
    note = (", the default: name the loss you train with, e.g. "
            "loss='softmax_cross_entropy'")
  return f"{kind} bound of {formula}{where} (loss={loss!r}{note})"


def needs_outputs(loss: str) -> bool:
  """Whether the bound depends on the current outputs (the loss is not quadratic)."""
  return loss in CROSS_ENTROPY


def check_logits(out_shape: Sequence[int], fn: str) -> None:
  """Cross-entropy needs logits ``[N, C]``: one softmax per example."""
  if len(out_shape) != 2:
    raise ValueError(
        f"`{fn}` with a softmax cross-entropy loss needs `outputs` (the model's "
        f"logits) of shape [N, C], one softmax per example; got shape "
        f"{tuple(out_shape)}. Sequence outputs [N, T, C] are not covered (the softmax "
        f"axis and the reduction are ambiguous): reshape f's outputs to [N, C].")


def _logits(outputs: Any, K: jax.Array, fn: str) -> jax.Array:
  if outputs is None:
    raise ValueError(
        f"`{fn}` with a softmax cross-entropy loss needs `outputs`: the model's "
        f"logits [N, C] at the current params on the kernel's batch (the Hessian of "
        f"the loss depends on them); K has shape {K.shape}.")
  out = jnp.asarray(outputs)
  check_logits(out.shape, fn)
  n, c = out.shape
  if K.ndim == 2 and c > 1 and K.shape == (n, n):
    raise ValueError(
        f"`{fn}`: the kernel has shape {K.shape}, one output per example, but "
        f"`outputs` has shape {out.shape} ({c} classes): a kernel computed with "
        f"`trace_axes` averages over the classes and its bound is not the model's. "
        f"Pass the full kernel [N, N, C, C] (trace_axes=()).")
  if K.shape != (n, n, c, c) and not (c == 1 and K.shape == (n, n)):
    raise ValueError(
        f"`{fn}`: `outputs` of shape {out.shape} do not match the kernel's shape "
        f"{K.shape}: logits [N, C] go with the full kernel [N, N, C, C].")
  return out.astype(K.dtype)


def _check_outputs(shape: Sequence[int], K: jax.Array, m: int, fn: str) -> None:
  """MSE: outputs, when given, must be the kernel's (catches a traced kernel)."""
  n = K.shape[0]
  if len(shape) >= 1 and shape[0] == n and math.prod(shape) == m:
    return
  hint = (" (a kernel computed with `trace_axes` averages over the outputs and its "
          "bound is not the model's: pass the full kernel)"
          if len(shape) >= 1 and shape[0] == n and K.ndim == 2 else "")
  raise ValueError(f"`{fn}`: `outputs` of shape {tuple(shape)} do not match the kernel's "
                   f"shape {K.shape}{hint}.")


def factor(logits: jax.Array, loss: str) -> jax.Array:
  """``L [N, C, C]`` with ``L_n L_nᵀ`` the Hessian block of example ``n``.

  ``L_n = (diag(√p) − p √pᵀ) / √N`` (``√N`` only for the mean), ``p = softmax``.
  """
  p = jax.nn.softmax(logits, axis=-1)
  sq = jnp.sqrt(p)
  L = jnp.einsum("nc,cd->ncd", sq, jnp.eye(p.shape[-1], dtype=p.dtype))
  L = L - p[:, :, None] * sq[:, None, :]
  if loss == "softmax_cross_entropy":
    L = L / jnp.sqrt(jnp.asarray(p.shape[0], p.dtype))
  return L


def weigh(mat: jax.Array, L: jax.Array) -> jax.Array:
  """``Lᵀ Θ L`` of the flattened ``[N·C, N·C]`` kernel and block-diagonal ``L``."""
  n, c, _ = L.shape
  th = mat.reshape(n, c, n, c)
  return jnp.einsum("noa,nomp,mpb->namb", L, th, L).reshape(n * c, n * c)


def _mse_bound(lam: jax.Array, loss: str, n: int, m: int) -> jax.Array:
  scale = {"mean": n, "sum": 1, "elementwise_mean": m}[loss]
  return jnp.where(lam > 0, 2 * scale / jnp.where(lam > 0, lam, 1), jnp.inf)


def from_lambda(lam: jax.Array, loss: str, n: int, m: int) -> jax.Array:
  """The bound from ``λmax`` of the operator of :func:`kernel_bound`; NaN if not finite.

  ``lam``: ``λmax(Θ)`` for MSE, ``λmax(Lᵀ Θ L)`` for cross-entropy; ``inf`` when 0.
  """
  if loss in MSE:
    out = _mse_bound(lam, loss, n, m)
  else:
    out = jnp.where(lam > 0, 2 / jnp.where(lam > 0, lam, 1), jnp.inf)
  return _metrics.nan_unless(jnp.isfinite(lam), out)


def kernel_bound(K: ArrayLike, loss: str, outputs: Any, fn: str,
                 diagonal_axes: int | Sequence[int] = ()) -> tuple[jax.Array, jax.Array]:
  """``(λ, bound)`` of a formed kernel: ``λ`` is ``λmax(Θ)`` (MSE) or ``λmax(Lᵀ Θ L)``."""
  loss = check_loss(loss, fn)
  K = _metrics._kernel(K, fn)
  mat = _metrics._square(K, diagonal_axes, fn)
  n, m = K.shape[0], mat.shape[0]
  if loss in MSE:
    if outputs is not None:
      _check_outputs(jnp.shape(outputs), K, m, fn)
    lam = _metrics.eigen(mat)[-1]
    return lam, from_lambda(lam, loss, n, m)
  logits = _logits(outputs, K, fn)
  ok = _metrics.finite(mat) & _metrics.finite(logits)
  sym = jnp.where(ok, (mat + mat.T) / 2, jnp.zeros_like(mat))
  L = factor(jnp.where(ok, logits, jnp.zeros_like(logits)), loss)
  lam = _metrics.nan_unless(ok, _metrics.eigen(weigh(sym, L))[-1])
  return lam, from_lambda(lam, loss, n, m)


def matrix_free_bound(f: Callable[[Any, Any], jax.Array], params: Any, x: Any, loss: str,
                      *, num_iters: int, trainable: Any = None,
                      key: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
  """``(λ, bound)`` by Lanczos without forming the kernel (a lower estimate of ``λ``).

  MSE: :func:`ntklayers.metrics.lambda_max_matrix_free`. Cross-entropy: Lanczos on
  ``v ↦ Lᵀ J Jᵀ L v`` with ``L`` from the logits ``f(params, x)``. A non-finite
  product anywhere makes ``λ`` (and the bound) NaN.
  """
  loss = check_loss(loss, "step_size_guard")
  out = jax.eval_shape(f, params, x)
  n, m = out.shape[0], out.size
  if loss in MSE:
    lam = _lanczos.lambda_max_matrix_free(f, params, x, num_iters=num_iters, key=key,
                                          trainable=trainable)
    return lam, from_lambda(lam, loss, n, m)
  check_logits(out.shape, "step_size_guard")
  logits = f(params, x)
  matvec, dim, dtype = _lanczos.make_matvec(f, params, x, block_size=None, trainable=trainable,
                                            model_kwargs=None, independent_samples=None,
                                            caller="step_size_guard")
  L = factor(logits.astype(dtype), loss)
  c = L.shape[-1]

  def weighted(v: jax.Array) -> jax.Array:
    u = jnp.einsum("noa,na->no", L, v.reshape(n, c)).ravel()
    return jnp.einsum("noa,no->na", L, matvec(u).reshape(n, c)).ravel()

  lam = _lanczos.lanczos_lambda_max(weighted, dim, num_iters=num_iters, key=key,
                                    dtype=dtype)
  lam = _metrics.nan_unless(_metrics.finite(logits), lam)
  return lam, from_lambda(lam, loss, n, m)


def max_stable_lr(K: ArrayLike, *, loss: str = "mean", outputs: ArrayLike | None = None,
                  diagonal_axes: int | Sequence[int] = ()) -> jax.Array:
  """Largest stable learning rate of full-batch gradient descent for ``loss``.

  The linearized dynamics ``f − f* ← (I − η Θ H)(f − f*)`` (``Θ`` the flattened
  ``[N·O, N·O]`` kernel, ``H`` the Hessian of the loss w.r.t. the outputs) are
  stable iff ``η < 2 / λmax(H^{1/2} Θ H^{1/2})``. Mean squared error
  (``L = (c/2) Σ_{n,o} (f_o(x_n) − y_no)²``, ``H = c·I``):

  * ``loss="mean"``: ``L = 1/N Σ_n ½‖f(x_n) − y_n‖²``, ``c = 1/N``: ``η < 2N/λmax``;
  * ``loss="sum"``: ``L = Σ_n ½‖f(x_n) − y_n‖²``, ``c = 1``: ``η < 2/λmax``;
  * ``loss="elementwise_mean"``: ``optax.l2_loss(f, y).mean()``, ``c = 1/(N·O)``:
    ``η < 2NO/λmax``.

  Softmax cross-entropy on logits ``[N, C]`` (needs ``outputs``, the logits at the
  current params; labels do not enter): ``H`` is block diagonal,
  ``(diag p_n − p_n p_nᵀ)/N`` per example with ``p_n = softmax(logits_n)``:

  * ``loss="softmax_cross_entropy"``: ``optax.softmax_cross_entropy(logits,
    onehot).mean()``;
  * ``loss="softmax_cross_entropy_sum"``: its ``.sum()`` (blocks without ``/N``).

  The cross-entropy bound is at least twice the ``"mean"`` MSE bound and local
  (``H`` shrinks as the softmax saturates). Losses without the ½
  (``optax.squared_error``) halve the MSE bound. Use the full ``[N, N, O, O]``
  kernel of the batch being trained on: the bound of a ``trace_axes`` kernel is
  not the model's (for ``[N, N]`` kernels ``O = 1`` is assumed; cross-entropy
  refuses them). For momentum or Adam it is only a heuristic. A nonlinear model
  above the bound first moves away from the minimum; it then diverges or
  "catapults" to flatter params whose own bound is ``η`` (the edge of stability;
  Lewkowycz et al. 2020, Cohen et al. 2021; ``tests/test_optax.py``).

  Args:
    K: kernel ``[N, N, O, O]`` (or ``[N, N]``, general full layout for MSE;
      ``[N, N, C, C]`` for cross-entropy). Not a layerwise dict.
    loss: one of ``"mean"``, ``"sum"``, ``"elementwise_mean"``,
      ``"softmax_cross_entropy"``, ``"softmax_cross_entropy_sum"``.
    outputs: logits ``[N, C]`` of the model at the current params on the kernel's
      batch; required for cross-entropy. For MSE optional, and only checked
      against the kernel's shape (outputs ``[N, O]`` with an ``[N, N]`` kernel:
      a ``trace_axes`` kernel, refused).
    diagonal_axes: must be empty (see :func:`flatten`).

  Returns:
    Scalar bound (``inf`` for a zero kernel or zero curvature, NaN if ``K`` or
    ``outputs`` is not finite).

  Raises:
    ValueError: unknown ``loss``; cross-entropy without ``outputs``; ``outputs``
      whose shape does not match the kernel's; a layerwise dict; a diagonal
      layout.

  References:
    Lee et al., "Wide neural networks of any depth evolve as linear models under
    gradient descent", NeurIPS 2019 (η_critical).

  Example:
    >>> import jax.numpy as jnp, ntklayers.metrics as nm
    >>> float(nm.max_stable_lr(4 * jnp.eye(8)))  # 2 * 8 / 4
    4.0
    >>> K = jnp.eye(4).reshape(2, 2, 2, 2).transpose(0, 2, 1, 3)  # [N, N, C, C]
    >>> float(nm.max_stable_lr(K, loss="softmax_cross_entropy",
    ...                        outputs=jnp.zeros((2, 2))))  # 2 / (1/2 · 1/N)
    8.0
  """
  if isinstance(K, Mapping):
    raise ValueError(
        f"`max_stable_lr` takes the model's kernel, got a layerwise dict with keys "
        f"{sorted(K)}: the model's bound is max_stable_lr(sum(K.values())); a "
        f"per-layer bound holds only when the other layers are frozen (compute it "
        f"with ntk_fn(f, trainable=...)).")
  return kernel_bound(K, loss, outputs, "max_stable_lr", diagonal_axes)[1]
