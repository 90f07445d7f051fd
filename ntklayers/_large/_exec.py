"""The compiled programs of a blocked kernel, spread over devices with ``shard_map``.

Two programs, both ``shard_map``\\ s over a one-axis mesh ``"d"`` of every
device (of every process when ``jax.distributed`` is initialized):

- :func:`capture_tiles`: the tiles ``[T, b, ...]`` are split over the devices;
  each device captures the factors of its tiles (``lax.map``, one tile at a
  time). Every tile is captured once.
- :func:`contract_round`: one round computes ``D`` blocks, one per device. The
  cached factors are replicated (gathered once); each device picks its pair of
  tiles by index and contracts them. Without a cache (factors too large for the
  budget) each device captures its two tiles first.

Blocks are the library's own capture and contraction (``prepare``,
``capture_with``, ``_contract``) on tiles, so a blocked kernel equals the
unblocked one up to float rounding.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from ntklayers import _core
from ntklayers._core import (Factors, KernelResult, Options, OutputSpec, StaticKwargs,
                             capture_with, collecting_notes, contract_with_spec, prepare,
                             with_kwargs)
from ntklayers._large._independence import InteractingExamplesError


@dataclasses.dataclass(frozen=True)
class Request:
  """Static part of a blocked kernel (a static argument of its programs)."""

  f: Callable
  options: Options
  static: StaticKwargs
  mesh: Mesh
  same: bool  # x2 is x1
  rest: tuple[int, ...] = ()  # the output shape but the batch axis, on the whole batch
  batch: int = dataclasses.field(default=0, compare=False)  # N1, for messages
  tiles_as_samples: bool = False  # capture each tile as one sample (rows not examples)

  def model(self, dynamic: list) -> Callable:
    return with_kwargs(self.f, self.static.merge(dynamic))


def make_mesh() -> Mesh:
  """A one-axis mesh ``"d"`` over every device (all processes)."""
  return Mesh(np.array(jax.devices()), ("d",))


def put(tree: Any, mesh: Mesh, spec: P) -> Any:
  """Host values as global arrays on ``mesh`` (every process passes the same
  values; each contributes its addressable shards)."""
  sharding = NamedSharding(mesh, spec)
  if jax.process_count() == 1:
    return jax.device_put(tree, sharding)

  def one(a):
    a = np.asarray(a)
    return jax.make_array_from_callback(a.shape, sharding, lambda idx: a[idx])

  return jax.tree.map(one, tree)


def _interacting() -> InteractingExamplesError:
  return InteractingExamplesError(
      "ntk_blocked: the model's examples interact (a layer declared coupled, such as "
      "BatchNorm with batch statistics, or independent_samples=False), so the kernel "
      "of a tile pair is not a block of the whole batch's kernel. Compute it unblocked "
      "with ntklayers.ntk_fn, or make the examples independent (e.g. "
      "is_training=False).")


def batch_dependent(req: Request, rest: tuple, tile: Any) -> InteractingExamplesError:
  """The error for a model whose output shape depends on the batch size."""
  b = jax.tree.leaves(tile)[0].shape[0]
  return InteractingExamplesError(
      f"ntk_blocked: the output shape of `f` depends on the batch size: `f` returned "
      f"{[req.batch, *req.rest]} for `x1` ({req.batch} examples) but {[b, *rest]} for a "
      f"tile of {b} examples (`block_size`), so its kernel is not made of blocks. Make "
      f"every output axis but the first independent of the batch size, or compute the "
      f"kernel whole with ntklayers.ntk_fn.")


def _capture_one(req: Request, params: Any, tile: Any, peer: Any, dynamic: list):
  """The factors of one tile (``params`` left out: they are passed to every round)."""
  f = req.model(dynamic)
  xs = (tile,) if peer is None else (tile, peer)
  setup = prepare(f, params, xs, req.options)
  if setup.mode == _core.COUPLED:
    raise _interacting()
  if tuple(setup.out_rest) != req.rest:
    raise batch_dependent(req, setup.out_rest, tile)
  if req.tiles_as_samples:  # exact when tiles are independent (checked or promised)
    c = capture_with(dataclasses.replace(setup, mode=_core.COUPLED, check_layers=False),
                     params, tile)
    return dataclasses.replace(c, params=None, verified=None), jnp.asarray(True)
  c = capture_with(setup, params, tile)
  # NaN or inf factors fail the row checks; they are not interaction: the kernel
  # carries them and warns.
  ok = c.verified | ~_finite((c.layers, c.fallback_jacobians))
  return dataclasses.replace(c, params=None, verified=None), ok


def _finite(tree: Any) -> jax.Array:
  leaves = [jnp.all(jnp.isfinite(a)) for a in jax.tree.leaves(tree)
            if jnp.issubdtype(a.dtype, jnp.inexact)]
  return jnp.all(jnp.stack(leaves)) if leaves else jnp.asarray(True)


def _with_model(c: Factors, params: Any, f: Callable) -> Factors:
  """Cached factors made whole again: the parameters and the current model."""
  meta = dataclasses.replace(c.meta, f=f)
  return dataclasses.replace(c, params=params, verified=True, meta=meta)


def capture_tiles(req: Request, params: Any, tiles: Any, peer: Any, dynamic: list):
  """``KernelResult((factors [T, ...], verified [T]), ok, notes)`` of the tiles
  ``[T, b, ...]`` (``T`` a multiple of the device count, sharded over them)."""
  with collecting_notes() as notes:
    def body(params, local, peer, dynamic):
      return lax.map(lambda t: _capture_one(req, params, t, peer, dynamic), local)

    shard = _core.shard_map(body, req.mesh, in_specs=(P(), P("d"), P(), P()),
                                  out_specs=P("d"))
    factors, verified = shard(params, tiles, peer, dynamic)
  return KernelResult((factors, verified), verified.all(), tuple(notes))


capture_tiles_jit = jax.jit(capture_tiles, static_argnums=0)


def contract_round(req: Request, diagonal: bool, cached: bool, params: Any, side1: Any,
                   side2: Any, peer: Any, index1: jax.Array, index2: jax.Array,
                   dynamic: list):
  """``KernelResult((blocks [D, ...], finite [D]), ok [D], notes)``: block ``k``
  is the kernel of tile ``index1[k]`` of side 1 and tile ``index2[k]`` of side 2;
  ``ok`` says that the row checks of its captures passed (always, with cached
  factors: those were checked when captured), ``finite`` that it has no NaN or inf.

  ``side1``/``side2`` are cached factor stacks (``cached``) or input tiles
  ``[T, b, ...]``; ``side2`` is ``None`` when ``x2`` is ``x1``. ``diagonal``
  rounds contract a tile with itself (the symmetric product) when ``req.same``.
  (Mirror blocks are transposed on the host while the next round runs: on the
  device XLA:CPU's transpose doubled the time of a ``[1024, 1024]`` block.)
  """
  sym = diagonal and req.same
  with collecting_notes() as notes:
    def body(params, s1, s2, peer, i, j, dynamic):
      f = req.model(dynamic)
      s2 = s1 if s2 is None else s2

      def pick(stack, k):
        return jax.tree.map(lambda a: a[k[0]], stack)

      if cached:
        c1 = pick(s1, i)
        c2 = c1 if sym else pick(s2, j)
        ok = jnp.asarray(True)
      else:
        c1, ok = _capture_one(req, params, pick(s1, i), peer, dynamic)
        if sym:
          c2 = c1
        else:
          c2, ok2 = _capture_one(req, params, pick(s2, j), None if req.same else
                                 pick(s1, i), dynamic)
          ok = ok & ok2
      c1, c2 = _with_model(c1, params, f), _with_model(c2, params, f)
      o = req.options
      spec = OutputSpec.create(c1.out_shape, c2.out_shape, o.trace_axes,
                               o.diagonal_axes, o.precision)
      k = contract_with_spec(spec, c1, c2, sym, False)
      return k[None], jnp.all(jnp.isfinite(k))[None], ok[None]

    shard = _core.shard_map(
        body, req.mesh, in_specs=(P(), P(), P(), P(), P("d"), P("d"), P()),
        out_specs=(P("d"), P("d"), P("d")))
    blocks, finite, ok = shard(params, side1, side2, peer, index1, index2, dynamic)
  return KernelResult((blocks, finite), ok, tuple(notes))


contract_round_jit = jax.jit(contract_round, static_argnums=(0, 1, 2))


def compiled(fn, req: Request, statics: tuple, *args: Any):
  """``(compiled program, its peak bytes per device)`` from XLA's memory analysis
  (arguments not counted: they are accounted for separately)."""
  exe = fn.lower(req, *statics, *args).compile()
  stats = exe.memory_analysis()
  temp = 0 if stats is None else int(stats.temp_size_in_bytes + stats.output_size_in_bytes)
  return exe, temp
