"""NTK-calibrated initialization: per-layer log-scales fitted through the kernel.

``calibrate`` multiplies every leaf of layer ``ℓ`` by ``exp(s_ℓ)`` and fits the
log-scales ``s`` with Adam, by exact gradients through ``ntk_fn``'s kernel on a
probe batch, so that the NTK has a target scale and a low condition number.

Glossary of shapes: ``N`` probe examples, ``O`` outputs, ``L`` layers (groups).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Hashable, Sequence
from typing import Any, cast

import jax
import jax.numpy as jnp

from ntklayers._core import ntk_fn

GroupFn = Callable[[tuple[Any, ...]], "str | None"]

# Linen collections that hold state, not parameters: never scaled by default.
_STATE_COLLECTIONS = ("batch_stats", "cache", "intermediates", "losses", "state")


def _key_name(key: Any) -> str:
  for attr in ("key", "name", "idx"):
    if hasattr(key, attr):
      return str(getattr(key, attr))
  return str(key)


def module_path(path: tuple[Any, ...]) -> str | None:
  """Default ``group_fn``: the module path of a leaf, i.e. its layer.

  A leaf's path in the params tree minus its own name: Haiku's
  ``{"mlp/~/linear_0": {"w", "b"}}`` gives ``"mlp/~/linear_0"``; linen's
  ``{"params": {"MLP_0": {"Dense_0": {"kernel", "bias"}}}}`` (or the inner
  ``{"MLP_0": ...}``) gives ``"MLP_0/Dense_0"``. A leading ``"params"``
  collection is dropped; leaves under linen state collections (``batch_stats``,
  ``cache``, ``intermediates``, ``losses``, ``state``) give ``None`` (not
  scaled). A top-level leaf is its own group.

  Args:
    path: a key path as given by ``jax.tree_util.tree_flatten_with_path``.

  Returns:
    The group name, or ``None`` for a leaf that must not be scaled.

  Example:
    >>> from jax.tree_util import DictKey
    >>> module_path((DictKey("mlp/~/linear_0"), DictKey("w")))
    'mlp/~/linear_0'
    >>> module_path((DictKey("params"), DictKey("Dense_0"), DictKey("kernel")))
    'Dense_0'
  """
  names = [_key_name(k) for k in path]
  if len(names) > 1 and names[0] in _STATE_COLLECTIONS:
    return None
  if len(names) > 2 and names[0] == "params":
    names = names[1:]
  return "/".join(names[:-1]) if len(names) > 1 else names[0]


def _groups(params: Any, group_fn: GroupFn) -> tuple[tuple[str, ...], tuple[int, ...]]:
  """(group names in leaf order, per-leaf group index or -1 for unscaled leaves)."""
  names: list[str] = []
  index = []
  for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
    group = group_fn(path)
    if group is None or not jnp.issubdtype(jnp.result_type(leaf), jnp.floating):
      index.append(-1)
      continue
    if group not in names:
      names.append(group)
    index.append(names.index(group))
  if not names:
    raise ValueError("`calibrate`: no floating-point leaf of `params` belongs to a group.")
  return tuple(names), tuple(index)


def _apply_log_scales(params: Any, log_scales: jax.Array, index: Sequence[int]) -> Any:
  leaves, treedef = jax.tree.flatten(params)
  out = [leaf if i < 0 else leaf * jnp.exp(log_scales[i]).astype(jnp.result_type(leaf))
         for leaf, i in zip(leaves, index)]
  return jax.tree.unflatten(treedef, out)


def scale_params(params: Any, scales: dict[str, Any], *,
                 group_fn: GroupFn = module_path) -> Any:
  """Multiplies every leaf of each group by its factor (groups not named: unchanged).

  Args:
    params: a params pytree.
    scales: ``{group name: positive factor}``, as returned by
      ``calibrate(..., return_scales=True)``.
    group_fn: the grouping used by :func:`calibrate`.

  Returns:
    Params of the same structure and dtypes.

  Example:
    >>> import jax.numpy as jnp
    >>> p = {"linear": {"w": jnp.ones(2), "b": jnp.ones(2)}, "linear_1": {"w": jnp.ones(2)}}
    >>> scale_params(p, {"linear": 2.0})["linear"]["w"].tolist()
    [2.0, 2.0]
  """
  unknown = set(scales) - set(_groups(params, group_fn)[0])
  if unknown:
    raise ValueError(f"`scale_params`: no such groups {sorted(unknown)} in params.")

  def scale(path, leaf):
    group = group_fn(path)
    if group not in scales or not jnp.issubdtype(jnp.result_type(leaf), jnp.floating):
      return leaf
    return leaf * jnp.asarray(scales[group], dtype=jnp.result_type(leaf))

  return jax.tree_util.tree_map_with_path(scale, params)


def objective_terms(K: jax.Array, *, ridge: float = 1e-3) -> tuple[jax.Array, jax.Array]:
  """``(log(tr K / N), log κ_ridge)`` of an ``[N, N]`` kernel, both differentiable.

  ``κ_ridge = (λmax + r) / (λmin + r)`` with ``r = ridge · tr K / N``: the ridge
  is relative to the mean eigenvalue, so ``κ_ridge`` is scale invariant, finite
  for singular kernels (at most ``1 + N / ridge``) and has bounded gradients.

  Args:
    K: ``[N, N]`` kernel (``trace_axes=(-1,)``; a flattened ``[N·O, N·O]`` works too).
    ridge: relative ridge ``> 0``.

  Returns:
    Two scalars: the log mean eigenvalue and the log ridged condition number.

  Example:
    >>> import jax.numpy as jnp
    >>> [round(float(v), 4) for v in objective_terms(jnp.diag(jnp.array([3., 1.])), ridge=0.)]
    [0.6931, 1.0986]
  """
  K = (K + K.T) / 2
  ev = jnp.linalg.eigvalsh(K)
  mean = jnp.mean(ev)
  r = ridge * mean
  return jnp.log(mean), jnp.log(ev[-1] + r) - jnp.log(ev[0] + r)


class _Key:
  """Hashable cache key for a ``trainable`` option (pytree of bools, callable, None)."""

  def __init__(self, value: Any):
    leaves, treedef = jax.tree.flatten(value)
    try:
      self.key: Hashable = (treedef, tuple(leaves))
      hash(self.key)
    except TypeError:
      self.key = ("id", id(value))
    self.value = value

  def __hash__(self) -> int:
    return hash(self.key)

  def __eq__(self, other: Any) -> bool:
    return isinstance(other, _Key) and self.key == other.key


@functools.lru_cache(maxsize=64)
def _fitter(f: Callable, index: tuple[int, ...], n_groups: int, steps: int, lr: float,
            trainable: _Key, target_mode: str) -> Callable:
  """One jitted fit per model, grouping and optimizer settings, reused across calls."""
  import optax  # pylint: disable=g-import-not-at-top

  kernel_fn = ntk_fn(f, trace_axes=(-1,), trainable=trainable.value)
  opt = optax.adam(lr)

  def loss_fn(s, params, x, log_target, cond_weight, ridge, scale_reg=0.0):
    log_mean, log_kappa = objective_terms(kernel_fn(_apply_log_scales(params, s, index), x),
                                          ridge=ridge)
    fit_scale = 0.0 if target_mode == "none" else (log_mean - log_target) ** 2
    total = fit_scale + cond_weight * log_kappa + scale_reg * jnp.mean(s ** 2)
    return total, (log_mean, log_kappa)

  @jax.jit
  def fit(params, x, log_target, cond_weight, ridge, scale_reg):
    dtype = jnp.result_type(*[a for a, i in zip(jax.tree.leaves(params), index) if i >= 0])
    s0 = jnp.zeros((n_groups,), dtype)
    if target_mode == "init":  # keep the initial mean eigenvalue
      log_target = jax.lax.stop_gradient(loss_fn(s0, params, x, 0.0, 0.0, ridge)[1][0])

    def step(carry, _):
      s, state = carry
      (loss, aux), g = jax.value_and_grad(loss_fn, has_aux=True)(
          s, params, x, log_target, cond_weight, ridge, scale_reg)
      with jax.numpy_dtype_promotion("standard"):  # optax's bias correction mixes dtypes
        updates, state = opt.update(g, state, s)
      return (optax.apply_updates(s, updates), state), (loss, *aux)

    (s, _), history = jax.lax.scan(step, (s0, opt.init(s0)), None, length=steps)
    final = loss_fn(s, params, x, log_target, cond_weight, ridge, scale_reg)
    return s, history, final

  return fit


def calibrate(f: Callable[[Any, Any], jax.Array], params: Any, x: Any, *,
              target_trace: float | str | None = 1.0, steps: int = 200, lr: float = 0.05,
              cond_weight: float = 1.0, ridge: float = 1e-3, scale_reg: float = 1.0,
              trainable: Any = None,
              group_fn: GroupFn = module_path, return_scales: bool = False,
              return_history: bool = False) -> Any:
  """Fits per-layer scale factors so the NTK has a target scale and a low ``κ``.

  Every floating-point leaf of layer ``ℓ`` (weights **and** biases; biases
  initialized at zero stay zero) is multiplied by ``exp(s_ℓ)``. The log-scales
  ``s ∈ R^L`` start at 0 and minimize, with ``steps`` steps of Adam (one jitted
  ``lax.scan``; exact gradients through the differentiable kernel)::

    (log(tr K / N) - log(target_trace))² + cond_weight · log κ_ridge(K)
        + scale_reg · mean_ℓ(s_ℓ²)

  where ``K = ntk_fn(f, trace_axes=(-1,))(params(s), x)`` is ``[N, N]`` (averaged
  over outputs, so ``tr K / N`` is the mean eigenvalue per output) and
  ``κ_ridge`` is defined in :func:`objective_terms`. The last term, a log-normal
  prior around the given init, fixes the directions the kernel does not see
  (e.g. moving scale between ReLU layers without biases). The compiled fit is
  cached per ``(f, grouping, steps, lr, trainable, kind of target)``: call again
  with other seeds' params of the same structure without recompiling (``f`` must
  be the same object).

  Caveat (see ``benchmarks/init_compare.py``): a low ``κ`` on the probe batch is
  cheapest to reach by decorrelating the inputs (a near-diagonal kernel, the
  chaotic regime of deep tanh nets), which fits the training set fast and
  generalizes badly; and a small ``target_trace`` can only be reached by
  shrinking layers towards their linear regime. Keep ``scale_reg`` on, and
  check test accuracy.

  Args:
    f: ``f(params, x) -> [N, O]`` (e.g. a Haiku ``apply`` or a linen closure).
    params: freshly initialized params.
    x: probe batch ``[N, ...]`` (e.g. 64–256 training inputs; labels unused).
    target_trace: target of ``tr K / N`` (default 1 per output); ``"init"``
      keeps the value of the given params; ``None`` drops the scale term.
    steps: Adam steps.
    lr: Adam learning rate on the log-scales.
    cond_weight: weight of ``log κ_ridge``; 0 fits the scale only.
    ridge: relative ridge of ``κ_ridge`` (see :func:`objective_terms`).
    scale_reg: weight of the prior ``mean_ℓ(s_ℓ²)``; 0 turns it off.
    trainable: forwarded to :func:`ntklayers.ntk_fn` (which leaves the kernel
      counts); the scales still apply to every leaf of a group.
    group_fn: ``group_fn(key_path) -> str | None`` assigning leaves to layers;
      default :func:`module_path`. ``None`` leaves (and integer leaves) are
      never scaled.
    return_scales: also return ``{group: exp(s_ℓ)}`` (Python floats).
    return_history: also return ``{"loss", "log_mean", "log_kappa"}``, each
      ``[steps]`` (values before each step) plus ``"final"`` (after the last).

  Returns:
    Params of the same structure and dtypes; ``(params, scales)`` or
    ``(params, scales, history)`` when asked (``scales`` is ``None`` if only
    the history is asked for).

  Example:
    >>> import haiku as hk, jax, jax.numpy as jnp, ntklayers, ntklayers.init as ni
    >>> def mlp(x):
    ...   for _ in range(3):
    ...     x = jnp.tanh(ntklayers.Linear(16)(x))
    ...   return ntklayers.Linear(2)(x)
    >>> net = hk.without_apply_rng(hk.transform(mlp))
    >>> x = jax.random.normal(jax.random.key(1), (16, 4))
    >>> params = net.init(jax.random.key(0), x)
    >>> new, scales = ni.calibrate(net.apply, params, x, steps=50, return_scales=True)
    >>> sorted(scales) == sorted(params)
    True
  """
  if isinstance(target_trace, str) and target_trace != "init":
    raise ValueError(f"`target_trace` must be a positive float, 'init' or None; got "
                     f"{target_trace!r}.")
  bad_target = isinstance(target_trace, (float, int)) and not target_trace > 0
  if steps < 1 or bad_target or not ridge > 0 or cond_weight < 0 or scale_reg < 0:
    raise ValueError(f"`calibrate` needs steps >= 1, target_trace > 0, ridge > 0, "
                     f"cond_weight >= 0 and scale_reg >= 0; got {steps}, {target_trace}, "
                     f"{ridge}, {cond_weight}, {scale_reg}.")
  names, index = _groups(params, group_fn)
  mode = ("none" if target_trace is None else
          "init" if isinstance(target_trace, str) else "value")
  fit = _fitter(f, index, len(names), int(steps), float(lr), _Key(trainable), mode)
  s, (loss, log_mean, log_kappa), final = fit(
      params, x, math.log(cast(float, target_trace)) if mode == "value" else 0.0,
      cond_weight, ridge, scale_reg)
  out = _apply_log_scales(params, s, index)
  if not (return_scales or return_history):
    return out
  scales = ({n: float(jnp.exp(v)) for n, v in zip(names, s)} if return_scales else None)
  if not return_history:
    return out, scales
  history = {"loss": loss, "log_mean": log_mean, "log_kappa": log_kappa,
             "final": {"loss": final[0], "log_mean": final[1][0],
                       "log_kappa": final[1][1]}}
  return out, scales, history
