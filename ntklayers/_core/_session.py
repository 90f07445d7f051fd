"""Capture sessions and :func:`tap`, the one call an annotated layer makes.

While an NTK is requested, the model is traced once with every registered
interceptor active. Each annotated layer call then reports itself through
:func:`tap`, which binds the *structure tag*: a primitive that is the identity on
the layer's output and carries the layer's frozen metadata (:class:`TagMeta`)
and, as operands, the arrays its structure rule needs (the primal, the
parameters it read, every input it received). The tag is an equation of the
traced program, so it survives ``scan``, ``remat``, ``jit`` and the frameworks'
lifted transforms (``hk.layer_stack``, ``nn.scan``, ...); ``_discovery`` finds
the tags in the jaxpr and ``_replay`` re-evaluates it to capture factors.

Outside a session :func:`tap` returns the output untouched and the interceptors
are not installed, so annotated layers cost nothing extra.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
from collections.abc import Callable, Iterator, Mapping
from typing import Any, ContextManager

import jax

from ntklayers._core import _jax_compat
from ntklayers._core._rule import get_rule

InterceptorFactory = Callable[[], ContextManager[Any]]

VMAPPED = ("it runs under vmap with batched parameters, or its rule cannot take a new "
           "leading axis (Rule.on_vmap)")


@dataclasses.dataclass(frozen=True)
class TagMeta:
  """Static metadata of one annotated layer call, carried by its tag.

  Attributes:
    kind: registered rule kind (``"dense"``, ``"conv"``, ``"scale"``, ...).
    config: the rule's static config record (hashable).
    name: module path of the layer.
    roles: roles of the parameter operands, in operand order.
    unsupported: why the call has no rule (its parameters then use the fallback).
  """

  kind: str
  config: Any
  name: str
  roles: tuple[str, ...]
  unsupported: str | None = None


def _on_vmap(meta: TagMeta, dims: list) -> tuple[TagMeta, bool]:
  """A vmapped call stays structured when its rule takes a new leading row axis
  (:meth:`Rule.vmapped` gives the config of the batched call), its parameters are
  not batched and its output and primal are: the vmapped axis becomes the rows'
  leading axis."""
  rule = get_rule(meta.kind)
  params = dims[2:2 + len(meta.roles)]
  config = None
  if (meta.unsupported is None and rule is not None and dims[0] is not None
      and dims[1] is not None and all(d is None for d in params)):
    config = rule.vmapped(meta.config)
  if config is not None:
    return dataclasses.replace(meta, config=config), True
  return dataclasses.replace(meta, unsupported=meta.unsupported or VMAPPED), False


TAG = _jax_compat.make_tag_primitive(_on_vmap)


_INTERCEPTORS: dict[str, InterceptorFactory] = {}


def register_interceptor(name: str, factory: InterceptorFactory) -> None:
  """Registers an adapter's interceptor: a context-manager factory entered around
  the model while it is traced for an NTK.

  Called once by each adapter package (``ntklayers.haiku``,
  ``ntklayers.flax.linen``); registering a different factory under a name that is
  taken raises ``ValueError``.
  """
  old = _INTERCEPTORS.get(name)
  if old is not None and old is not factory:
    raise ValueError(f"An interceptor named {name!r} is already registered.")
  _INTERCEPTORS[name] = factory


def interceptors() -> tuple[InterceptorFactory, ...]:
  """The registered interceptors, in registration order."""
  return tuple(_INTERCEPTORS.values())


class Session:
  """One traced run of the model: coupling declarations made during the trace."""

  def __init__(self, interceptors: tuple[InterceptorFactory, ...]):
    self.interceptors = interceptors
    self.coupled: list[str] = []

  @contextlib.contextmanager
  def activate(self) -> Iterator["Session"]:
    token = _SESSION.set(self)
    try:
      with contextlib.ExitStack() as stack:
        for factory in self.interceptors:
          stack.enter_context(factory())
        yield self
    finally:
      _SESSION.reset(token)


_SESSION: contextvars.ContextVar[Session | None] = contextvars.ContextVar(
    "ntklayers_session", default=None)


def capturing() -> bool:
  """Whether a capture session is active (adapters without interceptors check it)."""
  return _SESSION.get() is not None


def _arrays(tree: Any) -> list[jax.Array]:
  return [a for a in jax.tree.leaves(tree) if isinstance(a, jax.Array)]


def tap(*, kind: str, config: Any, name: str, params: Mapping[str, jax.Array],
        primal: jax.Array, out: jax.Array, unsupported: str | None = None,
        inputs: Any = ()) -> jax.Array:
  """Reports one annotated layer call to the active capture session.

  Args:
    kind: registered rule kind (``"dense"``, ``"conv"``, ``"scale"``, ...).
    config: the rule's static config record (hashable).
    name: module path, e.g. ``"mlp/~/linear_1"``.
    params: the parameter arrays the layer used, by role (``{"w": w, "b": b}``),
      exactly as they are read from the model's parameters (no cast, no getter).
    primal: the factor the rule needs from the input side (``[M, ...]``).
    out: the layer output ``[M, ...]``, equal to the rule applied to ``primal``
      and ``params``.
    unsupported: a reason why this configuration has no rule; the layer's
      parameters then go to the exact fallback (with a one-time warning).
    inputs: every array the call received (a pytree); with ``primal`` this must
      cover everything ``out`` depends on besides ``params``.

  Returns:
    ``out``; while capturing, ``out`` passed through the structure tag.

  Example:
    >>> import jax.numpy as jnp, ntklayers
    >>> x, w = jnp.ones((2, 3)), jnp.ones((3, 4))
    >>> ntklayers.tap(kind="dense", config=ntklayers.DenseConfig(), name="mine",
    ...               params={"w": w}, primal=x, out=x @ w).shape
    (2, 4)
  """
  if _SESSION.get() is None:
    return out
  roles = tuple(params)
  if _jax_compat.is_inexact(primal.dtype) and primal.dtype != out.dtype:
    primal = primal.astype(out.dtype)  # (integer primals, e.g. token ids, stay)
  meta = TagMeta(kind, config, name, roles, unsupported)
  operands = [out, primal, *(params[r] for r in roles), *_arrays(inputs)]
  return TAG.bind(*operands, meta=meta)


def declare_coupled(name: str) -> None:
  """Reports a module that makes samples interact (e.g. BatchNorm in training)."""
  session = _SESSION.get()
  if session is not None:
    session.coupled.append(name)
