"""Structure without annotations: layers recognized in the traced program.

An equation of an unmodified model becomes a structured call, exactly as a
drop-in's tag does, when one operand is a parameter view (``_views``: a leaf of
``params`` or a scan's slice of one, up to layout) and the other is the data
flowing through the model:

* ``dot_general(x, W)`` (either order, any contracting, free and batch
  dimensions: ``x @ W``, ``W @ x`` under ``vmap``, einsums, attention
  projections): rule ``dense`` (batch dimensions are groups);
* ``conv_general_dilated(x, W)`` (any dimension numbers, strides, padding,
  dilations, feature groups): rule ``conv``;
* ``add`` / ``sub`` of a broadcast leaf: rule ``bias``;
* ``mul`` by a broadcast leaf (the scales of normalizations): rule ``scale``;
* ``gather`` of rows of a table leaf (embeddings): rule ``embed``.

A :class:`Recognized` descriptor tells the replay how to read the call's
canonical primal from the equation's operands and where to add the canonical
output perturbation. Rows are the data operand's batch axis as located by
``_views.annotate`` (or its leading axis of size ``N``); whether rows are
examples is then proven or checked like any tag's. Anything the recognizer is
not sure of stays an ordinary equation: its parameters go to the exact fallback.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp

from ntklayers._core._rules import ConvConfig, DenseConfig, ScaleConfig
from ntklayers._core._rules_embed import EmbedConfig
from ntklayers._core import _views
from ntklayers._core._views import ParamView

KINDS = ("dense", "conv", "bias", "scale", "embed")


@dataclasses.dataclass(frozen=True)
class Recognized:
  """How a recognized equation maps to its rule's canonical primal and output.

  Attributes:
    kind: the rule (``"dense"``, ``"conv"``, ``"bias"``, ``"scale"``, ``"embed"``).
    data: index of the data operand in the equation's operands.
    param: index of the parameter operand.
    x_perm: the permutation of the data operand that gives the primal.
    out_perm: the permutation of the equation's output that gives the rule's
      output layout (rows first).
    shape: for an elementwise equation whose data operand is broadcast (size-1
      axes), the output shape it is broadcast to first.
    factor: for a ``scale`` whose parameter operand is a scaled view
      (``_views.scaled``), the view's factor: the primal is the data operand
      times the factor (``d/ds [x * (c * s)] = x * c``).
    source: for a call fused with the bias added to its output (:func:`fuse_offset`),
      the path of the equation this descriptor reads (the product); the call's
      own path is then the ``add``'s, where its output is perturbed.
    offset_param: with ``source``, the index of the bias operand of the ``add``.
  """

  kind: str
  data: int
  param: int
  x_perm: tuple[int, ...]
  out_perm: tuple[int, ...]
  shape: tuple[int, ...] | None = None
  factor: Any = dataclasses.field(default=None, compare=False)
  source: tuple[int, ...] | None = None
  offset_param: int | None = None

  def primal(self, invals: list, read: Any = None) -> Any:
    """The canonical primal from the equation's operands (``read`` gives the
    values of the program's variables, for a factor)."""
    x = invals[self.data]
    if self.factor is not None:
      c = _views.factor_value(self.factor, read)
      x = x * jnp.broadcast_to(c, invals[self.param].shape).astype(x.dtype)
    if self.kind == "bias":  # the rule reads only the cotangents: a token primal
      return jnp.zeros((x.shape[self.x_perm[0]],), x.dtype)
    if self.kind == "embed":
      return x[..., 0]
    if self.shape is not None and tuple(x.shape) != self.shape:
      x = jnp.broadcast_to(x, self.shape)
    return jnp.transpose(x, self.x_perm) if self.x_perm != tuple(range(x.ndim)) else x

  def to_eqn(self, pert: Any) -> Any:
    """A perturbation in the rule's layout, moved to the equation's layout."""
    if self.out_perm == tuple(range(pert.ndim)):
      return pert
    inverse = [0] * len(self.out_perm)
    for k, d in enumerate(self.out_perm):
      inverse[d] = k
    return jnp.transpose(pert, inverse)


@dataclasses.dataclass(frozen=True)
class Found:
  """A recognized call: its rule kind and config, the parameter's role and view,
  its descriptor, and the shapes of its primal and output in the rule's layout."""

  kind: str
  config: Any
  role: str
  view: ParamView
  recognized: Recognized
  primal: tuple[tuple[int, ...], Any]
  out: tuple[tuple[int, ...], Any]
  signature: tuple


def _rows(ann: Any, shape: tuple[int, ...], n: int) -> int | None:
  """The row axis of a data operand: its batch axis, else its leading axis of size
  ``n`` (rows the runtime check will confirm or refute)."""
  if isinstance(ann, int) and not isinstance(ann, bool) and shape[ann] == n:
    return ann
  if shape and shape[0] == n and (ann is None or not isinstance(ann, frozenset)):
    return 0
  return None


