"""LSUV initialization (Mishkin & Matas 2016) for Haiku models, as a baseline.

Layer-sequential unit-variance: orthonormal weight matrices, then, layer by layer
in forward order, divide the weights by the standard deviation of the layer's
output on a probe batch until its variance is within ``tol`` of 1.

Scope: Haiku models (``f`` is the ``apply`` of an ``hk.transform``-ed function,
or a closure calling one; a jitted ``f`` is unwrapped). A *layer* is a module
whose params hold a ``w`` leaf (``hk.Linear``, ``ntklayers.Linear``,
``hk.ConvND``, ...); its output is the return value of its ``__call__`` (the
pre-activation). Biases are left as they are.

How outputs are seen: an ``hk.intercept_methods`` interceptor marks every
layer's output with a structure tag (``tap``), which survives
``hk.layer_stack``, ``hk.scan``, ``hk.remat``, ``hk.vmap`` and ``jit``;
the core's discovery finds the tags and the ``w`` leaf (or leaf slice) each
reads, and its replay re-evaluates the traced model returning each tagged output
stacked over its enclosing loops. So:

* a stacked layer (``hk.layer_stack``: slice ``l`` of ``w`` used at step ``l``) is
  rescaled slice by slice, in forward order, each slice on its own step's output
  (reported as ``"name[l]"``);
* a layer shared by the steps of a loop (``hk.scan`` over one module) is judged
  on its outputs at all steps pooled (one variance over every step's output);
* a module called several times outside loops (weight sharing) is judged on its
  last call.

A layer whose output cannot be seen (inside a ``while`` or ``cond`` of the
model, an output that is not one floating array, parameters batched by
``vmap``) is never reported as rescaled: ``lsuv`` refuses it, or, with
``skip_unsupported=True``, leaves it as it is, warns, and leaves it out of the
variances.
"""

from __future__ import annotations

import dataclasses
import itertools
import warnings
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from ntklayers import _core
from ntklayers._core import DenseConfig
from ntklayers.init._calibrate import module_path

# Tags of this module: a registered kind (so discovery follows the ``w`` leaf), a
# config no layer reports, and a name prefix that tells them apart.
_KIND, _CONFIG, _PREFIX = "dense", DenseConfig(in_axes=0, out_axes=0), "\x1flsuv:"


@dataclasses.dataclass(frozen=True)
class _Unit:
  """One ``w`` (or one stacked slice of it) and the output it is judged on."""

  name: str  # reported name: module path, ``[l]`` for a slice
  leaf: int  # index of ``w`` in the flattened params
  slice: tuple[int, ...]  # index of the slice in the leaf (``()``: all of it)
  path: tuple[int, ...]  # the tag's path in the traced program
  index: tuple[Any, ...]  # index of the output in the replayed ``[*loops, ...]``
  order: tuple[int, ...]  # forward (execution) order


@dataclasses.dataclass(frozen=True)
class _Model:
  traced: Any
  units: tuple[_Unit, ...]
  skipped: dict[str, str]  # layer -> why its output cannot be seen


def _interceptor(next_fun, args, kwargs, ctx):
  """Tags the output of every ``__call__`` of a module with a ``w`` parameter."""
  out = next_fun(*args, **kwargs)
  if ctx.method_name != "__call__":
    return out
  name = ctx.module.module_name
  w = ctx.module.params_dict().get(f"{name}/w")
  if w is None:
    return out
  tag = dict(kind=_KIND, config=_CONFIG, name=_PREFIX + name, params={"w": w})
  if isinstance(out, jax.Array) and out.ndim and _core.is_inexact(out.dtype):
    return _core.tap(primal=out, out=out, **tag)
  _core.tap(primal=w, out=w, unsupported="its output is not one floating array", **tag)
  return out


