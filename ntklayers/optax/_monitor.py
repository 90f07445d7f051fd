"""NTK monitoring as an optax gradient transformation (the guard: ``_guard.py``).

The monitor and :func:`ntklayers.optax.step_size_guard` are
:class:`optax.GradientTransformationExtraArgs` with pure ``init`` / ``update`` and
NamedTuple states, so they compose with ``optax.chain`` and run inside a jitted
train step. They need the current parameters of the whole model: call
``opt.update(grads, opt_state, params)``, outside ``optax.multi_transform`` /
``optax.masked`` (:func:`check_params`). Every ``every`` update calls (step 0
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
from ntklayers import metrics as _m

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


class _Config(NamedTuple):
  """What the named metrics of one monitor need besides the kernel."""
  loss: str
  probe_y: Any
  num_classes: int | None
  trace_axes: tuple[int, ...]
  diagonal_axes: tuple[int, ...]


class _Probe(NamedTuple):
  """The model's outputs on the probe batch: their shape, and the logits when needed."""
  out_shape: tuple[int, ...]
  outputs: jax.Array | None


_DIAGONAL_OK = ("trace", "relative_change")


def _named_metric(name: str, metric: str, cfg: _Config) -> Callable[..., jax.Array]:
  """``(K, K_0, probe) -> []`` for a named metric; refuses meaningless combinations."""
  if metric not in _NAMED:
    raise ValueError(f"Unknown metric {metric!r}; named metrics are {_NAMED}, or pass a "
                     f"callable K -> scalar (in a dict {{name: fn}} for a lambda).")
  if cfg.diagonal_axes and metric not in _DIAGONAL_OK:
    raise ValueError(
        f"monitor: metric {name!r} ({metric}) needs the full kernel, but "
        f"`diagonal_axes`={cfg.diagonal_axes} keeps only its diagonal. With "
        f"`diagonal_axes` only {_DIAGONAL_OK} (and your callables) are available.")
  if metric == "max_stable_lr" and cfg.trace_axes:
    raise ValueError(
        f"monitor: metric {name!r} (max_stable_lr) is the stability bound of the full "
        f"kernel, but `trace_axes`={cfg.trace_axes} averages the kernel over outputs, "
        f"and the bound of that kernel exceeds the model's (an unsafe step size). "
        f"Monitor max_stable_lr without `trace_axes` (e.g. in a second monitor).")
  if metric == "trace":
    return lambda K, K0, probe: _m.trace(K, diagonal_axes=cfg.diagonal_axes)
  if metric in _SPECTRAL:
    fn = getattr(_m, metric)
    return lambda K, K0, probe: fn(K)
  if metric == "max_stable_lr":
    return lambda K, K0, probe: _m.kernel_bound(K, cfg.loss, probe.outputs,
                                                     "monitor")[1]
  if metric == "relative_change":
    return lambda K, K0, probe: _m.relative_change(K, K0)
  if cfg.probe_y is None:
    raise ValueError(f"Metric {name!r} needs the probe targets: pass `probe_y`.")
  centered = metric == "centered_alignment"

  def align(K, K0, probe):
    num_classes = _m.default_num_classes(cfg.probe_y, cfg.num_classes,
                                                  probe.out_shape)
    return _m.alignment(K, cfg.probe_y, centered, num_classes=num_classes)

  return align


def _resolve(metrics: Sequence[Metric] | Mapping[str, Metric],
             cfg: _Config) -> tuple[dict[str, Callable[..., jax.Array]], set[str]]:
  """``{name: (K, K_0, probe) -> []}`` and the named metrics used."""
  if isinstance(metrics, (str, bytes)) or callable(metrics):
    metrics = (metrics,)
  items = list(metrics.items()) if isinstance(metrics, Mapping) else [
      (m if isinstance(m, str) else getattr(m, "__name__", None), m) for m in metrics]
  out: dict[str, Callable[..., jax.Array]] = {}
  used = set()
  for name, m in items:
    if not isinstance(name, str) or name == "<lambda>":
      raise ValueError(f"Metric {m!r} has no usable name: pass metrics as a dict "
                       f"{{'my_metric': fn}}.")
    if name in out:
      raise ValueError(f"Metric {name!r} is given twice.")
    if isinstance(m, str):
      out[name] = _named_metric(name, m, cfg)
      used.add(m)
    elif callable(m):
      out[name] = lambda K, K0, probe, m=m: m(K)
    else:
      raise TypeError(f"Metric {name!r} must be a name or a callable, got {m!r}.")
  if not out:
    raise ValueError("`metrics` is empty: nothing to monitor.")
  return out, used


def _check_every(every: Any, name: str = "every") -> int:
  if isinstance(every, bool) or not isinstance(every, (int, np.integer)) or every < 1:
    raise ValueError(f"`{name}` must be a positive int, got {every!r}.")
  return int(every)


