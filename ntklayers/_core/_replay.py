"""Replay: re-evaluate the traced model to capture every layer's factors at once.

The jaxpr found by discovery is evaluated equation by equation with two changes
at each captured tag: a zero perturbation is added to the layer's output (so the
VJP with respect to the perturbations gives the output cotangents) and the
primal is returned. A tag inside ``scan`` bodies gets one perturbation and one
primal per step (passed as extra ``xs`` and returned as extra ``ys`` of a
re-created ``lax.scan``); ``remat`` bodies are re-created with
``jax.checkpoint`` and ``jit`` bodies are inlined. Everything else is bound as
traced, so the replay computes exactly what the model computes.

:func:`capture_cotangents` takes one VJP of the replay and ``vmap``-s it over a
basis of output cotangents. Row ``m`` of a layer is taken to belong to example
``m`` only when proven (:func:`rows_proven`) or verified: in ``"checked"`` mode
one more, random cotangent ``r`` rides along in the same ``vmap`` and each
layer cotangent must equal ``sum_o r[m, o] g[o, m]``.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from ntklayers._core import _jax_compat
from ntklayers._core import _rowproof
from ntklayers._core._discovery import CallRecord, Path, Traced
from ntklayers._core._session import TAG

# Modes of a capture: rows are examples (asserted by the user), rows are examples
# if a random check in the same VJP confirms it, or the batch is one sample.
INDEPENDENT, CHECKED, COUPLED = "independent", "checked", "coupled"
_CHECK_SEED = 20240607


def replay(traced: Traced, params: Any, x: Any, perts: dict[Path, jax.Array]):
  """Evaluates the traced model with ``perts`` added at the tags they name.

  Returns ``(out, primals)``: the model output and ``{path: primal}`` with the
  per-step primals of each perturbed tag stacked along its loops ``[*loops, ...]``.
  """
  args = jax.tree.leaves(params) + jax.tree.leaves(x)
  closed = traced.jaxpr
  prefixes = frozenset(p[:i] for p in perts for i in range(1, len(p)))
  recognized = {r.path: r.recognized for r in traced.records if r.recognized is not None}
  sources = {d.source: path for path, d in recognized.items() if d.source is not None}
  outs, primals = _eval(closed.jaxpr, list(closed.consts), args, (), perts,
                        _Where(prefixes, recognized, sources))
  return outs[0], primals


class _Where:
  """What the replay needs to know about the program: the containers of perturbed
  calls (``prefixes``), the recognized equations (path -> descriptor) and, for
  calls fused with their bias, where their primal is read (product's path ->
  the call's path, the ``add``'s)."""

  def __init__(self, prefixes: frozenset, recognized: dict, sources: dict):
    self.prefixes, self.recognized, self.sources = prefixes, recognized, sources


def _eval(jaxpr, consts, args, path, perts, where):
  env: dict[Any, Any] = {}
  for v, a in zip(jaxpr.constvars, consts):
    env[v] = a
  for v, a in zip(jaxpr.invars, args):
    env[v] = a

  def read(v):
    return v.val if isinstance(v, _jax_compat.Literal) else env[v]

  primals: dict[Path, Any] = {}
  for k, eqn in enumerate(jaxpr.eqns):
    here = path + (k,)
    invals = [read(v) for v in eqn.invars]
    name = eqn.primitive.name
    if eqn.primitive is TAG:
      outs = [invals[0]]
      if here in perts:
        outs = [invals[0] + perts[here]]
        primals[here] = invals[1]
    elif here in perts:  # a recognized equation: perturbed in its own layout
      view = where.recognized[here]
      outs = _jax_compat.eval_eqn(eqn, invals)
      outs = [outs[0] + view.to_eqn(perts[here]).astype(outs[0].dtype)]
      if view.source is None:
        primals[here] = view.primal(invals, read)
    elif where.sources.get(here) in perts:  # the product of a call fused with its bias
      outs = _jax_compat.eval_eqn(eqn, invals)
      call = where.sources[here]
      primals[call] = where.recognized[call].primal(invals, read)
    elif here not in where.prefixes:
      outs = _jax_compat.eval_eqn(eqn, invals)
    else:
      inner = {p: a for p, a in perts.items() if p[:len(here)] == here}
      body, body_consts = _jax_compat.body(eqn)
      if name == _jax_compat.SCAN:
        outs, found = _scan(eqn, body, body_consts, invals, here, inner, where)
      elif name in _jax_compat.REMAT:
        def run(args, inner, body=body, body_consts=body_consts, here=here):
          return _eval(body, body_consts, list(args), here, inner, where)
        outs, found = jax.checkpoint(run, **_jax_compat.remat_params(eqn))(
            tuple(invals), inner)
      else:  # a call (jit): inlined
        outs, found = _eval(body, body_consts, invals, here, inner, where)
      primals.update(found)
    for v, val in zip(eqn.outvars, outs):
      if not _jax_compat.is_drop(v):
        env[v] = val
  return [read(v) for v in jaxpr.outvars], primals


def _scan(eqn, body, body_consts, invals, here, inner, where):
  sp = _jax_compat.scan_params(eqn)
  nc, ncar = sp["num_consts"], sp["num_carry"]
  consts, init, xs = invals[:nc], invals[nc:nc + ncar], invals[nc + ncar:]

  def step(carry, slices):
    x_slice, p_slice = slices
    outs, found = _eval(body, body_consts, consts + list(carry) + list(x_slice), here,
                        p_slice, where)
    return tuple(outs[:ncar]), (tuple(outs[ncar:]), found)

  carry, (ys, found) = lax.scan(step, tuple(init), (tuple(xs), inner),
                                length=sp["length"], reverse=sp["reverse"],
                                unroll=sp["unroll"])
  return list(carry) + list(ys), found


# ---------------------------------------------------------------- checks ---


def check_tolerance(dtype: Any) -> float:
  """Relative tolerance of the alignment check: ``sqrt(eps)`` of ``dtype``."""
  return float(jnp.finfo(dtype).eps) ** 0.5


def check_cotangent(out_shape: tuple[int, ...], dtype: Any) -> jax.Array:
  """The fixed random output cotangent ``r`` ``[N, *rest]`` of the checks.

  Drawn with NumPy at trace time and embedded as a constant: XLA would spend
  seconds constant-folding ``jax.random`` on a constant key.
  """
  r = np.random.default_rng(_CHECK_SEED).standard_normal(out_shape)
  return jnp.asarray(r.astype(np.dtype(dtype)))


def agree(actual: jax.Array, predicted: jax.Array, tol: float) -> jax.Array:
  """``max|actual - predicted| <= tol * max(max|actual|, max|predicted|)``; NaN fails."""
  scale = jnp.maximum(jnp.max(jnp.abs(actual)), jnp.max(jnp.abs(predicted)))
  return jnp.max(jnp.abs(actual - predicted)) <= tol * scale


def _zero_perts(records: list[CallRecord]) -> dict[Path, jax.Array]:
  return {r.path: jnp.zeros(r.loops + r.out[0], r.out[1]) for r in records}


def rows_proven(traced: Traced, params: Any, x: Any, records: list[CallRecord]) -> bool:
  """Whether the replay provably keeps rows apart: row ``n`` of the output is the
  same function of row ``n`` of ``x`` and of every captured layer's output
  perturbation (a static analysis of the traced program, ``_rowproof``; ``False``
  when it cannot tell, e.g. for layers inside loops)."""
  if any(r.loops for r in records):
    return False
  perts = {r.path: jax.ShapeDtypeStruct(r.out[0], r.out[1]) for r in records}

  def fwd(batched, params):
    perts, x = batched
    return replay(traced, params, x, perts)[0]

  return _rowproof.rows_are_examples(fwd, (perts, x), params)


def capture_cotangents(traced: Traced, params: Any, x: Any, records: list[CallRecord],
                       mode: str, check: bool = True):
  """Returns ``{path: (primal, cotangent)}`` of the captured calls and a check flag.

  Primals are ``[*loops, M, ...]``; cotangents ``[B, *loops, M, ...]`` with
  ``B = O`` (one-hot output columns over all examples at once) or, in
  ``"coupled"`` mode, ``B = N * O``. In ``"checked"`` mode (and with ``check``)
  the flag says whether every layer row was confirmed to belong to its example;
  it is ``True`` otherwise.
  """
  check = check and mode == CHECKED
  out_shape, out_dtype = traced.out_shape, traced.out_dtype
  n = out_shape[0]

  def fwd(perts):
    return replay(traced, params, x, perts)

  _, vjp_fn, primals = jax.vjp(fwd, _zero_perts(records), has_aux=True)
  o = math.prod(out_shape[1:])
  if mode == COUPLED:
    basis = jnp.eye(n * o, dtype=out_dtype).reshape((n * o, *out_shape))
  else:
    eye = jnp.eye(o, dtype=out_dtype).reshape((o, 1, *out_shape[1:]))
    basis = jnp.broadcast_to(eye, (o, *out_shape))
  if check:
    r = check_cotangent(out_shape, out_dtype)
    basis = jnp.concatenate([basis, r[None]])
  (cots,) = jax.vmap(vjp_fn)(basis)
  ok = jnp.asarray(True)
  if check:
    tol = check_tolerance(out_dtype)
    r = r.reshape(n, o)
    for rec in records:
      c = cots[rec.path].reshape((o + 1, rec.steps, n, -1))
      pred = jnp.einsum("no,olnk->lnk", r, c[:o], precision="highest")
      ok = ok & agree(c[o], pred, tol)
    cots = {p: c[:o] for p, c in cots.items()}
  return {p: (primals[p], cots[p]) for p in cots}, ok