def _shape(v: Any) -> tuple[int, ...]:
  return tuple(getattr(v.aval, "shape", ()))


def recognize(eqn: Any, views: list, anns: list, n: int) -> Found | None:
  """The structured call ``eqn`` is, or ``None`` (then it stays an equation).

  Args:
    eqn: a jaxpr equation.
    views: per operand, its :class:`ParamView` or ``None``.
    anns: per operand, its row annotation (``_views.annotate``).
    n: the batch size.
  """
  name = eqn.primitive.name
  if len(eqn.outvars) != 1 or sum(v is not None for v in views) != 1:
    return None
  p = next(k for k, v in enumerate(views) if v is not None)
  view = views[p]
  if not all(jnp.issubdtype(v.aval.dtype, jnp.inexact) for v in (eqn.outvars[0],
                                                                  eqn.invars[p])):
    return None
  if view.factor is not None and name != "mul":
    return None  # a scaled view is only followed into a product with data
  if name == "dot_general":
    return _dense(eqn, p, view, anns, n)
  if name == "conv_general_dilated" and p == 1:
    return _conv(eqn, view, anns, n)
  if name in ("add", "sub", "mul") and len(eqn.invars) == 2:
    return _elementwise(eqn, p, view, anns, n)
  if name == "gather" and p == 0:
    return _gather(eqn, view, anns, n)
  return None


