"""``check_trainability``: an NTK health check for plain Python training loops.

One kernel ``[N, N, O, O]`` of the batch (the compiled kernel is cached per model
``f`` and options by :func:`ntklayers.ntk_fn`) and one jitted pass over its
spectrum give ``λmax``, ``λmin``, ``κ``, the gradient-descent stability bound of
the loss trained (``ntklayers.metrics``), the effective rank and, with
targets, the kernel-target alignment. Cheap enough to call every few hundred
steps; not jittable (it returns Python floats, warns and may raise).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import warnings
from collections.abc import Callable
from typing import Any, cast

import jax
import jax.numpy as jnp
import numpy as np

from ntklayers import _core as _api
from ntklayers import metrics as _m


class TrainabilityWarning(UserWarning):
  """The learning rate exceeds the NTK stability bound, or ``κ`` a threshold."""


class TrainabilityError(ValueError):
  """Raised by ``check_trainability(..., raise_on_failure=True)``; ``.report`` holds
  the :class:`TrainabilityReport`."""

  def __init__(self, message: str, report: TrainabilityReport):
    super().__init__(message)
    self.report = report


@dataclasses.dataclass(frozen=True)
class TrainabilityReport:
  """Result of :func:`check_trainability` (Python floats).

  Attributes:
    lambda_max: largest eigenvalue of the flattened ``[N·O, N·O]`` kernel.
    lambda_min: smallest eigenvalue.
    condition_number: ``κ = λmax / λmin`` (``inf`` if ``λmin <= 0``).
    max_stable_lr: full-batch GD bound for ``loss`` (``2N/λmax`` for MSE
      ``"mean"``; ``2/λmax(H^{1/2} Θ H^{1/2})`` for cross-entropy); NaN for a
      non-finite kernel, like every other value.
    lr: the learning rate checked.
    effective_rank: entropy effective rank of the spectrum.
    trace: ``tr Θ``.
    alignment: kernel-target alignment (``None`` without ``y``).
    centered_alignment: centered alignment (``None`` without ``y``).
    size: ``N·O``, the side of the flattened kernel.
    loss: the loss of ``max_stable_lr`` (``"mean"`` when none was named).
    kappa_max: the ``κ`` threshold.
    ok: ``True`` iff there is no reason to worry.
    reasons: human-readable reasons for ``ok=False`` (empty when ok).
    loss_is_default: no loss was named: the bound is the MSE one of ``"mean"``
      (the report says so, and how to name another loss).
  """
  lambda_max: float
  lambda_min: float
  condition_number: float
  max_stable_lr: float
  lr: float
  effective_rank: float
  trace: float
  alignment: float | None
  centered_alignment: float | None
  size: int
  loss: str
  kappa_max: float
  ok: bool
  reasons: tuple[str, ...]
  loss_is_default: bool = False

  def __str__(self) -> str:
    rows: list[tuple[str, Any]] = [
        ("λmax", self.lambda_max), ("λmin", self.lambda_min),
        ("κ = λmax/λmin", self.condition_number),
        (f"max stable lr ({self.loss})", self.max_stable_lr), ("lr", self.lr),
        ("lr / max stable lr", self.lr / self.max_stable_lr),
        ("effective rank", self.effective_rank), ("trace", self.trace)]
    if self.alignment is not None:
      rows += [("alignment", self.alignment), ("centered alignment",
                                               self.centered_alignment)]
    width = max(len(k) for k, _ in rows)
    lines = [f"NTK trainability ({self.size}x{self.size} kernel): "
             f"{'ok' if self.ok else 'PROBLEM'}"]
    lines += [f"  {k:<{width}}  {v:.4g}" for k, v in rows]
    lines += [f"  bound: {_m.loss_label(self.loss, self.loss_is_default)}"]
    lines += [f"  - {r}" for r in self.reasons]
    return "\n".join(lines)


@functools.partial(jax.jit, static_argnames=("loss", "num_classes"))
def _values(K: jax.Array, y: Any, outputs: jax.Array | None, *, loss: str,
            num_classes: int | None) -> dict:
  """All metrics of one kernel in one program (XLA shares the eigendecomposition)."""
  ok = _m.finite(K)
  if outputs is not None:
    ok = ok & _m.finite(outputs)
  out = {"lambda_max": _m.lambda_max(K), "lambda_min": _m.lambda_min(K),
         "condition_number": _m.condition_number(K),
         "max_stable_lr": _m.kernel_bound(K, loss, outputs, "check_trainability")[1],
         "effective_rank": _m.effective_rank(K), "trace": _m.trace(K),
         "finite": ok}
  if y is not None:
    out["alignment"] = _m.alignment(K, y, False, num_classes=num_classes)
    out["centered_alignment"] = _m.alignment(K, y, True, num_classes=num_classes)
  return out


def check_trainability(f: Callable[[Any, Any], jax.Array], params: Any, x: Any, *,
                       lr: float, y: Any = None, loss: str | None = None,
                       kappa_max: float = 1e6, raise_on_failure: bool = False,
                       warn: bool = True, num_classes: int | None = None,
                       trainable: Any = None, **ntk_options: Any) -> TrainabilityReport:
  """Checks a learning rate and the conditioning against the NTK of a batch.

  Computes the full kernel ``K = ntk_fn(f, trainable=...)(params, x)``
  (``[N, N, O, O]``) and reports its spectrum. Failure reasons:

  * ``lr > max_stable_lr(K, loss=loss)``: full-batch gradient descent on
    ``loss`` diverges for the linearized model (``2N/λmax`` for MSE
    ``loss="mean"``, ``L = 1/N Σ ½‖f(x_n) − y_n‖²``; for softmax cross-entropy
    ``2/λmax(H^{1/2} Θ H^{1/2})`` at the current logits, see
    :func:`ntklayers.metrics.max_stable_lr`). For SGD on minibatches of this
    size it is the same bound; for momentum or Adam it is a heuristic. Without
    ``loss`` the bound is the MSE one of ``"mean"`` and the report and warning
    say so: name the loss you train with, a cross-entropy model checked against
    the MSE bound gets false alarms.
  * ``κ > kappa_max`` (``inf`` when ``λmin <= 0``: more outputs ``N·O`` than
    parameters, or round-off in float32): slow convergence along the small
    eigendirections (Xiao et al. 2020).
  * a non-finite kernel (or logits): every value of the report is then NaN.

  Args:
    f: ``f(params, x) -> [N, O]``; pass the same function object every call so
      the compiled kernel is reused.
    params: parameters.
    x: batch ``[N, ...]`` (the training batch, or a fixed probe batch).
    lr: the learning rate to check.
    y: optional targets for the alignment: integer labels ``[N]`` (one-hot with
      ``num_classes``, default ``O``) or targets ``[N, O]``.
    loss: ``"mean"``, ``"sum"``, ``"elementwise_mean"`` (MSE),
      ``"softmax_cross_entropy"`` or ``"softmax_cross_entropy_sum"`` (logits
      ``[N, C]``; one more forward pass); see
      :func:`ntklayers.metrics.max_stable_lr`. ``None``: ``"mean"``, labelled as
      the default.
    kappa_max: condition-number threshold.
    raise_on_failure: raise :class:`TrainabilityError` instead of warning.
    warn: emit a :class:`TrainabilityWarning` on failure.
    num_classes: classes of integer ``y``.
    trainable: optax-style mask of the parameters in the kernel.
    **ntk_options: other ``ntk_fn`` options (``implementation``, ...); not
      ``trace_axes``, ``diagonal_axes`` or ``layerwise`` (the bound needs the
      full kernel).

  Returns:
    A :class:`TrainabilityReport`; ``print(report)`` shows a short table.

  Raises:
    TrainabilityError: on failure when ``raise_on_failure=True``.
    ValueError: bad arguments (``lr``, an unknown ``loss``, a partial kernel,
      cross-entropy on outputs that are not logits ``[N, C]``).

  Example:
    >>> import haiku as hk, jax, jax.numpy as jnp, ntklayers
    >>> from ntklayers.trainability._check import check_trainability
    >>> net = hk.without_apply_rng(hk.transform(lambda x: ntklayers.Linear(2)(x)))
    >>> x = jax.random.normal(jax.random.key(0), (4, 8))
    >>> params = net.init(jax.random.key(1), x)
    >>> report = check_trainability(net.apply, params, x, lr=1e-3)
    >>> report.ok, report.lr < report.max_stable_lr
    (True, True)
  """
  if not (isinstance(lr, (int, float, np.floating)) and lr > 0):
    raise ValueError(f"`lr` must be a positive number, got {lr!r}.")
  is_default = loss is None
  loss = _m.check_loss(loss, "check_trainability", allow_default=True)
  given = [k for k in ("trace_axes", "diagonal_axes") if ntk_options.get(k, ()) not in ((), [])]
  given += ["layerwise"] if ntk_options.get("layerwise") else []
  if given:
    raise ValueError(f"check_trainability needs the full kernel [N, N, O, O]: do not pass "
                     f"{', '.join(f'`{k}`' for k in given)} (`trace_axes`, "
                     f"`diagonal_axes` and `layerwise` change what the bound means).")
  outputs = None
  if _m.needs_outputs(loss):
    _m.check_logits(jax.eval_shape(f, params, x).shape, "check_trainability")
    outputs = jax.jit(f)(params, x)
  K = cast(jax.Array, _api.ntk_fn(f, trainable=trainable, **ntk_options)(params, x))
  if y is not None:
    y = jnp.asarray(y)
    num_classes = _m.default_num_classes(y, num_classes, K.shape[::2])
  vals = {k: float(v) for k, v in _values(K, y, outputs, loss=loss,
                                          num_classes=num_classes).items()}
  size = int(math.prod(K.shape[::2]))
  reasons, kappa = [], vals["condition_number"]
  if not vals["finite"]:
    what = "kernel" if outputs is None or np.all(np.isfinite(outputs)) else "logits"
    reasons.append(f"the {what} is not finite (NaN/inf in the model's "
                   f"{'gradients' if what == 'kernel' else 'outputs'}): every value is NaN")
  else:
    if lr > vals["max_stable_lr"]:
      reasons.append(
          f"lr = {lr:.4g} exceeds the max stable lr {vals['max_stable_lr']:.4g} "
          f"({lr / vals['max_stable_lr']:.2f}x; {_m.loss_label(loss, is_default)}; "
          "full-batch gradient descent): expect divergence or a loss spike")
    if not kappa <= kappa_max:
      why = (f"λmin = {vals['lambda_min']:.3g} <= 0: the kernel is singular (N·O = "
             f"{size} outputs may exceed the parameters, or round-off)"
             if math.isinf(kappa) else
             f"κ = {kappa:.4g} exceeds kappa_max = {kappa_max:.4g}")
      reasons.append(f"{why}: directions with small eigenvalues train very slowly")
  report = TrainabilityReport(
      lambda_max=vals["lambda_max"], lambda_min=vals["lambda_min"],
      condition_number=kappa, max_stable_lr=vals["max_stable_lr"], lr=float(lr),
      effective_rank=vals["effective_rank"], trace=vals["trace"],
      alignment=vals.get("alignment"), centered_alignment=vals.get("centered_alignment"),
      size=size, loss=loss, kappa_max=float(kappa_max), ok=not reasons,
      reasons=tuple(reasons), loss_is_default=is_default)
  if reasons:
    message = "NTK trainability check failed: " + "; ".join(reasons) + "."
    if raise_on_failure:
      raise TrainabilityError(message, report)
    if warn:
      warnings.warn(TrainabilityWarning(message), stacklevel=2)
  return report