def check_params(params: Any, fn: str) -> None:
  """Refuses missing or masked parameters (inside ``optax.multi_transform``/``masked``)."""
  if params is None:
    raise ValueError(NO_PARAMS_MSG.format(fn=fn))
  is_masked = lambda n: isinstance(n, optax.MaskedNode)
  if any(is_masked(leaf) for leaf in jax.tree.leaves(params, is_leaf=is_masked)):
    raise ValueError(
        f"ntklayers.optax.{fn} got masked parameters (optax.MaskedNode leaves): inside "
        f"optax.multi_transform or optax.masked it sees only part of the parameters "
        f"and cannot compute the model's NTK. Chain it outside the multi_transform / "
        f"masked wrapper: optax.chain(optax.multi_transform(...), "
        f"ntklayers.optax.{fn}(...)).")


def monitor(f: Callable[[Any, Any], jax.Array], probe_x: Any, *, every: int = 100,
            metrics: Sequence[Metric] | Mapping[str, Metric] = DEFAULT_METRICS,
            history: int = 100, trace_axes: int | Sequence[int] = (),
            trainable: Any = None, loss: str | None = None, probe_y: Any = None,
            num_classes: int | None = None,
            **ntk_options: Any) -> optax.GradientTransformationExtraArgs:
  """Records NTK metrics of the current params on a probe batch; updates unchanged.

  At steps ``0, every, 2·every, ...`` computes ``K = ntk_fn(f, trace_axes=...,
  trainable=..., **ntk_options)(params, probe_x)`` and each metric of ``K``;
  stores the latest values and a ring buffer of the last ``history`` records.
  A kernel with a NaN or an inf records NaN for every named metric.

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
    trace_axes: as in ``ntk_fn`` (default ``()``: full ``[N, N, O, O]``). The
      spectral metrics are then those of the traced kernel; ``max_stable_lr`` is
      refused (the traced kernel's bound exceeds the model's).
    trainable: optax-style mask of the parameters in the kernel.
    loss: the loss of ``max_stable_lr`` (see
      :func:`ntklayers.metrics.max_stable_lr`): ``"mean"``, ``"sum"``,
      ``"elementwise_mean"`` (MSE) or ``"softmax_cross_entropy"``,
      ``"softmax_cross_entropy_sum"`` (the logits ``f(params, probe_x)`` are then
      computed at each record). ``None`` (default): the MSE bound of ``"mean"``;
      name the loss you train with.
    probe_y: targets of the probe batch for the alignment metrics; integer
      labels ``[N]`` are one-hot over ``num_classes``, by default the ``O`` of
      outputs ``[N, O]`` (as in ``check_trainability``).
    num_classes: for integer ``probe_y`` (one-hot encoding).
    **ntk_options: other ``ntk_fn`` options (``implementation``, ...). With
      ``diagonal_axes`` only ``trace`` (of the diagonal kernel, the full
      kernel's trace) and ``relative_change`` are available; ``layerwise`` is
      refused (monitor each layer's kernel with a callable instead).

  Returns:
    An ``optax.GradientTransformationExtraArgs`` with state
    :class:`NTKMonitorState`; its ``init`` and ``update`` raise ``ValueError``
    without params or with masked params (chain it outside
    ``optax.multi_transform`` and ``optax.masked``).

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
  loss = _m.check_loss(loss, "monitor", allow_default=True)
  if ntk_options.get("layerwise"):
    raise ValueError("monitor records scalar metrics of the whole kernel: "
                     "layerwise=True is not supported.")
  cfg = _Config(loss, probe_y, num_classes, _m.diagonal_axes_tuple(trace_axes),
                _m.diagonal_axes_tuple(ntk_options.get("diagonal_axes", ())))
  fns, used = _resolve(metrics, cfg)
  names = tuple(sorted(fns))
  keep_k0 = "relative_change" in used
  want_logits = "max_stable_lr" in used and _m.needs_outputs(loss)
  kernel_fn = _api.ntk_fn(f, trace_axes=trace_axes, trainable=trainable, **ntk_options)
  probe_x = jax.tree.map(jnp.asarray, probe_x)

  def measure(K, kernel0, params):
    out_shape = tuple(jax.eval_shape(f, params, probe_x).shape)
    probe = _Probe(out_shape, f(params, probe_x) if want_logits else None)
    out = {}
    for name in names:
      v = jnp.asarray(fns[name](K, kernel0, probe))
      if v.shape:
        raise ValueError(f"Metric {name!r} must return a scalar, got shape {v.shape}.")
      out[name] = v.astype(K.dtype)
    return out

  def init(params: optax.Params) -> NTKMonitorState:
    check_params(params, "monitor")
    k_shape = jax.eval_shape(lambda p: kernel_fn(p, probe_x), params)
    jax.eval_shape(lambda p, K: measure(K, K, p), params, k_shape)  # checks early
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
    values = measure(K, kernel0, params)
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
    check_params(params, "monitor")
    state = jax.lax.cond(state.count % every == 0, record, lambda s, p: s, state, params)
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
