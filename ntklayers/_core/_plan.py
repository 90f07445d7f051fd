"""From discovered layer calls to a plan: structured groups plus fallback leaves.

The plan is the coverage guarantee: every trainable leaf of ``params`` is
counted exactly once, either by one structured group (all calls of the layers
that read exactly that set of leaves, cross terms included) or by the fallback.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import warnings
from collections.abc import Iterator
from typing import Any

import jax

from ntklayers._core import _jax_compat
from ntklayers._core._discovery import NO_PARAMS, CallRecord, leaf_names
from ntklayers._core._ops import Op
from ntklayers._core._options import check_mask_values
from ntklayers._core._rule import rule_of

# A fallback note: (layer name, parameter role or None, reason).
Note = tuple["str | None", "str | None", str]

_NOTES: contextvars.ContextVar["list[Note] | None"] = contextvars.ContextVar(
    "ntklayers_notes", default=None)


@contextlib.contextmanager
def collecting_notes() -> Iterator["list[Note]"]:
  """Collects the fallback notes made while planning (instead of warning at once)."""
  notes: list[Note] = []
  token = _NOTES.set(notes)
  try:
    yield notes
  finally:
    _NOTES.reset(token)


def notes_mark() -> int:
  """How many notes have been collected so far (for :func:`notes_reset`)."""
  notes = _NOTES.get()
  return 0 if notes is None else len(notes)


def notes_reset(mark: int) -> None:
  """Forgets the notes collected since :func:`notes_mark` returned ``mark`` (a plan
  that was replaced by another before it was used)."""
  notes = _NOTES.get()
  if notes is not None:
    del notes[mark:]


def warn_once(name: str, reason: str, role: str | None = None) -> None:
  """Notes that a layer's (or one parameter's) leaves go to the exact fallback.

  Inside :func:`collecting_notes` (every kernel function) the note is collected
  and the kernel function warns once per note; elsewhere (``capture``) it warns
  now.
  """
  notes = _NOTES.get()
  note = (name, role, reason)
  if notes is None:
    emit_note(note, stacklevel=5)
  elif note not in notes:
    notes.append(note)


class SlowRouteWarning(UserWarning):
  """Most of a model's parameters are on the exact generic fallback (slow)."""


def emit_note(note: Note, stacklevel: int = 3) -> None:
  """Warns (``UserWarning``) that a layer's parameters use the exact fallback;
  a note without a layer name is the model-wide :class:`SlowRouteWarning`."""
  name, role, reason = note
  if name is None:
    warnings.warn(f"ntklayers: {reason}", SlowRouteWarning, stacklevel=stacklevel)
    return
  subject = f"layer {name!r}" if role is None else f"parameter {role!r} of layer {name!r}"
  warnings.warn(
      f"ntklayers: {subject} is handled by the exact generic fallback because "
      f"{reason}.", UserWarning, stacklevel=stacklevel)


@dataclasses.dataclass(frozen=True)
class Group:
  """A structured group: one parameter set and every call that reads it."""

  name: str
  op: Op
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


def leaf_paths(params: Any) -> list[str]:
  """Full paths of the leaves of ``params``, e.g. ``"['linear']['w']"``."""
  return [jax.tree_util.keystr(path)
          for path, _ in jax.tree_util.tree_flatten_with_path(params)[0]]


def resolve_trainable(trainable: Any, params: Any) -> list[bool]:
  """An optax-style mask (tree of bools, prefix tree, or callable) -> bool per leaf.

  The values of a mask given as a tree were checked by ``Options.create``; those
  a callable returns are checked here.
  """
  if trainable is None:
    return [True] * len(jax.tree.leaves(params))
  mask = trainable
  if callable(trainable):
    mask = trainable(params)
    check_mask_values(mask)
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


USED_OUTSIDE = ("it is also used outside the layer's captured calls (by plain code or by "
                "a call that cannot be captured)")


