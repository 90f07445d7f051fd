"""NTK monitoring and an NTK step-size guard as optax gradient transformations.

Both are :class:`optax.GradientTransformationExtraArgs` with pure ``init`` /
``update`` and NamedTuple states, so they compose with ``optax.chain`` and run
inside a jitted train step. They need the current parameters: call
``opt.update(grads, opt_state, params)``. Every ``every`` update calls (step 0
included) they compute the NTK of ``f`` at ``params`` on a fixed probe batch,
inside a ``lax.cond``, so the other steps pay nothing for the kernel.

Glossary of shapes: ``N`` probe batch size; ``O`` outputs of ``f`` per example
(the flattened kernel is ``[N·O, N·O]``, see :func:`ntklayers.metrics.flatten`);
``H`` history length; ``M`` number of monitored metrics.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple, cast

import jax
import jax.numpy as jnp
import numpy as np
import optax

from ntklayers import _core as _api
from ntklayers.metrics import _lanczos
from ntklayers.metrics import _spectral as _metrics
from ntklayers.metrics import _similarity

Metric = str | Callable[[jax.Array], jax.Array]
DEFAULT_METRICS = ("lambda_max", "lambda_min", "condition_number", "trace",
                   "effective_rank")
_SPECTRAL = ("lambda_max", "lambda_min", "condition_number", "trace", "effective_rank")
_NAMED = (*_SPECTRAL, "max_stable_lr", "relative_change", "alignment",
          "centered_alignment")
NO_PARAMS_MSG = (
    "ntklayers.optax.{fn} needs the current parameters to compute the NTK: call "
    "`opt.update(grads, opt_state, params)` (optax passes `params` on to every "
    "transformation of a chain).")


class NTKMonitorState(NamedTuple):
  """State of :func:`monitor`.

  ``optax.tree_utils.tree_get(opt_state, "lambda_max")`` finds a metric's
  latest value in ``values``; read the history with :func:`monitor_history`.

  Attributes:
    count: ``[]`` int32, number of ``update`` calls so far.
    values: ``{name: []}`` latest value of each metric (NaN before the first).
    last_step: ``[]`` int32, step of ``values`` (``-1`` before the first).
    num_records: ``[]`` int32, monitored steps so far (may exceed ``H``).
    history: ``[H, M]`` ring buffer, column ``j`` is ``sorted(values)[j]``;
      row ``num_records % H`` is written next.
    history_step: ``[H]`` int32 step of each row (``-1``: empty).
    kernel0: ``[N, N, O, O]`` kernel at the first monitored step, only when
      ``relative_change`` is monitored (else ``None``).
  """
  count: jax.Array  # type: ignore[assignment]  # a field, as in optax's states
  values: dict[str, jax.Array]
  last_step: jax.Array
  num_records: jax.Array
  history: jax.Array
  history_step: jax.Array
  kernel0: jax.Array | None


class NTKStepSizeGuardState(NamedTuple):
  """State of :func:`step_size_guard`.

  Attributes:
    count: ``[]`` int32, number of ``update`` calls so far.
    scale: ``[]`` factor multiplying the updates, ``min(1, safety·stable_lr/lr)``.
    stable_lr: ``[]`` last bound ``2N/λmax`` (for ``loss="mean"``), NaN before.
    probe_lambda_max: ``[]`` last ``λmax`` of the probe kernel, NaN before.
  """
  count: jax.Array  # type: ignore[assignment]  # a field, as in optax's states
  scale: jax.Array
  stable_lr: jax.Array
  probe_lambda_max: jax.Array


def _named_metric(name: str, loss: str, probe_y: Any, num_classes: int | None):
  if name in _SPECTRAL:
    return getattr(_metrics, name)
  if name == "max_stable_lr":
    return lambda K: _metrics.max_stable_lr(K, loss=loss)
  if name in ("alignment", "centered_alignment"):
    if probe_y is None:
      raise ValueError(f"Metric {name!r} needs the probe targets: pass `probe_y`.")
    centered = name == "centered_alignment"
    return lambda K: _similarity.alignment(K, probe_y, centered, num_classes=num_classes)
  raise ValueError(f"Unknown metric {name!r}; named metrics are {_NAMED}, or pass a "
                   f"callable K -> scalar (in a dict {{name: fn}} for a lambda).")


def _resolve(metrics: Sequence[Metric] | Mapping[str, Metric], loss: str, probe_y: Any,
             num_classes: int | None) -> dict[str, Any]:
  """``{name: K -> scalar}``; ``relative_change`` maps to ``None`` (needs ``K_0``)."""
  if isinstance(metrics, (str, bytes)) or callable(metrics):
    metrics = (metrics,)
  items = list(metrics.items()) if isinstance(metrics, Mapping) else [
      (m if isinstance(m, str) else getattr(m, "__name__", None), m) for m in metrics]
  out = {}
  for name, m in items:
    if not isinstance(name, str) or name == "<lambda>":
      raise ValueError(f"Metric {m!r} has no usable name: pass metrics as a dict "
                       f"{{'my_metric': fn}}.")
    if name in out:
      raise ValueError(f"Metric {name!r} is given twice.")
    if isinstance(m, str):
      out[name] = None if m == "relative_change" else _named_metric(m, loss, probe_y,
                                                                    num_classes)
    elif callable(m):
      out[name] = m
    else:
      raise TypeError(f"Metric {name!r} must be a name or a callable, got {m!r}.")
  if not out:
    raise ValueError("`metrics` is empty: nothing to monitor.")
  return out


def _check_every(every: Any, name: str = "every") -> int:
  if isinstance(every, bool) or not isinstance(every, (int, np.integer)) or every < 1:
    raise ValueError(f"`{name}` must be a positive int, got {every!r}.")
  return int(every)


def monitor(f: Callable[[Any, Any], jax.Array], probe_x: Any, *, every: int = 100,
            metrics: Sequence[Metric] | Mapping[str, Metric] = DEFAULT_METRICS,
            history: int = 100, trace_axes: int | Sequence[int] = (),
            trainable: Any = None, loss: str = "mean", probe_y: Any = None,
            num_classes: int | None = None,
            **ntk_options: Any) -> optax.GradientTransformationExtraArgs:
  """Records NTK metrics of the current params on a probe batch; updates unchanged.

  At steps ``0, every, 2·every, ...`` computes ``K = ntk_fn(f, trace_axes=...,
  trainable=..., **ntk_options)(params, probe_x)`` and each metric of ``K``;
  stores the latest values and a ring buffer of the last ``history`` records.

  Cost per record: one kernel plus, for the spectral metrics, one eigenvalue
  computation of the ``[N·O, N·O]`` matrix shared by all of them (XLA merges
  the identical calls; no eigenvectors). On 2 CPU cores, for the example's MLP
  and ``N·O = 640``: about 5 ms for the kernel, 12 ms for the eigenvalues;
  ``trace`` alone needs none. The other steps pay only the ``lax.cond``
  (``benchmarks/bench_monitor.py``).

  Args:
    f: ``f(params, x) -> [N, O]`` (e.g. a Haiku ``apply``), as for ``ntk_fn``.
    probe_x: the probe batch ``[N, ...]`` (kept as a constant of the step).
    every: monitor every ``every`` update calls (step 0 included).
    metrics: names from :mod:`ntklayers.metrics` (``lambda_max``, ``lambda_min``,
      ``condition_number``, ``trace``, ``effective_rank``, ``max_stable_lr``
      (with ``loss``), ``alignment`` / ``centered_alignment`` (with
      ``probe_y``), ``relative_change`` (``‖K_t − K_0‖/‖K_0‖``, ``K_0`` at step
      0; keeps ``K_0`` in the state)), callables ``K -> []`` (named by
      ``__name__``), or a dict ``{name: name or callable}``.
    history: ring-buffer length ``H``.
    trace_axes: as in ``ntk_fn`` (default ``()``: full ``[N, N, O, O]``).
    trainable: optax-style mask of the parameters in the kernel.
    loss: loss normalization of ``max_stable_lr`` (``"mean"``, ``"sum"``,
      ``"elementwise_mean"``).
    probe_y: targets of the probe batch for the alignment metrics.
    num_classes: for integer ``probe_y`` (one-hot encoding).
    **ntk_options: other ``ntk_fn`` options (``implementation``, ...).

  Returns:
    An ``optax.GradientTransformationExtraArgs`` with state
    :class:`NTKMonitorState`; its ``update`` raises ``ValueError`` without params.

  Example:
    >>> import haiku as hk, jax, jax.numpy as jnp, optax, ntklayers, ntklayers.optax
    >>> net = hk.without_apply_rng(hk.transform(lambda x: ntklayers.Linear(2)(x)))
    >>> x = jnp.ones((4, 3)); params = net.init(jax.random.key(0), x)
    >>> opt = optax.chain(optax.adam(1e-3), ntklayers.optax.monitor(net.apply, x, every=10))
    >>> state = opt.init(params)
    >>> _, state = opt.update(params, state, params)
    >>> float(optax.tree_utils.tree_get(state, "trace")) > 0
    True
  """
  every, size = _check_every(every), _check_every(history, "history")
  if loss not in _metrics.LOSSES:
    raise ValueError(f"`loss` must be one of {_metrics.LOSSES}, got {loss!r}.")
  if ntk_options.get("layerwise"):
    raise ValueError("monitor records scalar metrics of the whole kernel: "
                     "layerwise=True is not supported.")
  fns = _resolve(metrics, loss, probe_y, num_classes)
  names = tuple(sorted(fns))
  keep_k0 = any(fn is None for fn in fns.values())
  kernel_fn = _api.ntk_fn(f, trace_axes=trace_axes, trainable=trainable, **ntk_options)
  probe_x = jax.tree.map(jnp.asarray, probe_x)

  def measure(K, kernel0):
    out = {}
    for name in names:
      v = _similarity.relative_change(K, kernel0) if fns[name] is None else fns[name](K)
      v = jnp.asarray(v)
      if v.shape:
        raise ValueError(f"Metric {name!r} must return a scalar, got shape {v.shape}.")
      out[name] = v.astype(K.dtype)
    return out

  def init(params: optax.Params) -> NTKMonitorState:
    k_shape = jax.eval_shape(lambda p: kernel_fn(p, probe_x), params)
    jax.eval_shape(lambda K: measure(K, K), k_shape)  # checks the metrics early
    dtype = k_shape.dtype
    nan = jnp.full((), jnp.nan, dtype)
    return NTKMonitorState(
        count=jnp.zeros([], jnp.int32), values={n: nan for n in names},
        last_step=jnp.full([], -1, jnp.int32), num_records=jnp.zeros([], jnp.int32),
        history=jnp.full((size, len(names)), jnp.nan, dtype),
        history_step=jnp.full((size,), -1, jnp.int32),
        kernel0=jnp.zeros(k_shape.shape, dtype) if keep_k0 else None)

  def record(state: NTKMonitorState, params: Any) -> NTKMonitorState:
    K = cast(jax.Array, kernel_fn(params, probe_x))  # layerwise=False: one array
    kernel0 = state.kernel0
    if keep_k0:  # K_0 is the kernel of the first monitored step (this one if none yet)
      kernel0 = jnp.where(state.num_records == 0, K, cast(jax.Array, kernel0))
    values = measure(K, kernel0)
    slot = state.num_records % size
    row = jnp.stack([values[n] for n in names])
    return NTKMonitorState(
        count=state.count, values=values, last_step=state.count,
        num_records=state.num_records + 1, history=state.history.at[slot].set(row),
        history_step=state.history_step.at[slot].set(state.count), kernel0=kernel0)

  def update(updates: optax.Updates, state: NTKMonitorState,
             params: optax.Params | None = None,
             **extra_args: Any) -> tuple[optax.Updates, NTKMonitorState]:
    del extra_args
    if params is None:
      raise ValueError(NO_PARAMS_MSG.format(fn="monitor"))
    state = jax.lax.cond(state.count % every == 0, record, lambda s, p: s, state, params)
    return updates, state._replace(count=state.count + 1)

  return optax.GradientTransformationExtraArgs(init, update)


def step_size_guard(f: Callable[[Any, Any], jax.Array], probe_x: Any, *, lr: float,
                    safety: float = 0.5, every: int = 10, loss: str = "mean",
                    method: str = "kernel", num_iters: int = 20, trainable: Any = None,
                    **ntk_options: Any) -> optax.GradientTransformationExtraArgs:
  """Scales updates so the effective step stays below ``safety × max_stable_lr``.

  Assumes the chained optimizer is SGD-like with step ``lr`` (updates
  ``-lr·g``, e.g. ``optax.sgd(lr)``) on an MSE loss with normalization ``loss``,
  and that ``probe_x`` is (representative of) the training batch: the bound is
  the full-batch gradient-descent bound ``η < 2N/λmax`` of the linearized model
  (see :func:`ntklayers.metrics.max_stable_lr`). Every ``every`` steps it
  recomputes ``λmax`` of the full ``[N, N, O, O]`` probe kernel and sets
  ``scale = min(1, safety · bound / lr)``; all updates are multiplied by
  ``scale`` (so the effective step is ``min(lr, safety·bound)``). Momentum,
  Adam or cross-entropy change the true bound: the guard is then a heuristic.

  Args:
    f: ``f(params, x) -> [N, O]``.
    probe_x: probe batch ``[N, ...]``.
    lr: the chained optimizer's learning rate.
    safety: target fraction of the bound, in ``(0, 1]``.
    every: recompute ``λmax`` every ``every`` update calls (step 0 included).
    loss: ``"mean"`` (``2N/λmax``), ``"sum"`` (``2/λmax``) or
      ``"elementwise_mean"`` (``2NO/λmax``).
    method: ``"kernel"`` (form the kernel, exact ``λmax``) or ``"lanczos"``
      (:func:`ntklayers.metrics.lambda_max_matrix_free`, a lower estimate).
    num_iters: Lanczos steps for ``method="lanczos"``.
    trainable: optax-style mask of the parameters in the kernel.
    **ntk_options: other ``ntk_fn`` options (``method="kernel"`` only).

  Returns:
    An ``optax.GradientTransformationExtraArgs`` with state
    :class:`NTKStepSizeGuardState`.

  Example:
    >>> import haiku as hk, jax, jax.numpy as jnp, optax, ntklayers, ntklayers.optax
    >>> net = hk.without_apply_rng(hk.transform(lambda x: ntklayers.Linear(1)(x)))
    >>> x = jnp.ones((4, 3)); params = net.init(jax.random.key(0), x)
    >>> opt = optax.chain(optax.sgd(100.0),
    ...                   ntklayers.optax.step_size_guard(net.apply, x, lr=100.0))
    >>> state = opt.init(params)
    >>> _, state = opt.update(params, state, params)
    >>> float(state[1].scale) < 1
    True
  """
  every = _check_every(every)
  if not (isinstance(lr, (int, float)) and lr > 0):
    raise ValueError(f"`lr` must be a positive number, got {lr!r}.")
  if not (isinstance(safety, (int, float)) and 0 < safety <= 1):
    raise ValueError(f"`safety` must be in (0, 1], got {safety!r}.")
  if loss not in _metrics.LOSSES:
    raise ValueError(f"`loss` must be one of {_metrics.LOSSES}, got {loss!r}.")
  if method not in ("kernel", "lanczos"):
    raise ValueError(f"`method` must be 'kernel' or 'lanczos', got {method!r}.")
  if {"trace_axes", "diagonal_axes", "layerwise"} & set(ntk_options):
    raise ValueError("step_size_guard needs the full [N, N, O, O] kernel: do not pass "
                     "`trace_axes`, `diagonal_axes` or `layerwise`.")
  if method == "lanczos" and ntk_options:
    raise ValueError(f"ntk_fn options {sorted(ntk_options)} need method='kernel'.")
  kernel_fn = _api.ntk_fn(f, trainable=trainable, **ntk_options)
  probe_x = jax.tree.map(jnp.asarray, probe_x)

  def bound(params):
    if method == "kernel":
      K = kernel_fn(params, probe_x)
      return _metrics.lambda_max(K), _metrics.max_stable_lr(K, loss=loss)
    lam = _lanczos.lambda_max_matrix_free(f, params, probe_x, num_iters=num_iters,
                                          trainable=trainable)
    out = jax.eval_shape(f, params, probe_x)
    n = {"mean": out.shape[0], "sum": 1, "elementwise_mean": out.size}[loss]
    return lam, jnp.where(lam > 0, 2 * n / jnp.where(lam > 0, lam, 1), jnp.inf)

  def init(params: optax.Params) -> NTKStepSizeGuardState:
    dtype = jax.eval_shape(bound, params)[0].dtype
    nan = jnp.full((), jnp.nan, dtype)
    return NTKStepSizeGuardState(jnp.zeros([], jnp.int32), jnp.ones((), dtype), nan, nan)

  def refresh(state: NTKStepSizeGuardState, params: Any) -> NTKStepSizeGuardState:
    lam, stable = bound(params)
    scale = jnp.minimum(1, safety * stable / lr)
    scale = jnp.where(jnp.isnan(scale), state.scale, scale)  # keep it on a NaN kernel
    return state._replace(scale=scale, stable_lr=stable, probe_lambda_max=lam)

  def update(updates: optax.Updates, state: NTKStepSizeGuardState,
             params: optax.Params | None = None,
             **extra_args: Any) -> tuple[optax.Updates, NTKStepSizeGuardState]:
    del extra_args
    if params is None:
      raise ValueError(NO_PARAMS_MSG.format(fn="step_size_guard"))
    state = jax.lax.cond(state.count % every == 0, refresh, lambda s, p: s, state, params)
    updates = jax.tree.map(lambda u: u * state.scale.astype(u.dtype), updates)
    return updates, state._replace(count=state.count + 1)

  return optax.GradientTransformationExtraArgs(init, update)


def monitor_state(opt_state: Any, index: int | None = None) -> NTKMonitorState:
  """Finds the :class:`NTKMonitorState` in an optimizer state (e.g. of a chain).

  Args:
    opt_state: any optax state pytree.
    index: which monitor, in pytree order, if the chain has several.

  Raises:
    ValueError: if there is no monitor, or several and no ``index``.
  """
  found = [s for s in jax.tree.leaves(opt_state, is_leaf=lambda n: isinstance(
      n, NTKMonitorState)) if isinstance(s, NTKMonitorState)]
  if not found:
    raise ValueError("No ntklayers.optax.monitor state in `opt_state`.")
  if index is None and len(found) > 1:
    raise ValueError(f"`opt_state` holds {len(found)} monitor states: pass `index`.")
  return found[index or 0]


def monitor_values(opt_state: Any, index: int | None = None) -> dict[str, float]:
  """Latest monitored values ``{name: float}`` (NaN before the first record).

  Example:
    ``ntklayers.optax.monitor_values(opt_state)["condition_number"]``; the same
    value as ``optax.tree_utils.tree_get(opt_state, "condition_number")``.
  """
  return {k: float(v) for k, v in monitor_state(opt_state, index).values.items()}


def monitor_history(opt_state: Any, index: int | None = None) -> dict[str, np.ndarray]:
  """The recorded history, oldest first: ``{"step": [T], name: [T], ...}``.

  ``T = min(num_records, H)``: the ring buffer keeps the last ``H`` records. The
  result plugs into ``ntklayers.plot.history(h, steps=h.pop("step"))``.
  """
  s = monitor_state(opt_state, index)
  size, n = s.history.shape[0], int(s.num_records)
  order = np.arange(n) if n <= size else (np.arange(size) + n) % size
  hist = np.asarray(s.history)[order]
  out = {"step": np.asarray(s.history_step)[order]}
  out.update({name: hist[:, j] for j, name in enumerate(sorted(s.values))})
  return out
