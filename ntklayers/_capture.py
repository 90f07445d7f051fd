"""Capture sessions: find annotated layer calls and cache their factors.

Framework adapters (``ntklayers.haiku``, ``ntklayers.flax``) install interceptors
that call :func:`tap` for every annotated layer call while a session is active.
Outside a session :func:`tap` is never reached (the interceptors are not
installed), so annotated layers cost nothing extra.

A capture runs ``f`` twice:

1. *discovery* under ``jax.make_jaxpr``: records every annotated call, the
   parameter leaves it reads (matched by identity against the traced ``params``),
   its shapes, and whether it can be captured here (no inner transform, a rule
   exists, its rows lead with the batch axis). Each capturable call returns a
   stand-in that depends on the layer's inputs but not on its parameters, so the
   data flow of the traced program tells which parameter leaves the output
   depends on *outside* the captured calls (a tied decoder reading the encoder's
   weights, a bias reused elsewhere): those leaves go to the exact fallback.
2. *capture* under ``jax.vjp`` with a zero perturbation added to each captured
   layer output; the layer inputs come back as auxiliary outputs and one
   ``vmap``-ed VJP over a basis of output cotangents yields every cotangent.

Row ``m`` of a layer is assumed to belong to example ``m`` only when it is
verified: in ``"checked"`` mode one more, random cotangent ``r`` rides along in
the same ``vmap`` and its layer cotangents must equal ``sum_o r[m, o] g[o, m]``
(see :func:`capture_cotangents`).
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import math
from collections.abc import Callable, Iterator, Mapping
from typing import Any, ContextManager

import jax
import jax.numpy as jnp
import numpy as np

from ntklayers import _checks, _jax_compat
from ntklayers._rules import get_rule

InterceptorFactory = Callable[[], ContextManager[Any]]

# Skip reason of annotated layers without parameters (nothing to fall back).
NO_PARAMS = "it owns no parameters"

_INTERCEPTORS: list[InterceptorFactory] = []
_SESSION: contextvars.ContextVar["_Session | None"] = contextvars.ContextVar(
    "ntklayers_session", default=None)


def register_interceptor(factory: InterceptorFactory) -> None:
  """Registers a context-manager factory entered around ``f`` during capture."""
  if factory not in _INTERCEPTORS:
    _INTERCEPTORS.append(factory)


def capturing() -> bool:
  """Whether a capture session is active (for adapters)."""
  return _SESSION.get() is not None


@dataclasses.dataclass(frozen=True)
class CallRecord:
  """Static description of one annotated layer call, found by discovery.

  Attributes:
    name: module path of the layer (used for layerwise kernels and warnings).
    kind: registered rule kind.
    config: the rule's static config record.
    leaves: ``((role, leaf_index), ...)`` of the ``params`` leaves it reads.
    primal: ``(shape, dtype)`` of the cached primal.
    out: ``(shape, dtype)`` of the layer output.
    skip: why the call cannot be captured (``None`` if it can).
  """

  name: str
  kind: str
  config: Any
  leaves: tuple[tuple[str, int], ...]
  primal: tuple[tuple[int, ...], Any]
  out: tuple[tuple[int, ...], Any]
  skip: str | None = None


@dataclasses.dataclass(frozen=True)
class Discovery:
  """What one discovery run found.

  Attributes:
    records: every annotated call, in call order.
    coupled: modules that declared that samples interact (BatchNorm in training).
    out_shape: output shape of ``f``.
    out_dtype: output dtype of ``f``.
    replaced: indices of the calls whose outputs were replaced by stand-ins.
    outside: indices of the ``params`` leaves the output depends on other than
      through the direct parameter use of a replaced call.
  """

  records: tuple[CallRecord, ...]
  coupled: tuple[str, ...]
  out_shape: tuple[int, ...]
  out_dtype: Any
  replaced: frozenset[int] = frozenset()
  outside: frozenset[int] = frozenset()


class _Session:
  """State of one run of ``f`` under capture."""

  def __init__(self, mode: str, *, batch: int, leaf_ids: Mapping[int, int] | None = None,
               plan: tuple[CallRecord, ...] = (), perts: tuple = (),
               replace: frozenset[int] | None = None):
    self.mode = mode
    self.batch = batch
    self.leaf_ids = leaf_ids or {}
    self.replace = replace
    self.replaced: list[int] = []
    self.plan = plan
    self.perts = iter(perts)
    self.records: list[CallRecord] = []
    self.coupled: list[str] = []
    self.primals: list[jnp.ndarray] = []
    self.counter = 0
    self.trace = None

  @contextlib.contextmanager
  def activate(self) -> Iterator["_Session"]:
    token = _SESSION.set(self)
    self.trace = _jax_compat.trace_state()
    try:
      with contextlib.ExitStack() as stack:
        for factory in _INTERCEPTORS:
          stack.enter_context(factory())
        yield self
    finally:
      _SESSION.reset(token)

  def _skip_reason(self, kind, config, params, primal, out,
                   unsupported) -> tuple[str | None, tuple]:
    if _jax_compat.trace_state() != self.trace:
      return ("it runs inside an inner JAX transform of the model (scan, vmap, "
              "remat/checkpoint, jit, e.g. hk.scan, hk.layer_stack, nn.scan, "
              "nnx.remat)"), ()
    if unsupported:
      return unsupported, ()
    rule = get_rule(kind)
    if rule is None:
      return f"no structure rule is registered for kind {kind!r}", ()
    reason = rule.unsupported(config, tuple(primal.shape))
    if reason:
      return reason, ()
    if primal.ndim == 0 or out.ndim == 0 or primal.shape[0] != self.batch or \
        out.shape[0] != self.batch:
      return (f"its input {tuple(primal.shape)} / output {tuple(out.shape)} do not "
              f"lead with the batch axis of size {self.batch}"), ()
    leaves = []
    for role in rule.roles:
      if role not in params:
        continue
      idx = self.leaf_ids.get(id(params[role]))
      if idx is None:
        return (f"its parameter {role!r} is not a leaf of `params` (transformed "
                f"before use, e.g. by a custom getter or mixed precision)"), ()
      leaves.append((role, idx))
    if not leaves:
      return NO_PARAMS, ()
    return None, tuple(leaves)

  def tap(self, kind, config, name, params, primal, out, unsupported=None, inputs=()):
    if self.mode == "discover":
      skip, leaves = self._skip_reason(kind, config, params, primal, out, unsupported)
      index = len(self.records)
      self.records.append(CallRecord(
          name=name, kind=kind, config=config, leaves=leaves,
          primal=(tuple(primal.shape), primal.dtype),
          out=(tuple(out.shape), out.dtype), skip=skip))
      captured = skip is None if self.replace is None else index in self.replace
      if not captured:
        return out
      self.replaced.append(index)
      return _stand_in(out, (primal, inputs))
    if self.counter >= len(self.plan):
      raise RuntimeError(
          f"ntklayers: the model made more annotated layer calls during capture "
          f"than during discovery ({len(self.plan)}); `f` must be deterministic "
          f"in its Python control flow.")
    rec = self.plan[self.counter]
    self.counter += 1
    if rec.name != name or rec.kind != kind:
      raise RuntimeError(
          f"ntklayers: annotated call {self.counter} was {rec.name!r} during "
          f"discovery but {name!r} during capture.")
    if rec.skip is not None:
      return out
    self.primals.append(primal)
    return out + next(self.perts)


def _stand_in(out: jax.Array, inputs: Any) -> jax.Array:
  """Zeros like ``out`` that depend (in the traced data flow) on ``inputs`` only.

  Used in discovery in place of a captured layer's output: the parameters the
  layer reads directly are cut off, every other path into its output (through
  its inputs) is kept.
  """
  dep = jnp.zeros((), out.dtype)
  for a in jax.tree.leaves(inputs):
    if isinstance(a, jax.Array) and (jnp.issubdtype(a.dtype, jnp.number)
                                     or a.dtype == jnp.bool_):
      dep = dep + jnp.sum(a).astype(out.dtype) * jnp.zeros((), out.dtype)
  return jnp.zeros(out.shape, out.dtype) + dep


def tap(*, kind: str, config: Any, name: str, params: Mapping[str, jax.Array],
        primal: jax.Array, out: jax.Array, unsupported: str | None = None,
        inputs: Any = ()) -> jax.Array:
  """Reports one annotated layer call to the active capture session.

  Args:
    kind: registered rule kind (``"dense"``, ``"conv"``, ``"scale"``, ...).
    config: the rule's static config record (hashable).
    name: module path, e.g. ``"mlp/~/linear_1"``.
    params: the parameter arrays the layer used, by role (``{"w": w, "b": b}``).
    primal: the factor the rule needs from the input side (``[M, ...]``).
    out: the layer output ``[M, ...]``.
    unsupported: a reason why this configuration has no rule; the layer's
      parameters then go to the exact fallback (with a one-time warning).
    inputs: every array the call received (a pytree); with ``primal`` this must
      cover everything ``out`` depends on besides ``params``.

  Returns:
    ``out``, plus a zero perturbation while capturing.
  """
  session = _SESSION.get()
  if session is None:
    return out
  return session.tap(kind, config, name, params, primal, out, unsupported, inputs)


def declare_coupled(name: str) -> None:
  """Reports a module that makes samples interact (e.g. BatchNorm in training)."""
  session = _SESSION.get()
  if session is not None and session.mode == "discover":
    session.coupled.append(name)


def batch_size(x: Any) -> int:
  return jax.tree.leaves(x)[0].shape[0]


def discover(f: Callable, params: Any, x: Any,
             replace: frozenset[int] | None = None) -> Discovery:
  """Traces ``f`` once and records every annotated layer call.

  Args:
    f: the model, ``f(params, x) -> [N, ...]``.
    params: parameters (arrays or abstract values).
    x: the batch.
    replace: indices of the calls to replace by stand-ins; ``None`` replaces every
      call that can be captured.
  """
  n = batch_size(x)
  sessions = []

  def run(params, x):
    ids = {id(leaf): i for i, leaf in enumerate(jax.tree.leaves(params))}
    session = _Session("discover", batch=n, leaf_ids=ids, replace=replace)
    sessions.append(session)
    with session.activate():
      return f(params, x)

  try:
    out, mask = _jax_compat.output_dependencies(run, params, x)
  except Exception as e:  # pylint: disable=broad-except
    _checks.note_failure(e, params, x)
    raise
  session = sessions[-1]
  if not isinstance(out, jax.ShapeDtypeStruct):
    raise TypeError(
        f"`f` must return a single array; got outputs with structure "
        f"{jax.tree.structure(out)}.")
  if out.ndim == 0 or out.shape[0] != n:
    x_shapes = jax.tree.map(lambda a: tuple(a.shape), x)
    hint = (" Every leaf of `x` needs a leading batch axis (e.g. `x[None]` for one "
            "example)" if any(a.ndim < 2 for a in jax.tree.leaves(x)) else "")
    raise ValueError(
        f"The output of `f` must lead with the batch axis of `x` (size {n}); got "
        f"output shape {out.shape} for x shapes {x_shapes}.{hint}")
  if not _jax_compat.is_inexact(out.dtype):
    raise TypeError(f"The output of `f` must be floating, got dtype {out.dtype}.")
  n_params = len(jax.tree.leaves(params))
  outside = frozenset(i for i in range(n_params) if mask >> i & 1)
  return Discovery(tuple(session.records), tuple(session.coupled),
                   tuple(out.shape), out.dtype, frozenset(session.replaced), outside)


# Modes of a capture: rows are examples (asserted by the user), rows are examples
# if a random check in the same VJP confirms it, or the batch is one sample.
INDEPENDENT, CHECKED, COUPLED = "independent", "checked", "coupled"
_CHECK_SEED = 20240607


def check_tolerance(dtype: Any) -> float:
  """Relative tolerance of the alignment check: ``sqrt(eps)`` of ``dtype``."""
  return float(jnp.finfo(dtype).eps) ** 0.5


def check_cotangent(out_shape: tuple[int, ...], dtype: Any) -> jax.Array:
  """The fixed random output cotangent ``r`` ``[N, *rest]`` of the checks.

  Drawn with NumPy at trace time and embedded as a constant: XLA would spend
  seconds constant-folding ``jax.random`` on a constant key.
  """
  r = np.random.default_rng(_CHECK_SEED).standard_normal(out_shape)
  return jnp.asarray(r.astype(np.dtype(dtype)))


def agree(actual: jax.Array, predicted: jax.Array, tol: float) -> jax.Array:
  """``max|actual - predicted| <= tol * max(max|actual|, max|predicted|)``; NaN fails."""
  scale = jnp.maximum(jnp.max(jnp.abs(actual)), jnp.max(jnp.abs(predicted)))
  return jnp.max(jnp.abs(actual - predicted)) <= tol * scale


def rows_proven(f: Callable, params: Any, x: Any, plan: tuple[CallRecord, ...],
                n: int) -> bool:
  """Whether the capture's forward pass provably keeps rows apart: row ``n`` of the
  output is the same function of row ``n`` of ``x`` and of every captured layer's
  output perturbation (``_jax_compat.rows_are_examples``, a static analysis of the
  traced program; ``False`` when it cannot tell)."""
  active = [r for r in plan if r.skip is None]
  perts = tuple(jax.ShapeDtypeStruct((n, *r.out[0][1:]), r.out[1]) for r in active)

  def fwd(batched, params):
    perts, x = batched
    session = _Session("capture", batch=n, plan=plan, perts=perts)
    with session.activate():
      return f(params, x)

  return _jax_compat.rows_are_examples(fwd, (perts, x), params)


def capture_cotangents(f: Callable, params: Any, x: Any, plan: tuple[CallRecord, ...],
                       out_shape: tuple[int, ...], out_dtype: Any, mode: str,
                       check: bool = True):
  """Returns per-captured-call ``(record, primal, cotangent)`` and a check flag.

  Cotangents are ``[B, *y_shape]`` with ``B = O`` (one-hot output columns over
  all examples at once) or, in ``"coupled"`` mode, ``B = N * O``.

  In ``"checked"`` mode the ``vmap`` carries one more cotangent, the random
  ``r [N, O]``. If every row ``m`` of every captured layer affects example ``m``
  only, its layer cotangent equals ``sum_o r[m, o] g[o, m]``; if some row affects
  another example (rows that are not the examples, examples that interact after
  the layer), the two differ for all ``r`` outside a set of measure zero. The
  flag (a boolean array) says whether they agree to ``sqrt(eps)`` relative; it is
  ``True`` in the other modes, or when ``check`` is false (rows proven apart).
  """
  check = check and mode == CHECKED
  active = [r for r in plan if r.skip is None]
  n = out_shape[0]
  # Captured rows lead with the batch axis; records may come from another batch.
  perts = tuple(jnp.zeros((n, *r.out[0][1:]), r.out[1]) for r in active)

  def fwd(perts):
    session = _Session("capture", batch=n, plan=plan, perts=perts)
    with session.activate():
      out = f(params, x)
    if session.counter != len(plan):
      raise RuntimeError(
          f"ntklayers: the model made {session.counter} annotated layer calls "
          f"during capture but {len(plan)} during discovery.")
    return out, tuple(session.primals)

  _, vjp_fn, primals = jax.vjp(fwd, perts, has_aux=True)
  o = math.prod(out_shape[1:])
  if mode == COUPLED:
    basis = jnp.eye(n * o, dtype=out_dtype).reshape((n * o, *out_shape))
  else:
    eye = jnp.eye(o, dtype=out_dtype).reshape((o, 1, *out_shape[1:]))
    basis = jnp.broadcast_to(eye, (o, *out_shape))
  if check:
    r = check_cotangent(out_shape, out_dtype)
    basis = jnp.concatenate([basis, r[None]])
  (cots,) = jax.vmap(vjp_fn)(basis)
  ok = jnp.asarray(True)
  if check:
    tol = check_tolerance(out_dtype)
    r = r.reshape(n, o)
    for c in cots:
      cb, cr = c[:o], c[o]
      pred = jnp.einsum("no,onk->nk", r, cb.reshape((o, n, -1)),
                        precision="highest").reshape(cr.shape)
      ok = ok & agree(cr, pred, tol)
    cots = tuple(c[:o] for c in cots)
  return list(zip(active, primals, cots)), ok