def make_plan(records: tuple[CallRecord, ...], params: Any, trainable: list[bool],
              structured: bool, coupled: bool, outside: frozenset[int] = frozenset()) -> Plan:
  """Groups captured calls by the leaves they read; everything else is fallback.

  Args:
    records: discovered calls (merged over the batches of one kernel).
    params: the parameters (for leaf names and dtypes).
    trainable: one bool per leaf.
    structured: whether structured groups are wanted at all.
    coupled: whether the batch is treated as one sample.
    outside: leaves the model's output depends on outside the direct parameter
      use of the captured calls: they are taken out of their groups (with a
      one-time warning) and counted by the fallback.
  """
  leaves = jax.tree.leaves(params)
  names = leaf_names(params)
  paths = leaf_paths(params)
  bad = [(paths[i], leaves[i].dtype) for i, t in enumerate(trainable)
         if t and not _jax_compat.is_inexact(jax.numpy.result_type(leaves[i]))]
  if bad:
    raise TypeError(
        f"`params` has non-floating leaves that cannot be differentiated: "
        f"{', '.join(f'params{p} ({d})' for p, d in bad)}. Exclude them with "
        f"`trainable`.")
  recs: list[CallRecord] = list(records)
  for r in recs:
    if r.skip is not None and r.skip != NO_PARAMS and structured:
      warn_once(r.name, r.skip)
  # Group captured calls by the exact set of leaves they read and how many loops
  # slice them (a stacked layer reads one slice per step).
  by_leaves: dict[tuple, list[int]] = {}
  for k, r in enumerate(recs):
    if r.skip is None and structured:
      key = (tuple(sorted(i for _, i in r.leaves)), len(r.stack))
      by_leaves.setdefault(key, []).append(k)
  groups = []
  for key, calls in by_leaves.items():
    first = recs[calls[0]]
    reason = None
    if any(set(key[0]) & set(other[0]) for other in by_leaves if other != key):
      reason = "its parameters are shared with another layer of different structure"
    elif len({_structure(recs[c]) for c in calls}) != 1:
      reason = "its calls disagree in structure"
    if reason is not None:
      for c in calls:
        recs[c] = dataclasses.replace(recs[c], skip=reason)
      warn_once(first.name, reason)
      continue
    rule = rule_of(first.kind)
    for role, i in first.leaves:
      if i in outside and trainable[i]:
        warn_once(first.name, USED_OUTSIDE, role)
    roles = tuple(role for role in rule.roles for rl, i in first.leaves
                  if rl == role and trainable[i] and i not in outside)
    idx = tuple(i for role in roles for rl, i in first.leaves if rl == role)
    if not roles:
      why = "frozen by `trainable`" if not any(
          trainable[i] for _, i in first.leaves) else USED_OUTSIDE
      for c in calls:
        recs[c] = dataclasses.replace(recs[c], skip=why)
      continue
    groups.append(Group(_group_name(recs, calls, names, key[0]), rule.op, roles, idx,
                        tuple(calls)))
  owned = {i for g in groups for i in g.leaves}
  fb: dict[str, list[int]] = {}
  for i, t in enumerate(trainable):
    if t and i not in owned:
      fb.setdefault(names[i] or "params", []).append(i)
  fallback = tuple(FallbackGroup(n, tuple(ix)) for n, ix in fb.items())
  _check_coverage(groups, fallback, trainable, names)
  return Plan(tuple(recs), tuple(groups), fallback, coupled)


def _structure(record: CallRecord) -> tuple:
  """What calls sharing parameters must agree on: the rule and the leaves read, and
  for recognized calls how they read them (a leaf read as ``x @ W`` by one call and
  ``x @ W.T`` by another has no consistent cross terms)."""
  if record.recognized is None:
    return (record.kind, record.leaves)
  return (record.kind, record.leaves, record.signature, record.config)


def captured_calls(plan: Plan) -> frozenset[int]:
  """Indices of the calls whose factors the plan captures."""
  return frozenset(c for g in plan.groups for c in g.calls)


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
