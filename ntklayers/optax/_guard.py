"""``step_size_guard``: an optax transformation keeping the step below the NTK bound.

Every ``every`` update calls (step 0 included) it measures the stability bound of
the loss (``ntklayers.metrics``) at the current params on a probe batch,
inside a ``lax.cond``, and scales all updates by ``min(1, safety·bound/lr)``.

A measurement is *safe* when it is finite. A non-finite one (a NaN or inf in the
kernel, the logits or a Lanczos product) never sets the scale: the guard keeps
its last safe scale, records the NaN in ``stable_lr`` / ``probe_lambda_max`` and
counts it in ``num_nonfinite``. Before the first safe measurement the scale is
0: a NaN at the first measurement stops the updates instead of letting an
unguarded step through.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple, cast

import jax
import jax.numpy as jnp
import optax

from ntklayers import _core as _api
from ntklayers import metrics as _m
from ntklayers.optax._monitor import _check_every
from ntklayers.optax._monitor import check_params


class NTKStepSizeGuardState(NamedTuple):
  """State of :func:`step_size_guard`.

  ``optax.tree_utils.tree_get(opt_state, "num_nonfinite")`` (or ``"scale"``,
  ``"stable_lr"``) reads it out of a chain.

  Attributes:
    count: ``[]`` int32, number of ``update`` calls so far.
    scale: ``[]`` factor multiplying the updates, ``min(1, safety·stable_lr/lr)``
      at the last safe (finite) measurement; 0 before the first one.
    stable_lr: ``[]`` bound at the last measurement (``2N/λmax`` for
      ``loss="mean"``); NaN before the first and after a non-finite one.
    probe_lambda_max: ``[]`` ``λ`` of the last measurement: ``λmax`` of the
      probe kernel for MSE, of ``H^{1/2} Θ H^{1/2}`` for cross-entropy (so the
      bound is ``2/λ`` there); NaN before the first and when not finite.
    num_nonfinite: ``[]`` int32, number of non-finite measurements so far (each
      kept the previous scale).
  """
  count: jax.Array  # type: ignore[assignment]  # a field, as in optax's states
  scale: jax.Array
  stable_lr: jax.Array
  probe_lambda_max: jax.Array
  num_nonfinite: jax.Array


def step_size_guard(f: Callable[[Any, Any], jax.Array], probe_x: Any, *, lr: float,
                    safety: float = 0.5, every: int = 10, loss: str | None = None,
                    method: str = "kernel", num_iters: int = 20, trainable: Any = None,
                    **ntk_options: Any) -> optax.GradientTransformationExtraArgs:
  """Scales updates so the effective step stays below ``safety × max_stable_lr``.

  Assumes the chained optimizer is SGD-like with step ``lr`` (updates
  ``-lr·g``, e.g. ``optax.sgd(lr)``) on the loss ``loss``, and that ``probe_x``
  is (representative of) the training batch: the bound is the full-batch
  gradient-descent bound of the linearized model (see
  :func:`ntklayers.metrics.max_stable_lr`; ``2N/λmax`` for MSE ``"mean"``,
  ``2/λmax(H^{1/2} Θ H^{1/2})`` for cross-entropy). Every ``every`` steps it
  recomputes the bound on the full ``[N, N, O, O]`` probe kernel and sets
  ``scale = min(1, safety · bound / lr)``; all updates are multiplied by
  ``scale`` (so the effective step is ``min(lr, safety·bound)``). A non-finite
  measurement keeps the last safe scale (0 before the first: no unguarded step)
  and is counted in the state's ``num_nonfinite``. Momentum or Adam change the
  true bound: the guard is then a heuristic.

  Args:
    f: ``f(params, x) -> [N, O]`` (logits ``[N, C]`` for cross-entropy).
    probe_x: probe batch ``[N, ...]``.
    lr: the chained optimizer's learning rate.
    safety: target fraction of the bound, in ``(0, 1]``.
    every: recompute the bound every ``every`` update calls (step 0 included).
    loss: ``"mean"`` (``2N/λmax``), ``"sum"`` (``2/λmax``), ``"elementwise_mean"``
      (``2NO/λmax``), ``"softmax_cross_entropy"`` or
      ``"softmax_cross_entropy_sum"`` (at the current logits). ``None``
      (default): the MSE bound of ``"mean"``; name the loss you train with.
    method: ``"kernel"`` (form the kernel, exact ``λmax``) or ``"lanczos"``
      (Lanczos on ``v ↦ J Jᵀ v``, weighted by the loss Hessian for
      cross-entropy; a lower estimate of ``λmax``, so a larger bound).
    num_iters: Lanczos steps for ``method="lanczos"``.
    trainable: optax-style mask of the parameters in the kernel.
    **ntk_options: other ``ntk_fn`` options (``method="kernel"`` only; not
      ``trace_axes``, ``diagonal_axes`` or ``layerwise``).

  Returns:
    An ``optax.GradientTransformationExtraArgs`` with state
    :class:`NTKStepSizeGuardState`; ``init`` and ``update`` raise without params
    or with masked ones (chain it outside ``optax.multi_transform``).

  Example:
    >>> import haiku as hk, jax, jax.numpy as jnp, optax, ntklayers, ntklayers.optax
    >>> net = hk.without_apply_rng(hk.transform(lambda x: ntklayers.Linear(1)(x)))
    >>> x = jnp.ones((4, 3)); params = net.init(jax.random.key(0), x)
    >>> opt = optax.chain(optax.sgd(100.0),
    ...                   ntklayers.optax.step_size_guard(net.apply, x, lr=100.0))
    >>> state = opt.init(params)
    >>> _, state = opt.update(params, state, params)
    >>> float(state[1].scale) < 1, int(state[1].num_nonfinite)
    (True, 0)
  """
  every = _check_every(every)
  if not (isinstance(lr, (int, float)) and lr > 0):
    raise ValueError(f"`lr` must be a positive number, got {lr!r}.")
  if not (isinstance(safety, (int, float)) and 0 < safety <= 1):
    raise ValueError(f"`safety` must be in (0, 1], got {safety!r}.")
  loss = _m.check_loss(loss, "step_size_guard", allow_default=True)
  if method not in ("kernel", "lanczos"):
    raise ValueError(f"`method` must be 'kernel' or 'lanczos', got {method!r}.")
  if {"trace_axes", "diagonal_axes", "layerwise"} & set(ntk_options):
    raise ValueError("step_size_guard needs the full [N, N, O, O] kernel: do not pass "
                     "`trace_axes`, `diagonal_axes` or `layerwise`.")
  if method == "lanczos" and ntk_options:
    raise ValueError(f"ntk_fn options {sorted(ntk_options)} need method='kernel'.")
  kernel_fn = _api.ntk_fn(f, trainable=trainable, **ntk_options)
  probe_x = jax.tree.map(jnp.asarray, probe_x)
  want_logits = _m.needs_outputs(loss)

  def bound(params: Any) -> tuple[jax.Array, jax.Array]:
    if want_logits:
      _m.check_logits(jax.eval_shape(f, params, probe_x).shape, "step_size_guard")
    if method == "lanczos":
      return _m.matrix_free_bound(f, params, probe_x, loss, num_iters=num_iters,
                                       trainable=trainable)
    K = cast(jax.Array, kernel_fn(params, probe_x))
    logits = f(params, probe_x) if want_logits else None
    return _m.kernel_bound(K, loss, logits, "step_size_guard")

  def init(params: optax.Params) -> NTKStepSizeGuardState:
    check_params(params, "step_size_guard")
    dtype = jax.eval_shape(bound, params)[0].dtype
    nan = jnp.full((), jnp.nan, dtype)
    zero = jnp.zeros([], jnp.int32)
    return NTKStepSizeGuardState(zero, jnp.zeros((), dtype), nan, nan, zero)

  def refresh(state: NTKStepSizeGuardState, params: Any) -> NTKStepSizeGuardState:
    lam, stable = bound(params)
    safe = jnp.isfinite(lam) & ~jnp.isnan(stable)
    scale = jnp.minimum(1, safety * stable / lr)
    return state._replace(
        scale=jnp.where(safe, scale, state.scale), stable_lr=stable,
        probe_lambda_max=lam,
        num_nonfinite=state.num_nonfinite + (~safe).astype(jnp.int32))

  def update(updates: optax.Updates, state: NTKStepSizeGuardState,
             params: optax.Params | None = None,
             **extra_args: Any) -> tuple[optax.Updates, NTKStepSizeGuardState]:
    del extra_args
    check_params(params, "step_size_guard")
    state = jax.lax.cond(state.count % every == 0, refresh, lambda s, p: s, state, params)
    updates = jax.tree.map(lambda u: u * state.scale.astype(u.dtype), updates)
    return updates, state._replace(count=state.count + 1)

  return optax.GradientTransformationExtraArgs(init, update)
