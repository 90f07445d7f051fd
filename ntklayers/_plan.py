"""From discovered layer calls to a plan: structured groups plus fallback leaves.

The plan is the coverage guarantee: every trainable leaf of ``params`` is
counted exactly once, either by one structured group (all calls of the layers
that read exactly that set of leaves, cross terms included) or by the fallback.
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import Any

import jax

from ntklayers import _jax_compat
from ntklayers._capture import NO_PARAMS, CallRecord, Discovery
from ntklayers._rules import get_rule

_WARNED: set[tuple[str, str]] = set()


def warn_once(name: str, reason: str) -> None:
  """Warns (once per module and reason) that a layer goes to the exact fallback."""
  if (name, reason) in _WARNED:
    return
  _WARNED.add((name, reason))
  warnings.warn(
      f"ntklayers: layer {name!r} is handled by the exact generic fallback "
      f"because {reason}.", UserWarning, stacklevel=4)


@dataclasses.dataclass(frozen=True)
class Group:
  """A structured group: one parameter set and every call that reads it."""

  name: str
  op: str
  roles: tuple[str, ...]
  leaves: tuple[int, ...]
  calls: tuple[int, ...]  # indices into the discovery records


@dataclasses.dataclass(frozen=True)
class FallbackGroup:
  name: str
  leaves: tuple[int, ...]


@dataclasses.dataclass(frozen=True)
class Plan:
  records: tuple[CallRecord, ...]  # with demoted calls marked as skipped
  groups: tuple[Group, ...]
  fallback: tuple[FallbackGroup, ...]
  coupled: bool


def leaf_names(params: Any) -> list[str]:
  """Module-level names of the leaves: the leaf path without its last key."""
  names = []
  for path, _ in jax.tree_util.tree_flatten_with_path(params)[0]:
    if path and isinstance(path[-1], jax.tree_util.GetAttrKey) and path[-1].name == "value":
      path = path[:-1]  # flax.nnx Variables flatten to their `.value`
    parts = [str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))) for k in path]
    names.append("/".join(parts[:-1]))
  return names


def resolve_trainable(trainable: Any, params: Any) -> list[bool]:
  """An optax-style mask (tree of bools, prefix tree, or callable) -> bool per leaf."""
  if trainable is None:
    return [True] * len(jax.tree.leaves(params))
  mask = trainable(params) if callable(trainable) else trainable
  try:
    full = jax.tree.map(
        lambda m, sub: jax.tree.map(lambda _: bool(m), sub), mask, params,
        is_leaf=lambda m: isinstance(m, bool) or m is None)
  except (ValueError, TypeError) as e:
    raise ValueError(
        f"`trainable` must be a pytree of bools with the structure of `params` "
        f"(or a prefix of it); got {jax.tree.structure(mask)} for params "
        f"{jax.tree.structure(params)}.") from e
  return list(jax.tree.leaves(full))


def make_plan(disc: Discovery, params: Any, trainable: list[bool], structured: bool,
              coupled: bool) -> Plan:
  leaves = jax.tree.leaves(params)
  names = leaf_names(params)
  bad = [(names[i], leaves[i].dtype) for i, t in enumerate(trainable)
         if t and not _jax_compat.is_inexact(jax.numpy.result_type(leaves[i]))]
  if bad:
    raise TypeError(
        f"`params` has non-floating leaves that cannot be differentiated: {bad}. "
        f"Exclude them with `trainable`.")
  records = list(disc.records)
  for r in records:
    if r.skip is not None and r.skip != NO_PARAMS and structured:
      warn_once(r.name, r.skip)
  # Group captured calls by the exact set of leaves they read.
  by_leaves: dict[tuple[int, ...], list[int]] = {}
  for k, r in enumerate(records):
    if r.skip is None and structured:
      by_leaves.setdefault(tuple(sorted(i for _, i in r.leaves)), []).append(k)
  skipped_names = {r.name for r in records if r.skip not in (None, NO_PARAMS)}
  groups = []
  for key, calls in by_leaves.items():
    first = records[calls[0]]
    reason = None
    if any(set(key) & set(other) for other in by_leaves if other != key):
      reason = "its parameters are shared with another layer of different structure"
    elif any(records[c].name in skipped_names for c in calls):
      reason = "another call of the same module could not be captured"
    elif len({(records[c].kind, records[c].leaves) for c in calls}) != 1:
      reason = "its calls disagree in structure"
    if reason is not None:
      for c in calls:
        records[c] = dataclasses.replace(records[c], skip=reason)
      warn_once(first.name, reason)
      continue
    rule = get_rule(first.kind)
    roles = tuple(role for role in rule.roles for rl, i in first.leaves
                  if rl == role and trainable[i])
    idx = tuple(i for role in roles for rl, i in first.leaves if rl == role)
    if not roles:
      for c in calls:
        records[c] = dataclasses.replace(records[c], skip="frozen by `trainable`")
      continue
    groups.append(Group(_group_name(records, calls, names, key), rule.op, roles, idx,
                        tuple(calls)))
  owned = {i for g in groups for i in g.leaves}
  fb: dict[str, list[int]] = {}
  for i, t in enumerate(trainable):
    if t and i not in owned:
      fb.setdefault(names[i] or "params", []).append(i)
  fallback = tuple(FallbackGroup(n, tuple(ix)) for n, ix in fb.items())
  _check_coverage(groups, fallback, trainable, names)
  return Plan(tuple(records), tuple(groups), fallback, coupled)


def _group_name(records, calls, names, leaves) -> str:
  """The module path of the group's parameters (so names agree with fallback
  groups and do not depend on how the framework names module objects); the
  layers' own names when the parameters sit at the root of ``params``."""
  owners = dict.fromkeys(names[i] for i in leaves)
  if len(owners) == 1 and next(iter(owners)):
    return next(iter(owners))
  return "+".join(dict.fromkeys(records[c].name for c in calls))


def _check_coverage(groups, fallback, trainable, names) -> None:
  """Every trainable leaf is counted exactly once (a group or the fallback)."""
  counted = [i for g in groups for i in g.leaves] + [i for g in fallback for i in g.leaves]
  expected = [i for i, t in enumerate(trainable) if t]
  if sorted(counted) != expected:
    twice = sorted({names[i] for i in counted if counted.count(i) > 1})
    missing = sorted({names[i] for i in set(expected) - set(counted)})
    raise RuntimeError(
        f"ntklayers coverage check failed: counted twice {twice}, missing "
        f"{missing}. Please report this with the model.")


def forward_flops(disc: Discovery, params: Any) -> float:
  """Rough forward FLOPs per example (for choosing fallback routes)."""
  total = 2.0 * sum(leaf.size for leaf in jax.tree.leaves(params))
  for r in disc.records:
    rule = get_rule(r.kind)
    if rule is not None and r.skip is None:
      total += rule.flops(r.config, r.primal[0], r.out[0])
  return total

