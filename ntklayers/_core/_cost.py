"""FLOP counts of a traced model, for choosing routes and for ``inspect``.

The fallback routes cost a multiple of the model's forward pass (paper, Table 2:
Jacobian contraction ``~3 N O F``, NTK-vector products ``~5 N^2 O F``), so the
route choice needs ``F``, the forward FLOPs per example. Counting 2 FLOPs per
parameter ignores that a convolution's weight is used at every output position
and that a token-mixing matmul has no parameters at all; this module counts the
traced program instead: matrix products and convolutions by their contraction
sizes, every other equation by its output size, loops by their trip counts.
"""

from __future__ import annotations

import math
from typing import Any

from ntklayers._core import _jax_compat


def _size(aval: Any) -> int:
  shape = getattr(aval, "shape", ())
  return math.prod(shape) if shape is not None else 1


def _dot_flops(eqn: Any) -> float:
  (contract_lhs, _), _ = eqn.params["dimension_numbers"]
  lhs = eqn.invars[0].aval.shape
  k = math.prod(lhs[a] for a in contract_lhs)
  return 2.0 * _size(eqn.outvars[0].aval) * k


def _conv_flops(eqn: Any) -> float:
  rhs = eqn.invars[1].aval.shape
  dn = eqn.params["dimension_numbers"]
  out_feature = dn.rhs_spec[0]
  per_output = math.prod(rhs) // rhs[out_feature]
  return 2.0 * _size(eqn.outvars[0].aval) * per_output


def eqn_flops(eqn: Any) -> float:
  """FLOPs of one equation (nested bodies counted as :func:`jaxpr_flops` does)."""
  name = eqn.primitive.name
  if name == "dot_general":
    return _dot_flops(eqn)
  if name == "conv_general_dilated":
    return _conv_flops(eqn)
  if name == "scan":
    body, _ = _jax_compat.body(eqn)
    return _jax_compat.scan_params(eqn)["length"] * jaxpr_flops(body)
  if name == "cond":
    return max(jaxpr_flops(b) for b in _jax_compat.cond_branches(eqn) or [])
  if _jax_compat.has_body(eqn):
    return sum(jaxpr_flops(j) for j in _jax_compat.nested(eqn))
  return float(sum(_size(v.aval) for v in eqn.outvars))


def jaxpr_flops(jaxpr: Any) -> float:
  """FLOPs of one evaluation of an open or closed jaxpr (loops unrolled in the
  count, ``cond`` by its most expensive branch, ``while`` as one trip)."""
  jaxpr = getattr(jaxpr, "jaxpr", jaxpr)
  return float(sum(eqn_flops(eqn) for eqn in jaxpr.eqns))


def flops_from_first_use(jaxpr: Any, n_params: int, leaves: Any) -> float:
  """FLOPs of the program from the first top-level equation where data meets one
  of ``leaves`` (an input computed from the data and one computed from those
  leaves): what a backward pass to those leaves traverses. The whole program's
  FLOPs when they never meet in a top-level equation of their own.

  Args:
    jaxpr: the traced model ``(params leaves..., x leaves...) -> out``.
    n_params: how many of its inputs are parameter leaves.
    leaves: indices of the parameter leaves.
  """
  jaxpr = getattr(jaxpr, "jaxpr", jaxpr)
  chosen = set(leaves)
  param = {v for i, v in enumerate(jaxpr.invars[:n_params]) if i in chosen}
  data = set(jaxpr.invars[n_params:])
  flops = [eqn_flops(e) for e in jaxpr.eqns]
  for k, eqn in enumerate(jaxpr.eqns):
    ins = [v for v in eqn.invars if not isinstance(v, _jax_compat.Literal)]
    p, d = any(v in param for v in ins), any(v in data for v in ins)
    if p and d:
      return float(sum(flops[k:]))
    if p:
      param.update(eqn.outvars)
    if d:
      data.update(eqn.outvars)
  return float(sum(flops))


def forward_flops_per_example(jaxpr: Any, batch: int) -> float:
  """Forward FLOPs of a traced batch of ``batch`` examples, per example."""
  return jaxpr_flops(jaxpr) / max(batch, 1)
