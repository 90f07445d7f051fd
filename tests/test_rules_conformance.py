"""Conformance of every registered structure rule to its examples (``EXAMPLES`` of
``test_rules.py``, after optax's ``contrib/_common_test.py``). For every example:

* ``rule.canonicalize`` returns factors in the op's documented layout
  (``OP_LAYOUTS``), whose sizes agree with the parameters;
* the per-example Jacobian ``op.jacobian`` built from the canonical factors equals
  ``jax.jacrev`` of ``apply`` (float64, ``reference.TOL64``), up to the order of
  the parameter axis and to columns that are identically zero (neither changes
  any kernel); weight columns match the weight, offset columns the offset, and
  the Jacobian of both roles is the weight's followed by the offset's;
* both with per-example factors and with the batch folded into the sharing axis
  (``Nx = 1``, as for samples that interact);
* when the op has an activation route, ``op.activation_kernel`` equals the
  kernel of the Jacobian route on several output layouts (traced and diagonal
  axes, the batch axis included);
* ``rule.unsupported`` accepts the example and ``rule.flops`` is positive.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from reference import TOL64

import ntklayers.flax  # noqa: F401  (every adapter imported: every rule registered)
import ntklayers.haiku  # noqa: F401
from ntklayers._core import _rule
from ntklayers._core._axes import OutputSpec
from ntklayers._core._ops import jacobian_kernel
from test_rules import M1, M2, OP_LAYOUTS, Example, _cases


# ------------------------------------------------------------- helpers ---


def _data(ex: Example, seed: int = 0):
  rng = np.random.default_rng(seed)
  params = ex.params(rng)
  return params, ex.primal(M1, rng), ex.primal(M2, rng)


def _rest(ex: Example, params, x) -> tuple[int, ...]:
  return jax.eval_shape(ex.apply, params, x).shape[1:]


def _roles(op, params) -> list[tuple[bool, bool]]:
  """``(with_weight, with_offset)`` combinations the example's parameters allow
  (an offset-only rule such as ``bias`` has examples without the weight role)."""
  assert set(params) <= set(op.roles) and params, (op.roles, sorted(params))
  if op.roles[0] not in params:
    return [(False, True)]
  if op.roles[1] in params:
    return [(True, False), (False, True), (True, True)]
  return [(True, False)]


def _cotangent_basis(m: int, rest: tuple[int, ...], dtype, shared: bool):
  """Output cotangents ``[B, m, *rest]``: one slice per output of every row
  (``shared``: per (row, output) pair, as for a batch that is one sample)."""
  o = math.prod(rest)
  if not shared:  # slice o seeds output o of every row
    return jnp.broadcast_to(jnp.eye(o, dtype=dtype).reshape(o, 1, *rest), (o, m, *rest))
  return jnp.eye(m * o, dtype=dtype).reshape(m * o, m, *rest)  # slice (n, o): row n only


def canonical(rule, cfg, x, rest, dtype, shared: bool):
  """``(x_c, g_c)`` as the op consumes them: ``x_c [Nx, T, ...]``, ``g_c [N, O, T, ...]``
  (``shared``: ``Nx = 1``, rows folded into ``T``, as ``_capture._canonical`` does)."""
  m, o = x.shape[0], math.prod(rest)
  xc, gc = rule.canonicalize(cfg, x, _cotangent_basis(m, rest, dtype, shared))
  if not shared:
    return xc, jnp.swapaxes(gc, 0, 1)
  t = xc.shape[1]
  return (xc.reshape((1, m * t) + xc.shape[2:]),
          gc.reshape((m, o, m * t) + gc.shape[3:]))


def reference_jacobians(ex: Example, params, x) -> dict[str, np.ndarray]:
  """``{role: [M, O, P_role]}``: ``jax.jacrev`` of ``apply`` per example."""
  jac = jax.jit(jax.jacrev(ex.apply))(params, x)
  m = x.shape[0]
  return {k: np.asarray(v).reshape(m, -1, params[k].size) for k, v in jac.items()}


def assert_same_columns(j_op: np.ndarray, j_ref: np.ndarray, what: str) -> None:
  """``j_op [M, O, P]`` equals ``j_ref [M, O, P']`` up to the order of the last axis
  and to columns that are identically zero (to ``TOL64`` relative)."""
  assert j_op.shape[:2] == j_ref.shape[:2], (what, j_op.shape, j_ref.shape)
  a = np.asarray(j_op, np.float64).reshape(-1, j_op.shape[-1]).T
  b = np.asarray(j_ref, np.float64).reshape(-1, j_ref.shape[-1]).T
  scale = max(np.max(np.abs(b)), 1e-300)
  tol = TOL64 * scale
  a = a[np.max(np.abs(a), axis=1) > tol]
  b = b[np.max(np.abs(b), axis=1) > tol]
  assert len(a) == len(b), (f"{what}: {len(a)} nonzero parameter columns from the op, "
                            f"{len(b)} from jax.jacrev")
  free = np.ones(len(b), bool)
  for k, col in enumerate(a):
    dist = np.max(np.abs(b - col), axis=1)
    dist[~free] = np.inf
    best = int(np.argmin(dist))
    assert dist[best] <= tol, (f"{what}: column {k} of the op's Jacobian matches no "
                               f"column of jax.jacrev (closest: {dist[best] / scale:.3e})")
    free[best] = False


# --------------------------------------------------------------- tests ---


@pytest.mark.parametrize("kind, ex", _cases())
def test_canonical_layout(kind, ex):
  rule = _rule.get_rule(kind)
  x_letters, g_letters, x_kind, check_sizes = OP_LAYOUTS[rule.op.name]
  params, x, _ = _data(ex)
  rest = _rest(ex, params, x)
  o = math.prod(rest)
  xc, gc = jax.jit(lambda x: rule.canonicalize(
      ex.config, x, _cotangent_basis(M1, rest, jnp.float64, False)))(x)
  assert xc.ndim == len(x_letters) and gc.ndim == len(g_letters), (xc.shape, gc.shape)
  assert jnp.dtype(xc.dtype).kind == x_kind, xc.dtype
  assert gc.dtype == jnp.float64
  sizes: dict[str, int] = {}
  for letters, shape in ((x_letters, xc.shape), (g_letters, gc.shape)):
    for c, n in zip(letters, shape):
      assert sizes.setdefault(c, n) == n, (f"axis {c}: {sizes[c]} in x_c, {n} in g_c "
                                           f"({xc.shape}, {gc.shape})")
  assert sizes["M"] == M1 and sizes["B"] == o, sizes
  check_sizes(sizes, params)


@pytest.mark.parametrize("shared", [False, True], ids=["per_example", "shared"])
@pytest.mark.parametrize("kind, ex", _cases())
def test_jacobian_matches_jacrev(kind, ex, shared):
  rule = _rule.get_rule(kind)
  op = rule.op
  params, x, _ = _data(ex)
  rest = _rest(ex, params, x)
  combos = _roles(op, params)

  @jax.jit
  def op_jacobians(x):
    xc, gc = canonical(rule, ex.config, x, rest, jnp.float64, shared)
    return [op.jacobian(xc, gc, w, b, "highest") for w, b in combos]

  got = dict(zip(combos, op_jacobians(x)))
  ref = reference_jacobians(ex, params, x)
  weight, offset = op.roles
  if (True, False) in got:
    assert_same_columns(got[True, False], ref[weight], f"{ex.name} {weight}")
  if (False, True) in got:
    assert_same_columns(got[False, True], ref[offset], f"{ex.name} {offset}")
  if (True, True) in got:
    np.testing.assert_array_equal(
        got[True, True], np.concatenate([got[True, False], got[False, True]], axis=-1),
        err_msg="the Jacobian of both roles is the weight's, then the offset's")


SPECS = {  # (trace_axes, diagonal_axes, same batch on both sides)
    "plain": ((), (), False),
    "trace_last": ((-1,), (), False),
    "diagonal_batch": ((), (0,), True),
    "trace_batch": ((0,), (), True),
}


@pytest.mark.parametrize("kind, ex", _cases())
def test_activation_kernel_matches_jacobian_kernel(kind, ex):
  rule = _rule.get_rule(kind)
  op = rule.op
  if op.activation_kernel is None:
    pytest.skip(f"op {op.name!r} has only the Jacobian route")
  params, x1, x2 = _data(ex)
  rest = _rest(ex, params, x1)
  combos = _roles(op, params)

  @jax.jit
  def both_routes(x1, x2):
    out = {}
    for shared in (False, True):
      for spec_name, (trace, diag, same) in SPECS.items():
        xb = x1 if same else x2
        spec = OutputSpec.create((x1.shape[0], *rest), (xb.shape[0], *rest), trace, diag)
        f1 = canonical(rule, ex.config, x1, rest, jnp.float64, shared)
        f2 = canonical(rule, ex.config, xb, rest, jnp.float64, shared)
        for w, b in combos:
          act = op.activation_kernel(spec, *f1, *f2, w, b)
          jac = jacobian_kernel(spec, op.jacobian(*f1, w, b, "highest"),
                                op.jacobian(*f2, w, b, "highest"))
          out[shared, spec_name, w, b] = (act, jac)
    return out

  for key, (act, jac) in both_routes(x1, x2).items():
    assert act.shape == jac.shape, (key, act.shape, jac.shape)
    err = float(np.max(np.abs(np.asarray(act) - np.asarray(jac))) / np.max(np.abs(jac)))
    assert err <= TOL64, f"{ex.name} {key}: activation vs Jacobian route, rel err {err:.3e}"


@pytest.mark.parametrize("kind, ex", _cases())
def test_unsupported_and_flops(kind, ex):
  rule = _rule.get_rule(kind)
  params, x, _ = _data(ex)
  y_shape = jax.eval_shape(ex.apply, params, x).shape
  assert rule.unsupported(ex.config, tuple(x.shape)) is None
  flops = rule.flops(ex.config, tuple(x.shape), tuple(y_shape))
  assert np.isfinite(flops) and flops > 0, flops
  assert rule.roles == rule.op.roles
