"""The ``embed`` rule and its op, ``GATHER``: embedding lookups (a table read by id).

An embedding layer reads row ``ids[t]`` of its table ``E [V, D]`` at every
position ``t`` of an example: ``y[t, d] = E[ids[t], d]``. Its per-example
Jacobian scatters the output cotangents into the rows of the ids, so its kernel
is a *count-matching Gram of token ids*::

    K[n1, o1, n2, o2] = sum_{t, s} [ids1[n1, t] == ids2[n2, s]] g1[n1, o1, t] . g2[n2, o2, s]

On the activation route the match matrix ``[N1, T, N2, S]`` is built by comparing
ids: nothing vocabulary-sized (no one-hot ``[..., T, V]``) is ever formed. The
Jacobian route (a scatter-add into ``[N, O, V' * D]``) is taken only when the
cost model says it is cheaper (long sequences over a small vocabulary).

Canonical factors (the rule's config is :class:`EmbedConfig`):

* ``x: [Nx, T, K]`` (bool): the id of each position in binary, bit ``k`` at
  ``[..., k]``, ``K = max(1, bit_length(V - 1))``, after the framework's handling
  of out-of-range ids. The vocabulary bound ``V' = 2**K <= 2 V`` is thereby static
  in the factor *shapes*, which is all the cost model sees; the bits cost ``K``
  bytes per position, and the Jacobian route sizes its rows by ``V'`` (rows of
  ids ``>= V`` stay zero).
* ``g: [N, O, T, D]``: output cotangents, zero at positions that read no row
  (ids out of range, see ``OUT_OF_RANGE``).

Roles: ``("embeddings", "_no_offset")``. A table has no offset: the second role
is a placeholder that no adapter reports (the op's functions refuse it).

``Nx`` is ``N`` or ``1`` (samples that interact: the batch folded into ``T``), as
for the other ops. Every id-reading position of every example is one ``t``
(``ids [M, A, B]`` gives ``T = A * B``), and calls that share a table (weight
sharing) contribute cross terms like any other op.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax.numpy as jnp

from ntklayers._core._axes import OutputSpec
from ntklayers._core._ops import Op, _batch_x, _unflatten
from ntklayers._core._rule import Rule, register_rule

# Which row an id outside ``[0, V)`` reads, as JAX differentiates the lookup:
#  "wrap"    ``E[ids]`` (hk.Embed ARRAY_INDEX) and ``jnp.take(E, ids, axis=0)``
#            (flax Embed): ids in [-V, 0) wrap around; the others read no row
#            (their forward value is a clamped row or NaN, but JAX's gradient of
#            the gather drops them, and so does the kernel).
#  "one_hot" ``one_hot(ids, V) @ E`` (hk.Embed ONE_HOT): only ids in [0, V) read
#            a row.
#  "clip"    every id reads a row, clamped into [0, V) after wrapping (e.g. a
#            table of one row broadcast to every position: flax's
#            ``num_embeddings == 1``).
OUT_OF_RANGE = ("wrap", "one_hot", "clip")


class EmbedConfig(NamedTuple):
  """Static config of an ``embed`` call: ``y[..., :] = E[ids[...], :]``, ``E [V, D]``.

  A ``NamedTuple``, so an adapter may pass the equal plain tuple
  ``(vocab_size, out_of_range)`` without importing anything from the core.

  Attributes:
    vocab_size: ``V``, the number of rows of the table.
    out_of_range: ``"wrap"``, ``"one_hot"`` or ``"clip"``: which row an id
      outside ``[0, V)`` reads (see ``OUT_OF_RANGE`` above).
  """

  vocab_size: int
  out_of_range: str = "wrap"


def id_bits(vocab_size: int) -> int:
  """``K``: bits of the canonical ids of a vocabulary of ``vocab_size`` rows."""
  return max(1, (int(vocab_size) - 1).bit_length())


def _config(cfg) -> EmbedConfig:
  return cfg if isinstance(cfg, EmbedConfig) else EmbedConfig(*cfg)


def _read_rows(cfg: EmbedConfig, ids: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
  """``(rows, valid)``: the table row each id reads, and whether it reads one."""
  v = cfg.vocab_size
  if jnp.dtype(ids.dtype).itemsize < 4:
    ids = ids.astype(jnp.int32)  # room for ids + V
  if jnp.issubdtype(ids.dtype, jnp.signedinteger) and cfg.out_of_range != "one_hot":
    ids = jnp.where(ids < 0, ids + v, ids)
  if cfg.out_of_range == "clip":
    rows = jnp.clip(ids, 0, v - 1)
    return rows, jnp.ones(ids.shape, bool)
  valid = (ids >= 0) & (ids < v)
  return jnp.where(valid, ids, 0), valid


def encode_ids(rows: jnp.ndarray, k: int) -> jnp.ndarray:
  """Row indices ``[...]`` in ``[0, 2**k)`` -> bits ``[..., k]`` (bool)."""
  shifts = jnp.arange(k, dtype=jnp.uint32).reshape((1,) * rows.ndim + (k,))
  return ((rows.astype(jnp.uint32)[..., None] >> shifts) & jnp.uint32(1)).astype(bool)


def decode_ids(bits: jnp.ndarray) -> jnp.ndarray:
  """Bits ``[..., K]`` -> row indices ``[...]`` (``uint32``)."""
  shifts = jnp.arange(bits.shape[-1], dtype=jnp.uint32).reshape(
      (1,) * (bits.ndim - 1) + bits.shape[-1:])
  return jnp.sum(bits.astype(jnp.uint32) << shifts, axis=-1, dtype=jnp.uint32)


def _no_offset(with_offset: bool) -> None:
  if with_offset:
    raise ValueError("An embedding table has no offset parameter (op 'gather').")


# ------------------------------------------------------------- the op ---


def gather_jacobian(x: jnp.ndarray, g: jnp.ndarray, with_table: bool, with_offset: bool,
                    precision: str = "highest") -> jnp.ndarray:
  """Per-example Jacobian ``[N, O, V' * D]`` (a scatter-add of ``g`` into id rows)."""
  del precision  # additions only
  _no_offset(with_offset)
  if not with_table:
    raise ValueError("The gather op's Jacobian needs its table role.")
  n, o, _, d = g.shape
  v = 2 ** x.shape[-1]
  rows = decode_ids(x).astype(jnp.int32)
  if x.shape[0] == n:  # per example: rows [N, T], g -> [N, T, O, D]
    ex = jnp.arange(n, dtype=jnp.int32)[:, None]
    j = jnp.zeros((n, v, o, d), g.dtype).at[ex, rows].add(jnp.moveaxis(g, 2, 1))
  else:  # one primal shared by every example: rows [T], g -> [T, N, O, D]
    j = jnp.zeros((v, n, o, d), g.dtype).at[rows[0]].add(jnp.moveaxis(g, 2, 0))
    j = jnp.moveaxis(j, 0, 1)
  return jnp.swapaxes(j, 1, 2).reshape(n, o, v * d)


def _expand(a: jnp.ndarray, letters: str, target: str) -> jnp.ndarray:
  """Inserts unit axes so that ``a`` (axes ``letters``, in ``target`` order)
  broadcasts against axes ``target``."""
  return a.reshape(tuple(a.shape[letters.index(c)] if c in letters else 1 for c in target))


def gather_activation_kernel(spec: OutputSpec, x1: jnp.ndarray, g1: jnp.ndarray,
                             x2: jnp.ndarray, g2: jnp.ndarray, with_table: bool,
                             with_offset: bool) -> jnp.ndarray:
  """``sum_{t,s} [id1[t] == id2[s]] g1[o, t] . g2[q, s]``: ids compared, never one-hot."""
  _no_offset(with_offset)
  out_rest = spec.shape1[1:]
  s1, s2, res = spec.letters()
  g1 = _unflatten(g1, out_rest)
  g2 = _unflatten(g2, out_rest)
  r1, l1 = _batch_x(decode_ids(x1), g1.shape[0], s1[0], "t")
  r2, l2 = _batch_x(decode_ids(x2), g2.shape[0], s2[0], "s")
  match_letters = "".join(dict.fromkeys(l1[:-1] + l2[:-1])) + "ts"
  match = (_expand(r1, l1, match_letters) == _expand(r2, l2, match_letters)).astype(g1.dtype)
  return jnp.einsum(f"{match_letters},{s1}td,{s2}sd->{res}", match, g1, g2,
                    precision=spec.precision, optimize="optimal")


def gather_costs(spec: OutputSpec, calls1: list, calls2: list,
                 same: bool) -> tuple[float, float]:
  """FLOP estimates ``(activation, jacobian)`` from the factor shapes.

  ``calls``: ``[(x_shape, g_shape), ...]`` with ``x: [Nx, T, K]``, ``g: [N, O, T, D]``.
  The Jacobian route pays for its ``[N, O, V' * D]`` buffers (``V' = 2**K``) as
  well as for the scatter and the contraction over ``V' * D``.
  """
  n1, n2 = spec.shape1[0], spec.shape2[0]
  nn = n1 if 0 in spec.trace_axes + spec.diagonal_axes else n1 * n2
  pairs = spec.output_pairs
  act = 0.0
  for _, gs1 in calls1:
    for _, gs2 in calls2:
      act += nn * gs1[2] * gs2[2] * (1 + pairs * gs1[3] + pairs)
  rows = 2.0 ** calls1[0][0][-1]
  d = calls1[0][1][-1]

  def form(calls):
    return sum(g[0] * g[1] * (rows * d + g[2] * d) for _, g in calls)

  jac = form(calls1) + (0 if same else form(calls2)) + nn * pairs * rows * d
  return float(act), float(jac)


GATHER = Op("gather", ("embeddings", "_no_offset"), gather_jacobian,
            gather_activation_kernel, gather_costs)


# ------------------------------------------------------------ the rule ---


def _embed_canonicalize(cfg, x, g):
  cfg = _config(cfg)
  m = x.shape[0]
  rows, valid = _read_rows(cfg, x.reshape(m, -1))
  gc = g.reshape(g.shape[0], m, rows.shape[1], g.shape[-1])
  gc = jnp.where(valid[None, :, :, None], gc, jnp.zeros((), gc.dtype))
  return encode_ids(rows, id_bits(cfg.vocab_size)), gc


def _embed_unsupported(cfg, x_shape) -> str | None:
  try:
    cfg = _config(cfg)
  except TypeError:
    return f"its embed config {cfg!r} is not (vocab_size, out_of_range)"
  if cfg.out_of_range not in OUT_OF_RANGE:
    return f"its out-of-range id handling {cfg.out_of_range!r} is not one of {OUT_OF_RANGE}"
  if not 1 <= int(cfg.vocab_size) <= 2 ** 32:
    return f"its vocabulary size {cfg.vocab_size} is not in [1, 2**32]"
  if len(x_shape) < 1:
    return f"its ids of shape {x_shape} have no batch axis"
  return None


def _embed_flops(cfg, x_shape, y_shape) -> float:
  del cfg, x_shape
  return float(math.prod(y_shape[1:]))  # one copy per output element


register_rule("embed", Rule(GATHER, _embed_canonicalize, _embed_unsupported, _embed_flops,
                            vmappable=True))  # ids: positions trail the rows
