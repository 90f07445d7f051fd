"""Capture sessions: find annotated layer calls and cache their factors.

Framework adapters (``ntklayers.haiku``, ``ntklayers.flax``) install interceptors
that call :func:`tap` for every annotated layer call while a session is active.
Outside a session :func:`tap` is never reached (the interceptors are not
installed), so annotated layers cost nothing extra.

A capture runs ``f`` twice:

1. *discovery* under ``jax.eval_shape``: records every annotated call, the
   parameter leaves it reads (matched by identity against the traced ``params``),
   its shapes, and whether it can be captured here (no inner transform, a rule
   exists, its rows are the model's examples);
2. *capture* under ``jax.vjp`` with a zero perturbation added to each captured
   layer output; the layer inputs come back as auxiliary outputs and one
   ``vmap``-ed VJP over a one-hot basis of the outputs yields every cotangent.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
from collections.abc import Callable, Iterator, Mapping
from typing import Any, ContextManager

import jax
import jax.numpy as jnp

from ntklayers import _jax_compat
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
  records: tuple[CallRecord, ...]
  coupled: tuple[str, ...]  # modules that make samples interact
  out_shape: tuple[int, ...]
  out_dtype: Any


class _Session:
  """State of one run of ``f`` under capture."""

  def __init__(self, mode: str, *, batch: int, leaf_ids: Mapping[int, int] | None = None,
               plan: tuple[CallRecord, ...] = (), perts: tuple = ()):
    self.mode = mode
    self.batch = batch
    self.leaf_ids = leaf_ids or {}
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

  def tap(self, kind, config, name, params, primal, out, unsupported=None):
    if self.mode == "discover":
      skip, leaves = self._skip_reason(kind, config, params, primal, out, unsupported)
      self.records.append(CallRecord(
          name=name, kind=kind, config=config, leaves=leaves,
          primal=(tuple(primal.shape), primal.dtype),
          out=(tuple(out.shape), out.dtype), skip=skip))
      return out
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


def tap(*, kind: str, config: Any, name: str, params: Mapping[str, jax.Array],
        primal: jax.Array, out: jax.Array, unsupported: str | None = None) -> jax.Array:
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

  Returns:
    ``out``, plus a zero perturbation while capturing.
  """
  session = _SESSION.get()
  if session is None:
    return out
  return session.tap(kind, config, name, params, primal, out, unsupported)


def declare_coupled(name: str) -> None:
  """Reports a module that makes samples interact (e.g. BatchNorm in training)."""
  session = _SESSION.get()
  if session is not None and session.mode == "discover":
    session.coupled.append(name)


def batch_size(x: Any) -> int:
  return jax.tree.leaves(x)[0].shape[0]


def discover(f: Callable, params: Any, x: Any) -> Discovery:
  """Runs ``f`` abstractly and records every annotated layer call."""
  n = batch_size(x)
  sessions = []

  def run(params, x):
    ids = {id(leaf): i for i, leaf in enumerate(jax.tree.leaves(params))}
    session = _Session("discover", batch=n, leaf_ids=ids)
    sessions.append(session)
    with session.activate():
      return f(params, x)

  out = jax.eval_shape(run, params, x)
  session = sessions[-1]
  if not isinstance(out, jax.ShapeDtypeStruct):
    raise TypeError(
        f"`f` must return a single array; got outputs with structure "
        f"{jax.tree.structure(out)}.")
  if out.ndim == 0 or out.shape[0] != n:
    raise ValueError(
        f"The output of `f` must lead with the batch axis of size {n}; got shape "
        f"{out.shape}.")
  if not _jax_compat.is_inexact(out.dtype):
    raise TypeError(f"The output of `f` must be floating, got dtype {out.dtype}.")
  return Discovery(tuple(session.records), tuple(session.coupled),
                   tuple(out.shape), out.dtype)


def capture_cotangents(f: Callable, params: Any, x: Any, plan: tuple[CallRecord, ...],
                       out_shape: tuple[int, ...], out_dtype: Any, coupled: bool):
  """Returns per-captured-call ``(primal, cotangent)`` pairs.

  Cotangents are ``[B, *y_shape]`` with ``B = O`` (one-hot output columns over
  all examples at once) or, when samples interact, ``B = N * O``.
  """
  active = [r for r in plan if r.skip is None]
  perts = tuple(jnp.zeros(r.out[0], r.out[1]) for r in active)
  n = out_shape[0]

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
  o = 1
  for d in out_shape[1:]:
    o *= d
  if coupled:
    basis = jnp.eye(n * o, dtype=out_dtype).reshape((n * o, *out_shape))
  else:
    eye = jnp.eye(o, dtype=out_dtype).reshape((o, 1, *out_shape[1:]))
    basis = jnp.broadcast_to(eye, (o, *out_shape))
  (cots,) = jax.vmap(vjp_fn)(basis)
  return list(zip(active, primals, cots))
