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


def jaxpr_flops(jaxpr: Any) -> float:
  """FLOPs of one evaluation of an open or closed jaxpr (loops unrolled in the
  count, ``cond`` by its most expensive branch, ``while`` as one trip)."""
  jaxpr = getattr(jaxpr, "jaxpr", jaxpr)
  total = 0.0
  for eqn in jaxpr.eqns:
    name = eqn.primitive.name
    if name == "dot_general":
      total += _dot_flops(eqn)
    elif name == "conv_general_dilated":
      total += _conv_flops(eqn)
    elif name == "scan":
      body, _ = _jax_compat.body(eqn)
      total += _jax_compat.scan_params(eqn)["length"] * jaxpr_flops(body)
    elif name == "cond":
      total += max(jaxpr_flops(b) for b in _jax_compat.cond_branches(eqn) or [])
    elif _jax_compat.has_body(eqn):
      total += sum(jaxpr_flops(j) for j in _jax_compat.nested(eqn))
    else:
      total += float(sum(_size(v.aval) for v in eqn.outvars))
  return total


def forward_flops_per_example(jaxpr: Any, batch: int) -> float:
  """Forward FLOPs of a traced batch of ``batch`` examples, per example."""
  return jaxpr_flops(jaxpr) / max(batch, 1)