def _dense(eqn, p, view, anns, n) -> Found | None:
  (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
  d = 1 - p
  x, w = eqn.invars[d], eqn.invars[p]
  xs, ws = _shape(x), _shape(w)
  xc, wc = (lc, rc) if d == 0 else (rc, lc)
  xb, wb = (lb, rb) if d == 0 else (rb, lb)
  xf = [a for a in range(len(xs)) if a not in xc and a not in xb]
  wf = [a for a in range(len(ws)) if a not in wc and a not in wb]
  row = _rows(anns[d], xs, n)
  if row is None or row not in xf or not view.bijective(ws):
    return None
  xf = [row] + [a for a in xf if a != row]
  x_perm = tuple(xf) + tuple(xb) + tuple(xc)
  # dot_general's output: batch dims, then lhs free, then rhs free.
  nb = len(xb)
  lhs_free = list(range(nb, nb + (len(xf) if d == 0 else len(wf))))
  rhs_free = list(range(nb + len(lhs_free), nb + len(lhs_free) + (len(wf) if d == 0
                                                                   else len(xf))))
  out_x, out_w = (lhs_free, rhs_free) if d == 0 else (rhs_free, lhs_free)
  original_xf = sorted(xf)  # the output keeps the data operand's free axes in order
  out_x = [out_x[original_xf.index(a)] for a in xf]
  out_perm = tuple(out_x) + tuple(range(nb)) + tuple(out_w)
  config = DenseConfig(in_axes=len(xc), out_axes=len(wf), group_axes=len(xb))
  out = eqn.outvars[0].aval
  primal = (tuple(xs[a] for a in x_perm), x.aval.dtype)
  outs = (tuple(out.shape[a] for a in out_perm), out.dtype)
  return Found("dense", config, "w", view, Recognized("dense", d, p, x_perm, out_perm),
               primal, outs, ("dense", view.signature(tuple(wb) + tuple(wc) + tuple(wf))))


def _conv(eqn, view, anns, n) -> Found | None:
  prm = eqn.params
  dn = prm["dimension_numbers"]
  lhs, rhs = eqn.invars
  xs, ws = _shape(lhs), _shape(rhs)
  lhs_spec, rhs_spec, out_spec = (tuple(s) for s in (dn.lhs_spec, dn.rhs_spec,
                                                     dn.out_spec))
  row = _rows(anns[0], xs, n)
  if (row != lhs_spec[0] or prm["batch_group_count"] != 1 or not view.bijective(ws)
      or isinstance(prm["padding"], str)):
    return None
  x_perm = (lhs_spec[0], *lhs_spec[2:], lhs_spec[1])
  out_perm = (out_spec[0], *out_spec[2:], out_spec[1])
  nd = len(lhs_spec) - 2
  config = ConvConfig(
      kernel_shape=tuple(ws[a] for a in rhs_spec[2:]),
      strides=tuple(prm["window_strides"]),
      padding=tuple((int(lo), int(hi)) for lo, hi in prm["padding"]),
      lhs_dilation=tuple(prm["lhs_dilation"] or (1,) * nd),
      rhs_dilation=tuple(prm["rhs_dilation"] or (1,) * nd),
      feature_group_count=int(prm["feature_group_count"]), channels_last=True,
      batched=True)
  out = eqn.outvars[0].aval
  return Found("conv", config, "w", view, Recognized("conv", 0, 1, x_perm, out_perm),
               (tuple(xs[a] for a in x_perm), lhs.aval.dtype),
               (tuple(out.shape[a] for a in out_perm), out.dtype),
               ("conv", view.signature(rhs_spec)))


def _elementwise(eqn, p, view, anns, n) -> Found | None:
  d = 1 - p
  x = eqn.invars[d]
  xs, ps = _shape(x), _shape(eqn.invars[p])
  out = tuple(eqn.outvars[0].aval.shape)
  if (len(xs) != len(out) or len(ps) != len(out) or not view.covers_leaf()
      or any(a not in (1, o) or b not in (1, o) for a, b, o in zip(xs, ps, out))):
    return None  # (lax broadcasts size-1 axes of elementwise operands)
  row = _rows(anns[d], xs, n)
  varying = view.varying(ps)
  if row is None or xs[row] != out[row] or row in varying or not varying:
    return None  # a parameter that varies along the rows is not a shared scale
  rest = tuple(a for a in range(len(out)) if a != row)
  perm = (row,) + rest
  axes = tuple(rest.index(a) + 1 for a in varying)
  kind, role = ("scale", "scale") if eqn.primitive.name == "mul" else ("bias", "offset")
  dtype = eqn.outvars[0].aval.dtype
  return Found(kind, ScaleConfig(axes), role, view,
               Recognized(kind, d, p, perm, perm, None if xs == out else out, view.factor),
               ((n,) if kind == "bias" else tuple(out[a] for a in perm), x.aval.dtype),
               (tuple(out[a] for a in perm), dtype), (kind, view.signature(tuple(varying))))


def _gather(eqn, view, anns, n) -> Found | None:
  prm = eqn.params
  dn = prm["dimension_numbers"]
  table, ids = eqn.invars
  ts, ixs = _shape(table), _shape(ids)
  out = eqn.outvars[0].aval
  if (len(ts) != 2 or not view.is_leaf or tuple(dn.collapsed_slice_dims) != (0,)
      or tuple(dn.start_index_map) != (0,) or tuple(dn.offset_dims) != (len(ixs) - 1,)
      or tuple(getattr(dn, "operand_batching_dims", ())) or tuple(prm["slice_sizes"]) != (1, ts[1])
      or not ixs or ixs[-1] != 1 or len(ixs) < 2):
    return None
  row = _rows(anns[1], ixs, n)
  if row != 0:
    return None
  mode = "clip" if "CLIP" in str(prm["mode"]).upper() else "one_hot"
  ident = tuple(range(len(ixs)))
  return Found("embed", EmbedConfig(int(ts[0]), mode), "embeddings", view,
               Recognized("embed", 1, 0, ident, tuple(range(len(out.shape)))),
               (ixs[:-1], ids.aval.dtype), (tuple(out.shape), out.dtype),
               ("embed", (0, 1)))


# ---------------------------------------------------------------- fusion ---

OFFSET_ROLE = {"dense": "b", "conv": "b", "scale": "offset"}


def _offset_axes(kind: str, config: Any, out_perm: tuple[int, ...]) -> tuple[int, ...] | None:
  """The axes of the equation's output along which the rule's offset varies (its
  output features), or ``None`` when the rule has no such offset here."""
  n = len(out_perm)
  if kind == "dense":
    if config.group_axes:
      return None
    rule_axes: tuple[int, ...] = tuple(range(n - config.out_axes, n))
  elif kind == "conv":
    rule_axes = (n - 1,)
  elif kind == "scale":
    rule_axes = tuple(config.param_axes)
  else:
    return None
  return tuple(out_perm[a] for a in rule_axes)


def fuse_offset(kind: str, config: Any, recognized: Recognized, stack: tuple[int, ...],
                bias: Found, out_shape: tuple[int, ...]) -> bool:
  """Whether ``bias`` (an ``add`` of a leaf to the output of a recognized
  ``kind`` call, its only use) is that call's offset: the leaf varies exactly
  along the output features, once each, and is sliced by the same loops. Then the
  call reads both leaves and is perturbed after the ``add`` (one cotangent, as a
  drop-in layer with a bias, instead of two)."""
  axes = _offset_axes(kind, config, recognized.out_perm)
  view = bias.view
  if (axes is None or bias.kind != "bias" or bias.recognized.shape is not None
      or view.factor is not None or view.stack != stack or not view.covers_leaf()):
    return False
  value_axes = view.value_axes()
  for e, size in enumerate(out_shape):
    a = value_axes[e]
    if e in axes:
      if size > 1 and a is None:
        return False
    elif a is not None and view.base[a] != 1:
      return False
  size = 1
  for e in axes:
    size *= out_shape[e]
  leaf = 1
  for d in view.base:
    leaf *= d
  return size == leaf
