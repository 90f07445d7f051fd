"""The registry of structure rules: what a rule is, and how rules are registered.

A *rule* turns one layer call's cached primal ``x`` (the layer's input, ``[M, ...]``)
and output cotangents ``g`` (``[B, M, ...]``, one slice per model output) into the
canonical factors of one :class:`~ntklayers.adapters.Op` (``_ops.py``). The
built-in rules (``dense``, ``conv``, ``scale`` in ``_rules.py``, ``embed`` in
``_rules_embed.py``) register themselves here when the core is imported; adding a
layer kind is one :class:`Rule` plus one :func:`register_rule` call.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax.numpy as jnp

from ntklayers._core._ops import Op

# What an adapter reports for one layer call: (kind, config, primal, reason-if-unsupported).
Description = tuple[str, Any, jnp.ndarray, "str | None"]

Canonicalize = Callable[[Any, jnp.ndarray, jnp.ndarray], tuple[jnp.ndarray, jnp.ndarray]]
OnVmap = Callable[[Any], Any]


@dataclasses.dataclass(frozen=True)
class Rule:
  """How one layer kind depends on its parameters.

  Attributes:
    op: the canonical structure (``AFFINE``, ``SCALE``, ``GATHER``, ...); its
      ``roles`` name the parameters (``("w", "b")``, ``("scale", "offset")``).
    canonicalize: ``(config, x [M, ...], g [B, M, ...]) -> (x_c, g_c)``.
    unsupported: ``(config, x_shape) -> reason or None``.
    flops: ``(config, x_shape, y_shape) -> forward FLOPs per example``.
    vmappable: the config stays valid unchanged when ``vmap`` adds a leading axis
      to the primal and the output (it refers to trailing axes only, as the dense
      rule's). Shorthand for ``on_vmap=lambda config: config``.
    on_vmap: ``config -> config`` of the call with a new leading (row) axis on its
      primal and output, or ``None`` if the rule cannot take one (the call then
      goes to the exact fallback). E.g. a convolution written per example
      (unbatched input) becomes a batched one; a scale over absolute axes shifts
      them by one.
  """

  op: Op
  canonicalize: Canonicalize
  unsupported: Callable[[Any, tuple[int, ...]], str | None]
  flops: Callable[[Any, tuple[int, ...], tuple[int, ...]], float]
  vmappable: bool = False
  on_vmap: OnVmap | None = None

  @property
  def roles(self) -> tuple[str, ...]:
    return self.op.roles

  def vmapped(self, config: Any) -> Any:
    """The config of the call under ``vmap`` (``None``: not structured)."""
    if self.on_vmap is not None:
      return self.on_vmap(config)
    return config if self.vmappable else None


_REGISTRY: dict[str, Rule] = {}


def register_rule(kind: str, rule: Rule) -> None:
  """Registers ``rule`` for layers that declare structure ``kind``.

  Raises:
    TypeError: ``rule`` is not a :class:`Rule` over an ``Op``.
    ValueError: ``kind`` is already registered (rules are never overwritten).

  Example:
    >>> import ntklayers
    >>> from ntklayers import adapters
    >>> rule = ntklayers.Rule(adapters.AFFINE, lambda cfg, x, g: (x, g),
    ...                       lambda cfg, shape: None, lambda cfg, x, y: 0.0)
    >>> ntklayers.register_rule("dense", rule)
    Traceback (most recent call last):
    ...
    ValueError: A rule for kind 'dense' is already registered.
  """
  if not isinstance(rule, Rule) or not isinstance(rule.op, Op):
    raise TypeError(f"`rule` for kind {kind!r} must be a Rule over an Op, got {rule!r}.")
  if kind in _REGISTRY:
    raise ValueError(f"A rule for kind {kind!r} is already registered.")
  _REGISTRY[kind] = rule


def get_rule(kind: str) -> Rule | None:
  """The rule of ``kind``, or ``None`` if none is registered."""
  return _REGISTRY.get(kind)


def rule_of(kind: str) -> Rule:
  """The rule of ``kind``, which must be registered (a planned call's kind)."""
  return _REGISTRY[kind]
