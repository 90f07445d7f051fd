"""What the recognizer needs to know about the values of a traced program.

Two facts per value, computed from the program alone (never from values):

* **Parameter views** (:class:`ParamView`): a value that *is* a leaf of
  ``params`` (or a scan's per-step slice of one), possibly seen through layout
  equations that only move its entries (``transpose``, ``reshape`` that adds or
  drops size-1 axes, ``squeeze``, ``broadcast_in_dim``, a widening float cast).
  ``axes`` says, per axis
  of the value, which axis of the leaf it runs along, or ``None`` where the leaf
  is replicated (a broadcast: the positions a bias or a scale is shared over).
  Anything else (a cast, arithmetic, a concatenation) is not a parameter view.
* **Row axes** (:func:`annotate`): a tolerant version of ``_rowproof``'s
  analysis that gives every value its batch axis (``int``), a ``frozenset`` of
  constant axes for values shared by all examples, or ``None`` where it cannot
  tell (after an equation that mixes examples). It never fails; it only serves
  to *locate* the rows of a recognized layer, which the row proof or the
  runtime check then confirms.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from ntklayers._core import _jax_compat
from ntklayers._core import _rowproof
from ntklayers._core._rowtwin import NotPerExample

Path = tuple[int, ...]
_MAX_FIXPOINT = 16


@dataclasses.dataclass(frozen=True)
class ParamView:
  """A value that is a parameter leaf (or a per-step slice of one), up to layout.

  Attributes:
    leaf: index of the leaf in ``jax.tree.leaves(params)``.
    stack: positions (in the enclosing loops) of the scans that slice it.
    axes: per axis of the value, the leaf (slice) axis it runs along, or
      ``None`` where the leaf is replicated; ``None`` altogether: the value is
      the leaf (slice) itself.
    base: the shape of the leaf (slice) the view starts from.
    factor: ``None``, or ``(var, layout)`` for a *scaled* view: the value is the
      view times ``var`` (a value of the same shape that every example shares,
      e.g. BatchNorm's ``rsqrt(var + eps)`` folded into its scale), carried
      through the ``layout`` equations since. Only a ``mul`` by data uses it
      (rule ``scale``, with the factor folded into the primal).
  """

  leaf: int
  stack: tuple[int, ...]
  axes: tuple[int | None, ...] | None = None
  base: tuple[int, ...] = ()
  factor: Any = dataclasses.field(default=None, compare=False)

  @property
  def is_leaf(self) -> bool:
    return self.axes is None

  def value_axes(self) -> tuple[int | None, ...]:
    return tuple(range(len(self.base))) if self.axes is None else self.axes

  def covers_leaf(self) -> bool:
    """Every axis of the leaf of size > 1 runs along exactly one axis of the value."""
    axes = [a for a in self.value_axes() if a is not None]
    need = [a for a, s in enumerate(self.base) if s != 1]
    return len(axes) == len(set(axes)) and set(need) <= set(axes)

  def bijective(self, shape: tuple[int, ...]) -> bool:
    """The value holds each entry of the leaf exactly once (no replication)."""
    return self.covers_leaf() and all(a is not None or s == 1
                                      for a, s in zip(self.value_axes(), shape))

  def varying(self, shape: tuple[int, ...]) -> tuple[int, ...]:
    """The axes of the value along which the leaf's entries vary."""
    return tuple(d for d, (a, s) in enumerate(zip(self.value_axes(), shape))
                 if a is not None and self.base[a] != 1 and s != 1)

  def signature(self, order: tuple[int, ...]) -> tuple:
    """The leaf axes behind the value axes ``order`` (how a layer reads the leaf:
    two calls that read it differently cannot share cross terms)."""
    axes = self.value_axes()
    return tuple(axes[d] for d in order)


def leaf_view(leaf: int, stack: tuple[int, ...], var: Any) -> ParamView:
  return ParamView(leaf, stack, None, tuple(getattr(var.aval, "shape", ())))


def propagate(eqn: Any, view: ParamView) -> ParamView | None:
  """The view of the output of a layout equation on a parameter view, or ``None``."""
  name = eqn.primitive.name
  p = eqn.params
  axes = view.value_axes()
  in_shape = tuple(eqn.invars[0].aval.shape)
  out_shape = tuple(eqn.outvars[0].aval.shape)
  new: list[int | None]
  if name in ("copy", "copy_p"):
    new = list(axes)
  elif name == "convert_element_type":
    # A widening float cast (float32 parameters in a float64 computation: Flax's
    # promote_dtype) is exact, so the leaf's Jacobian is the cast value's.
    src, dst = eqn.invars[0].aval.dtype, eqn.outvars[0].aval.dtype
    if not (_is_float(src) and _is_float(dst) and dst.itemsize >= src.itemsize):
      return None
    new = list(axes)
  elif name == "transpose":
    new = [axes[d] for d in p["permutation"]]
  elif name == "squeeze":
    new = [a for d, a in enumerate(axes) if d not in p["dimensions"]]
  elif name == "broadcast_in_dim":
    dims = tuple(p["broadcast_dimensions"])
    new = [None] * len(out_shape)
    for i, d in enumerate(dims):
      new[d] = axes[i] if in_shape[i] == out_shape[d] else None
  elif name == "reshape" and p.get("dimensions") is None:
    src = [(a, s) for a, s in zip(axes, in_shape) if s != 1]
    if [s for _, s in src] != [s for s in out_shape if s != 1]:
      return None  # merges or splits axes: not a layout move we follow
    it = iter(src)
    new = [next(it)[0] if s != 1 else None for s in out_shape]
  else:
    return None
  factor = None if view.factor is None else (view.factor[0], (*view.factor[1], eqn))
  return dataclasses.replace(view, axes=tuple(new), factor=factor)


def scaled(eqn: Any, views: list, anns: list) -> ParamView | None:
  """The scaled view ``mul(view, c)`` is, or ``None``: ``c`` is no parameter view,
  has the output's shape (so the product moves no entry of the leaf) and is shared
  by every example (its row annotation is a ``frozenset``)."""
  if eqn.primitive.name != "mul" or len(eqn.invars) != 2:
    return None
  p = 0 if views[0] is not None else 1
  view, c = views[p], eqn.invars[1 - p]
  out = tuple(eqn.outvars[0].aval.shape)
  if (view is None or views[1 - p] is not None or view.factor is not None
      or isinstance(c, _jax_compat.Literal) or not isinstance(anns[1 - p], frozenset)
      or tuple(c.aval.shape) != out or tuple(eqn.invars[p].aval.shape) != out
      or not (_is_float(c.aval.dtype) and _is_float(eqn.outvars[0].aval.dtype))):
    return None
  return dataclasses.replace(view, factor=(c, ()))


def factor_value(factor: Any, read: Any) -> Any:
  """The factor of a scaled view where it is used: ``read(var)`` moved by its
  layout equations."""
  var, layout = factor
  value = read(var)
  for eqn in layout:
    (value,) = _jax_compat.eval_eqn(eqn, [value])
  return value


LAYOUT = frozenset({"copy", "copy_p", "transpose", "squeeze", "broadcast_in_dim", "reshape",
                    "convert_element_type"})


def _is_float(dtype: Any) -> bool:
  return np.issubdtype(dtype, np.floating)


# ------------------------------------------------------------- row axes ---


def _join(a: Any, b: Any) -> Any:
  if a == b:
    return a
  if isinstance(a, frozenset) and isinstance(b, frozenset):
    return a & b
  return None


def annotate(jaxpr: Any, in_anns: list, envs: dict[Path, dict], path: Path = ()) -> list:
  """Row annotations of the outputs of ``jaxpr``; ``envs[path]`` (and the entries of
  nested scan, remat and call bodies, under their equations' paths) receive every
  value's annotation."""
  env: dict[Any, Any] = {}
  envs[path] = env

  def read(v):
    if isinstance(v, _jax_compat.Literal):
      return frozenset(range(len(getattr(v.aval, "shape", ()))))
    return env.get(v, frozenset())  # constvars: shared

  for v, a in zip(jaxpr.invars, in_anns):
    env[v] = a
  for k, eqn in enumerate(jaxpr.eqns):
    here = path + (k,)
    anns = [read(v) for v in eqn.invars]
    name = eqn.primitive.name
    if name == _jax_compat.SCAN:
      outs = _scan(eqn, anns, envs, here)
    elif name in _jax_compat.REMAT or name in _jax_compat.CALLS:
      outs = annotate(_jax_compat.body(eqn)[0], anns, envs, here)
    elif any(a is None for a in anns):
      outs = [None] * len(eqn.outvars)
    else:
      shapes = [tuple(getattr(v.aval, "shape", ())) for v in eqn.invars]
      out_shapes = [tuple(getattr(v.aval, "shape", ())) for v in eqn.outvars]
      try:
        outs = _rowproof.batch_rule(eqn, anns, shapes, out_shapes)
      except (NotPerExample, Exception):  # pylint: disable=broad-except
        outs = [None] * len(eqn.outvars)
    for v, a in zip(eqn.outvars, outs):
      env[v] = a if a is None or isinstance(a, frozenset) else int(a)
  return [read(v) for v in jaxpr.outvars]


def _shift(a: Any, by: int) -> Any:
  if a is None:
    return None
  if isinstance(a, frozenset):
    return frozenset(d + by for d in a if d + by >= 0)
  return None if a + by < 0 else a + by


def _scan(eqn: Any, anns: list, envs: dict, here: Path) -> list:
  sp = _jax_compat.scan_params(eqn)
  nc, ncar = sp["num_consts"], sp["num_carry"]
  body = _jax_compat.body(eqn)[0]
  consts, carry = anns[:nc], list(anns[nc:nc + ncar])
  xs = [_shift(a, -1) for a in anns[nc + ncar:]]  # a scan over the batch: unknown
  outs: list = []
  for _ in range(_MAX_FIXPOINT):
    outs = annotate(body, consts + carry + xs, envs, here)
    new = [_join(c, o) for c, o in zip(carry, outs[:ncar])]
    if new == carry:
      break
    carry = new
  else:
    carry = [None] * ncar
    outs = annotate(body, consts + carry + xs, envs, here)
  ys = [None if a is None else (frozenset(d + 1 for d in a) if isinstance(a, frozenset)
                                else a + 1) for a in outs[ncar:]]
  return carry + ys