def _trace(f: Callable, params: Any, x: Any) -> _Model:
  """Traces ``f`` with the layers' outputs tagged and lists what can be rescaled."""
  import haiku as hk  # pylint: disable=g-import-not-at-top
  n = _core.check_batch(x, "x")

  def run(p, x):
    f(p, x)  # the outputs are read at the tags, not from f's return value
    return jnp.zeros((n,), jnp.float32)

  traced = _core.discover(run, params, x, (lambda: hk.intercept_methods(_interceptor),),
                          recognize_layers=False)
  paths = [module_path(k) or jax.tree_util.keystr(k)
           for k, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
  last: dict[tuple[int, tuple[int, ...]], _Unit] = {}
  skipped: dict[str, str] = {}
  for r in traced.records:
    if not r.name.startswith(_PREFIX) or r.config != _CONFIG:
      continue  # an annotated layer's own tag
    if r.skip is not None:
      skipped[r.name[len(_PREFIX):]] = r.skip
      continue
    leaf = r.leaves[0][1]
    for steps in itertools.product(*(range(r.loops[a]) for a in r.stack)):
      at = dict(zip(r.stack, steps))
      index = tuple(at.get(a, slice(None)) for a in range(len(r.loops)))
      name = paths[leaf] + (f"[{','.join(map(str, steps))}]" if steps else "")
      order = _core.execution_order(traced.jaxpr.jaxpr, r.path,
                                    [at.get(a, 0) for a in range(len(r.loops))])
      unit = _Unit(name, leaf, steps, r.path, index, order)
      last.pop((leaf, steps), None)  # judged on the last call
      last[(leaf, steps)] = unit
  units = tuple(sorted(last.values(), key=lambda u: u.order))
  return _Model(traced, units, skipped)


def _variances_fn(model: _Model) -> Callable[[list, Any], jax.Array]:
  """``(leaves, x) -> [num_units]`` output variances, one jitted forward pass."""
  records = {r.path: r for r in model.traced.records}
  perts = {u.path: jnp.zeros(records[u.path].loops + records[u.path].out[0],
                             records[u.path].out[1]) for u in model.units}
  out_dtype = jnp.result_type(float)

  @jax.jit
  def variances(leaves: list, x: Any) -> jax.Array:
    _, primals = _core.replay(model.traced, leaves, x, perts)
    return jnp.stack([jnp.var(primals[u.path][u.index]).astype(out_dtype)
                      for u in model.units])

  return variances


def _check_seen(model: _Model, skip_unsupported: bool, caller: str) -> None:
  """Refuses (or, with ``skip_unsupported``, warns about) layers it cannot see."""
  if not model.skipped:
    return
  why = "; ".join(f"`{k}`: {v}" for k, v in model.skipped.items())
  if not skip_unsupported:
    raise ValueError(
        f"`{caller}` cannot see the output of {len(model.skipped)} layer(s) ({why}). "
        f"Pass skip_unsupported=True to leave them out"
        + (" (they are then not rescaled and not reported)." if caller == "lsuv" else "."))
  done = "not rescaled, not reported" if caller == "lsuv" else "not reported"
  warnings.warn(f"ntklayers: {caller} cannot see the output of {sorted(model.skipped)} "
                f"({done}): {why}.", UserWarning, stacklevel=3)


def layer_variances(f: Callable[[Any, Any], Any], params: Any, x: Any, *,
                    skip_unsupported: bool = False) -> dict[str, jax.Array]:
  """Variance of each layer's output over the probe batch (all entries), in forward order.

  Args:
    f: Haiku ``apply(params, x)`` (see the module docstring for the scope).
    params: Haiku params ``{module name: {"w": ..., ...}}``.
    x: probe batch ``[N, ...]``.
    skip_unsupported: leave out (with a warning) layers whose output cannot be
      seen, instead of raising ``ValueError``.

  Returns:
    ``{layer: scalar variance}`` for every module with a ``w`` that ran; a stacked
    layer (``hk.layer_stack``) has one entry per slice, ``"name[l]"``.

  Example:
    >>> import haiku as hk, jax, jax.numpy as jnp, ntklayers.init as ni
    >>> net = hk.without_apply_rng(hk.transform(lambda x: hk.Linear(3)(x)))
    >>> x = jnp.ones((4, 2))
    >>> list(ni.layer_variances(net.apply, net.init(jax.random.key(0), x), x))
    ['linear']
  """
  f = _core.check_f(f)
  model = _trace(f, params, x)
  _check_seen(model, skip_unsupported, "layer_variances")
  if not model.units:
    return {}
  values = _variances_fn(model)(jax.tree.leaves(params), x)
  return {u.name: values[i] for i, u in enumerate(model.units)}


def lsuv(f: Callable[[Any, Any], Any], params: Any, x: Any, *, key: jax.Array,
         tol: float = 0.1, max_iters: int = 10, orthonormal: bool = True,
         return_variances: bool = False, skip_unsupported: bool = False) -> Any:
  """LSUV: orthonormal init, then per-layer rescaling to unit output variance.

  For each layer ``ℓ`` (each slice of a stacked layer) in forward order: repeat at
  most ``max_iters`` times — compute the output ``B_ℓ`` on ``x``; stop if
  ``|Var(B_ℓ) − 1| < tol``; else ``w_ℓ ← w_ℓ / sqrt(Var(B_ℓ))`` (Mishkin & Matas
  2016, Algorithm 1, with their ``tol = 0.1``). Each forward pass is one jitted
  call, compiled once. A layer whose output variance is 0, inf or NaN (dead or
  diverged) is left after its first measurement and reported with that variance.

  Args:
    f: Haiku ``apply(params, x)``; layers as in the module docstring.
    params: freshly initialized Haiku params.
    x: probe batch ``[N, ...]`` (the paper uses one mini-batch).
    key: PRNG key of the orthonormal matrices (the ``i``-th layer or slice in
      forward order uses ``fold_in(key, i)``).
    tol: tolerance on the variance.
    max_iters: maximum rescalings per layer.
    orthonormal: replace each ``w`` ``[..., d_out]`` (each slice of a stacked
      one) by an orthonormal matrix (``jax.nn.initializers.orthogonal`` over the
      flattened fan-in) first; with ``False`` only the rescaling runs (the "LSUV
      without orthonormal" variant).
    return_variances: also return ``{layer: output variance}`` measured after
      each layer's last rescaling (floats), for the layers rescaled (``"name[l]"``
      for slice ``l`` of a stacked layer).
    skip_unsupported: leave layers whose output cannot be seen (module
      docstring) as they are, with a warning, instead of raising ``ValueError``.

  Returns:
    Params of the same structure and dtypes (``(params, variances)`` when asked).

  Raises:
    ValueError: no module with a ``w`` leaf runs in ``f``, or one runs whose output
      cannot be seen (unless ``skip_unsupported``).

  References:
    Mishkin, Matas, "All you need is a good init", ICLR 2016.

  Example:
    >>> import haiku as hk, jax, jax.numpy as jnp, ntklayers.init as ni
    >>> net = hk.without_apply_rng(hk.transform(
    ...     lambda x: hk.Linear(4)(jnp.tanh(hk.Linear(32)(x)))))
    >>> x = jax.random.normal(jax.random.key(1), (64, 8))
    >>> params = net.init(jax.random.key(0), x)
    >>> new, var = ni.lsuv(net.apply, params, x, key=jax.random.key(2),
    ...                    return_variances=True)
    >>> all(abs(v - 1) < 0.1 for v in var.values())
    True
  """
  if not tol > 0 or isinstance(max_iters, bool) or not isinstance(max_iters, int) or (
      max_iters < 1):
    raise ValueError(f"`lsuv` needs tol > 0 and max_iters >= 1; got {tol}, {max_iters}.")
  f = _core.check_f(f)
  model = _trace(f, params, x)
  if not model.units and not model.skipped:
    raise ValueError("`lsuv`: no module with a `w` parameter ran in `f` (is `f` a "
                     "Haiku apply function?).")
  _check_seen(model, skip_unsupported, "lsuv")
  leaves, treedef = jax.tree.flatten(params)
  if not model.units:  # every layer skipped (with skip_unsupported)
    return (params, {}) if return_variances else params
  variances = _variances_fn(model)

  def get(u: _Unit) -> jax.Array:
    return leaves[u.leaf][u.slice] if u.slice else leaves[u.leaf]

  def put(u: _Unit, w: jax.Array) -> None:
    leaves[u.leaf] = leaves[u.leaf].at[u.slice].set(w) if u.slice else w

  if orthonormal:
    ortho = jax.nn.initializers.orthogonal()
    for i, u in enumerate(model.units):
      w = get(u)
      put(u, ortho(jax.random.fold_in(key, i), w.shape, w.dtype))
  final: dict[str, float] = {}
  for _ in range(max_iters):  # one sweep, unless later layers feed earlier ones
    disturbed = False
    for i, u in enumerate(model.units):
      for _ in range(max_iters):
        var = float(variances(leaves, x)[i])
        if abs(var - 1.0) < tol or not var > 0 or var == float("inf"):
          break  # converged, or a dead/diverged layer that rescaling cannot fix
        w = get(u)
        put(u, w / jnp.sqrt(jnp.asarray(var, dtype=w.dtype)))
      final[u.name] = var
    now = [float(v) for v in variances(leaves, x)]
    for u, var in zip(model.units, now):
      # A loop (hk.scan) may feed a later layer back into an earlier one.
      disturbed |= abs(final[u.name] - 1.0) < tol <= abs(var - 1.0)
      final[u.name] = var
    if not disturbed:
      break
  params = jax.tree.unflatten(treedef, leaves)
  return (params, final) if return_variances else params
