"""Coverage: which parameter leaves the output depends on outside the captured calls.

A structured group is exact only if its leaves reach the output through the
captured calls' parameter operands alone. :func:`outside` propagates one taint bit
per leaf through the traced program (``scan``, ``remat`` and ``jit`` bodies
followed, loop carries to a fixed point, ``cond`` and ``while`` conservatively)
and reports the leaves that reach the output any other way; the plan sends them
to the fallback.
"""

from __future__ import annotations

from ntklayers._core import _jax_compat
from ntklayers._core._discovery import Path, Traced
from ntklayers._core._session import TAG


def outside(traced: Traced, captured: frozenset[Path]) -> frozenset[int]:
  """Parameter leaves the output depends on other than through the direct
  parameter use of the ``captured`` tags (by their paths).

  A captured tag's output counts as depending on the tag's primal and inputs
  only, a captured recognized equation's on its data operand only; every other
  equation's outputs depend on all of its inputs, except that ``scan``,
  ``remat`` and ``jit`` bodies are followed (loop carries to a fixed point). The
  answer may over-approximate, never miss, a dependency.
  """
  jaxpr = traced.jaxpr.jaxpr
  taint = [1 << i for i in range(traced.n_params)]
  taint += [0] * (len(jaxpr.invars) - traced.n_params)
  at: dict = {path: None for path in captured}
  for r in traced.records:
    rec = r.recognized
    if rec is None or r.path not in captured:
      continue
    if rec.source is None:
      at[r.path] = (rec.param, rec.factor)
    else:  # fused with its bias: the product reads W, the add reads b
      at[rec.source], at[r.path] = (rec.param, rec.factor), (rec.offset_param, None)
  mask = 0
  for t in _taint(jaxpr, taint, at, ()):
    mask |= t
  return frozenset(i for i in range(traced.n_params) if mask >> i & 1)


def _taint(jaxpr, in_taint: list[int], captured: dict, path: Path) -> list[int]:
  env = dict(zip(jaxpr.invars, in_taint))

  def read(v):
    return 0 if isinstance(v, _jax_compat.Literal) else env.get(v, 0)

  for k, eqn in enumerate(jaxpr.eqns):
    here = path + (k,)
    t_in = [read(v) for v in eqn.invars]
    name = eqn.primitive.name
    if eqn.primitive is TAG:
      n_roles = len(eqn.params["meta"].roles)
      kept = t_in[1:2] + t_in[2 + n_roles:] if here in captured else t_in
      outs = [_union(kept)]
    elif captured.get(here) is not None:  # a captured recognized equation
      param, factor = captured[here]  # (a scaled view's factor is read, too)
      kept = [t for i, t in enumerate(t_in) if i != param]
      outs = [_union(kept + ([] if factor is None else [read(factor[0])]))]
    elif name == _jax_compat.SCAN:
      sp = _jax_compat.scan_params(eqn)
      nc, ncar = sp["num_consts"], sp["num_carry"]
      inner_jaxpr, _ = _jax_compat.body(eqn)
      carry = t_in[nc:nc + ncar]
      while True:
        body_out = _taint(inner_jaxpr, t_in[:nc] + carry + t_in[nc + ncar:], captured, here)
        new = [a | b for a, b in zip(carry, body_out[:ncar])]
        if new == carry:
          break
        carry = new
      outs = carry + body_out[ncar:]
    elif name in _jax_compat.REMAT or name in _jax_compat.CALLS:
      inner_jaxpr, _ = _jax_compat.body(eqn)
      outs = _taint(inner_jaxpr, t_in, captured, here)
    else:
      outs = _taint_other(eqn, t_in, captured, here)
    for v, t in zip(eqn.outvars, outs):
      env[v] = t
  return [read(v) for v in jaxpr.outvars]


def _taint_other(eqn, t_in: list[int], captured, here: Path) -> list[int]:
  """Taints through ``cond`` (any branch) and ``while`` (carries to a fixed point);
  any other equation (``custom_jvp``/``custom_vjp`` included, whose derivative
  rules need not follow their primal data flow): every output depends on every
  input."""
  n_out = len(eqn.outvars)
  branches = _jax_compat.cond_branches(eqn)
  if branches is not None:
    outs = [t_in[0]] * n_out  # the branch index affects every output
    for j, b in enumerate(branches):
      outs = [a | c for a, c in zip(outs, _taint(b, t_in[1:], captured, here + (-1 - j,)))]
    return outs
  parts = _jax_compat.while_parts(eqn)
  if parts is not None:
    cond, body, nc, nb = parts
    cconsts, bconsts, carry = t_in[:nc], t_in[nc:nc + nb], t_in[nc + nb:]
    while True:
      pred = _union(_taint(cond, cconsts + carry, captured, here + (-1,)))
      out = _taint(body, bconsts + carry, captured, here + (-2,))
      new = [a | b | pred for a, b in zip(carry, out)]
      if new == carry:
        return carry
      carry = new
  return [_union(t_in)] * n_out


def _union(taints: list[int]) -> int:
  t = 0
  for x in taints:
    t |= x
  return t
