"""The grammar of the differential fuzzers' models (``test_fuzz.py``, issue #6) and
the Haiku models it describes.

``hypothesis`` draws a :class:`Spec` (a readable dataclass) of a small Haiku model
from :func:`specs`: annotated layers of every kind (``ntklayers.Linear``,
``ntklayers.haiku.Conv1D`` / ``Conv2D``, ``LayerNorm``, ``MultiHeadAttention``) and
plain ones (``hk.Linear``, ``hk.Conv1D`` / ``Conv2D``, ``hk.LayerNorm``,
``hk.MultiHeadAttention``, ``hk.Embed``, ``hk.BatchNorm`` in both modes), plain
``jax.numpy`` layers on named parameters (``x @ w + b``, ``lax.conv_general_dilated``,
a LayerNorm's scale and offset by hand, a ``table[ids]`` embedding) and per-example
layers under ``jax.vmap`` as Equinox writes them (a ``[out, in]`` weight, a
convolution of one example), residuals,
weight tying inside annotated layers (one module called twice) and outside them (a
tied decoder, a bias reused as a scale), batch-coupling ops (centering, softmax over
the batch, batch statistics), JAX transforms inside the model (``hk.remat``,
``hk.layer_stack`` with LayerNorms, ``hk.scan`` over a shared layer, ``hk.vmap``),
the batch permuted / reversed / gathered / transposed around a layer, learned
prototypes with as many rows as the batch, outputs of rank 1 to 3, ``trace_axes`` /
``diagonal_axes`` (the batch axis included), ``trainable`` masks, ``layerwise``, and
``x2`` of another batch size (or none).

:func:`build` turns a spec into ``(f, params, x1, x2, mask)`` (float64).
``test_fuzz.py`` re-exports ``Spec``, ``specs`` and ``build`` (``test_fuzz_blocked``
imports them from there).
"""

from __future__ import annotations

import contextlib
import dataclasses

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
from hypothesis import strategies as st

import models
import ntklayers
import ntklayers.haiku as nh

VOCAB = 7

# -------------------------------------------------------------------- spec ---


@dataclasses.dataclass(frozen=True)
class Spec:
  """One fuzz case. ``ops`` are ``(kind, *args)`` tuples applied in order (see
  :func:`_apply_op`); the state is ``[N, F]`` (rank 2) or ``[N, T=3, F]`` (rank 3)."""

  inp: str                      # "vec" [N, 4] | "seq" [N, 3, 4] | "tokens" [N, 3] ints
  ops: tuple[tuple, ...]
  head: tuple                   # ("linear" | "hk_linear", O, squeeze_to_rank_1)
  n1: int
  n2: int | None                # None: x2 = None (x2 = x1)
  trace_axes: tuple[int, ...]
  diagonal_axes: tuple[int, ...]
  # ("all",) | ("no_biases",) | ("freeze_module", i) | ("leaves", bits)
  trainable: tuple
  layerwise: bool


# Ops valid in rank-2 / rank-3 states (every op keeps the rank unless noted).
COMMON_OPS = ("linear", "hk_linear", "act", "residual", "shared_twice", "tied_decoder",
              "bias_scale", "layernorm", "hk_layernorm", "batchnorm", "center",
              "batch_softmax", "batch_stats", "permute", "gather", "prototypes",
              # JAX transforms inside the model (structure tags survive them):
              "remat", "stack", "scan_shared", "vmap_linear",
              # stock layers in plain jax.numpy, per-example layers under jax.vmap:
              "jnp_dense", "jnp_norm", "vmap_dense_t")
RANK2_OPS = COMMON_OPS + ("unflatten",)                          # -> rank 3
RANK3_OPS = COMMON_OPS + ("conv1d", "conv2d", "mha", "transpose", "pool",  # pool -> rank 2
                          "jnp_conv", "vmap_conv")
TOKEN_OPS = ("embed", "jnp_embed")                               # the first op on tokens


@st.composite
def _op(draw, rank: int, n1: int) -> tuple:
  kind = draw(st.sampled_from(RANK2_OPS if rank == 2 else RANK3_OPS))
  width = st.integers(2, 5)
  if kind in ("linear", "hk_linear", "jnp_dense", "vmap_dense_t"):
    return (kind, draw(width), draw(st.booleans()))           # width, with_bias
  if kind == "act":
    return (kind, draw(st.sampled_from(["tanh", "gelu", "sin", "relu"])))
  if kind in ("tied_decoder", "unflatten"):
    return (kind, draw(width))
  if kind in ("layernorm", "hk_layernorm"):
    return (kind, draw(st.booleans()), draw(st.booleans()))   # create_scale, create_offset
  if kind in ("batchnorm", "gather", "mha"):  # is_training / before the layer / plain
    return (kind, draw(st.booleans()))
  if kind == "permute":                       # (how, inverted after the layer)
    return (kind, draw(st.sampled_from(["reverse", "roll", "perm"])), draw(st.booleans()))
  if kind == "prototypes":
    return (kind, n1)                         # K == N1
  if kind == "stack":                         # layers, with a LayerNorm
    return (kind, draw(st.integers(1, 3)), draw(st.booleans()))
  if kind in ("conv1d", "conv2d"):            # (width, kernel size, plain)
    return (kind, draw(width), draw(st.integers(1, 3)), draw(st.booleans()))
  if kind in ("jnp_conv", "vmap_conv"):       # (width, kernel size, dilation)
    return (kind, draw(width), draw(st.integers(1, 3)), draw(st.integers(1, 2)))
  if kind == "jnp_norm":                      # with an offset
    return (kind, draw(st.booleans()))
  return (kind,)


@st.composite
def specs(draw) -> Spec:
  inp = draw(st.sampled_from(["vec", "seq", "tokens"]))
  n1 = draw(st.integers(2, 3))
  rank = 2 if inp == "vec" else 3
  ops = [(draw(st.sampled_from(TOKEN_OPS)),)] if inp == "tokens" else []
  for _ in range(draw(st.integers(1, 4))):
    op = draw(_op(rank, n1))
    ops.append(op)
    rank = {"pool": 2, "unflatten": 3}.get(op[0], rank)
  out = draw(st.integers(1, 3))
  squeeze = out == 1 and rank == 2 and draw(st.booleans())
  head = (draw(st.sampled_from(["linear", "hk_linear"])), out, squeeze)
  out_rank = 1 if squeeze else rank
  roles = draw(st.lists(st.sampled_from(["keep", "keep", "trace", "diag"]),
                        min_size=out_rank, max_size=out_rank))
  trace = tuple(a if draw(st.booleans()) else a - out_rank
                for a, r in enumerate(roles) if r == "trace")
  diag = tuple(a for a, r in enumerate(roles) if r == "diag")
  if roles[0] != "keep":   # the batch axis traced / diagonal: N2 == N1
    n2 = draw(st.sampled_from([None, n1]))
  else:
    n2 = draw(st.sampled_from([None, 1, 2, 4]))
  trainable = draw(st.one_of(
      st.just(("all",)), st.just(("no_biases",)),
      st.tuples(st.just("freeze_module"), st.integers(0, 7)),
      st.tuples(st.just("leaves"), st.tuples(*[st.booleans()] * 8))))
  return Spec(inp, tuple(ops), head, n1, n2, trace, diag, trainable, draw(st.booleans()))


# ------------------------------------------------------------------ models ---


def _perm(n: int, kind: str) -> tuple[np.ndarray, np.ndarray]:
  perm = {"reverse": np.arange(n)[::-1], "roll": np.roll(np.arange(n), 1),
          "perm": np.concatenate([np.arange(1, n, 2), np.arange(0, n, 2)])}[kind]
  return perm, np.argsort(perm)


def _row(v, rank: int):
  """A parameter vector ``[F]`` shaped to broadcast against a rank-``rank`` state."""
  return v.reshape((1,) * (rank - 1) + (-1,))


class _Params(hk.Module):
  """Named parameters for the plain ``jax.numpy`` ops (a module for a unique name)."""

  def __call__(self, dtype, **shapes):
    init = hk.initializers.RandomNormal()
    return {n: hk.get_parameter(n, s, dtype, init=init) for n, s in shapes.items()}


def _conv1d(z, w, b, dilation: int):
  """``[N, T, F] -> [N, T, W]``: a SAME convolution over T with ``w [k, F, W]``."""
  out = jax.lax.conv_general_dilated(z, w, (1,), "SAME", rhs_dilation=(dilation,),
                                     dimension_numbers=("NWC", "WIO", "NWC"))
  return out + b.reshape(1, 1, -1)


def _plain_op(kind: str, args: tuple, h):
  """The plain ``jax.numpy`` ops and the per-example ops under ``jax.vmap``."""
  rank, f, dtype = h.ndim, h.shape[-1], h.dtype
  if kind == "jnp_embed":                             # a table gather
    return _Params()(jnp.float64, table=[VOCAB, 4])["table"][h]
  if kind == "jnp_dense":                             # x @ w + b
    p = _Params()(dtype, w=[f, args[0]], **({"b": [args[0]]} if args[1] else {}))
    return h @ p["w"] + _row(p["b"], rank) if args[1] else h @ p["w"]
  if kind == "jnp_norm":                              # a LayerNorm by hand
    p = _Params()(dtype, scale=[f], offset=[f])
    mean = jnp.mean(h, axis=-1, keepdims=True)
    z = (h - mean) * jax.lax.rsqrt(jnp.mean(jnp.square(h - mean), -1, keepdims=True) + 0.5)
    z = z * _row(p["scale"], rank)
    return z + _row(p["offset"], rank) if args[0] else z
  if kind == "jnp_conv":
    p = _Params()(dtype, w=[args[1], f, args[0]], b=[args[0]])
    return _conv1d(h, p["w"], p["b"], args[2])
  if kind == "vmap_dense_t":                          # eqx.nn.Linear: w [out, in], vmapped
    p = _Params()(dtype, w_t=[args[0], f], **({"b": [args[0]]} if args[1] else {}))

    def linear(z):                                    # one example: [F] or [T, F]
      y = (jax.vmap(lambda t: p["w_t"] @ t)(z) if z.ndim == 2 else p["w_t"] @ z)
      return y + _row(p["b"], z.ndim) if args[1] else y
    return jax.vmap(linear)(h)
  if kind == "vmap_conv":                             # eqx.nn.Conv: one example, x[None]
    p = _Params()(dtype, w=[args[1], f, args[0]], b=[args[0]])
    return jax.vmap(lambda z: _conv1d(z[None], p["w"], p["b"], args[2])[0])(h)
  raise ValueError(kind)


class _Prototypes(hk.Module):
  def __call__(self, k: int, d: int, dtype):
    return hk.get_parameter("protos", [k, d], dtype, init=hk.initializers.RandomNormal())


def _apply_op(op: tuple, h, init: bool = False):
  """Applies ``op`` to the state ``h``; ``init``: hk.BatchNorm in training mode (its
  moving averages are created there)."""
  kind, args = op[0], op[1:]
  rank, f = h.ndim, h.shape[-1]
  n = h.shape[0]
  if kind == "embed":
    return hk.Embed(VOCAB, 4)(h)
  if kind.startswith(("jnp_", "vmap_dense_t", "vmap_conv")):
    return _plain_op(kind, args, h)
  if kind == "linear":
    return ntklayers.Linear(args[0], with_bias=args[1])(h)
  if kind == "hk_linear":
    return hk.Linear(args[0], with_bias=args[1])(h)
  if kind == "act":
    return {"tanh": jnp.tanh, "gelu": jax.nn.gelu, "sin": jnp.sin,
            "relu": jax.nn.relu}[args[0]](h)
  if kind == "residual":
    return h + jnp.tanh(ntklayers.Linear(f)(h))
  if kind == "shared_twice":                          # tying inside an annotated layer
    lin = ntklayers.Linear(f)
    return jnp.tanh(lin(jnp.tanh(lin(h))))
  if kind == "tied_decoder":                          # class 1: tying outside
    enc = ntklayers.Linear(args[0])
    z = jnp.tanh(enc(h))
    return z @ enc.params_dict()[f"{enc.module_name}/w"].T
  if kind == "bias_scale":                            # class 1: a bias reused as a scale
    lin = ntklayers.Linear(f)
    z = jnp.tanh(lin(h))
    return z * _row(lin.params_dict()[f"{lin.module_name}/b"], rank)
  if kind == "layernorm":
    return nh.LayerNorm(-1, create_scale=args[0], create_offset=args[1])(h)
  if kind == "hk_layernorm":
    return hk.LayerNorm(-1, create_scale=args[0], create_offset=args[1])(h)
  if kind == "batchnorm":
    return hk.BatchNorm(True, True, 0.9)(h, is_training=args[0] or init)
  if kind == "center":                                # class 3
    return h - jnp.mean(h, axis=0, keepdims=True)
  if kind == "batch_softmax":
    return jax.nn.softmax(h, axis=0)
  if kind == "batch_stats":
    return h * jax.lax.rsqrt(jnp.mean(jnp.square(h), axis=0, keepdims=True) + 0.5)
  if kind == "permute":                               # class 2 (coupled if not inverted)
    perm, inv = _perm(n, args[0])
    z = ntklayers.Linear(f)(h[perm])
    return z[inv] if args[1] else z
  if kind == "gather":                                # duplicates rows: coupled
    idx = np.minimum(np.arange(n) + 1, n - 1)
    return ntklayers.Linear(f)(h[idx]) if args[0] else ntklayers.Linear(f)(h)[idx]
  if kind == "prototypes":                            # class 2: K == N1 rows
    protos = _Prototypes()(args[0], f, h.dtype)
    lin = ntklayers.Linear(4)
    return jnp.tanh(lin(h)) @ jnp.tanh(lin(protos)).T
  if kind == "unflatten":                             # [N, F] -> [N, 2, W]
    return ntklayers.Linear(2 * args[0])(h).reshape(n, 2, args[0])
  if kind == "conv1d":
    conv = hk.Conv1D if args[2] else nh.Conv1D
    return conv(args[0], args[1])(h)
  if kind == "conv2d":
    conv = hk.Conv2D if args[2] else nh.Conv2D
    return conv(args[0], (args[1], 1))(h[:, :, None, :])[:, :, 0, :]
  if kind == "mha":
    mha = hk.MultiHeadAttention if args[0] else nh.MultiHeadAttention
    return mha(num_heads=2, key_size=2, model_size=f,
               w_init=hk.initializers.VarianceScaling(1.0))(h, h, h)
  if kind == "remat":                                 # hk.remat around a residual block
    lin = ntklayers.Linear(f)                         # named outside the transform
    return hk.remat(lambda z: z + jnp.tanh(lin(z)))(h)
  if kind == "stack":                                 # stacked params, one slice per step
    def block(z):
      if args[1]:
        z = nh.LayerNorm(-1, create_scale=True, create_offset=True)(z)
      return jnp.tanh(ntklayers.Linear(f)(z))
    return hk.layer_stack(args[0])(block)(h)
  if kind == "scan_shared":                           # one Linear reused over 2 steps
    lin = ntklayers.Linear(f)
    def step(z, _):
      return jnp.tanh(lin(z)), None
    return hk.scan(step, h, None, length=2)[0]
  if kind == "vmap_linear":                           # per-example Linear under hk.vmap
    lin = ntklayers.Linear(f)
    return hk.vmap(lambda z: jnp.tanh(lin(z)), split_rng=False)(h)
  if kind == "transpose":                             # class 2: rows are positions
    return jnp.swapaxes(ntklayers.Linear(f)(jnp.swapaxes(h, 0, 1)), 0, 1)
  if kind == "pool":
    return jnp.mean(h, axis=1)
  raise ValueError(op)


def _net(spec: Spec, init: bool = False):
  def fn(x):
    h = x
    for op in spec.ops:
      h = _apply_op(op, h, init)
    kind, out, squeeze = spec.head
    h = (ntklayers.Linear if kind == "linear" else hk.Linear)(out)(h)
    return h[:, 0] if squeeze else h
  return fn


def _promotion(spec: Spec, init: bool = False):
  """hk.BatchNorm updates its moving averages with ``jnp.power(float, int32)``, which
  needs "standard" promotion (conftest sets "strict"; see tests/models.py): at init,
  and in training mode."""
  bn = [op[1] for op in spec.ops if op[0] == "batchnorm"]
  return (jax.numpy_dtype_promotion("standard") if (bn and init) or any(bn)
          else contextlib.nullcontext())


def _inputs(spec: Spec, n: int, seed_: int):
  rng = np.random.default_rng(seed_)
  if spec.inp == "tokens":
    return jnp.asarray(rng.integers(0, VOCAB, (n, 3)), jnp.int32)
  shape = (n, 4) if spec.inp == "vec" else (n, 3, 4)
  return jnp.asarray(rng.normal(size=shape), jnp.float64)


def build(spec: Spec):
  """``(f, params, x1, x2, mask)``: ``f(params, x)``, float64 parameters and inputs,
  and ``mask`` the ``trainable`` mask (``None`` or a bool per leaf, like ``params``)."""
  net = hk.without_apply_rng(hk.transform_with_state(_net(spec)))
  init = hk.transform_with_state(_net(spec, init=True)).init
  x1 = _inputs(spec, spec.n1, 1)
  x2 = None if spec.n2 is None else _inputs(spec, spec.n2, 3)
  with _promotion(spec, init=True):
    params, state = models.init_params(init, jnp.float64, x1)

  def f(p, x):
    with _promotion(spec):
      return net.apply(p, state, x)[0]

  return f, params, x1, x2, _mask(spec, params)


def _mask(spec: Spec, params):
  kind = spec.trainable[0]
  if kind == "all":
    return None
  if kind == "no_biases":
    mask = hk.data_structures.map(lambda m, n, v: n != "b", params)
  elif kind == "freeze_module":
    frozen = sorted(params)[spec.trainable[1] % len(params)]
    mask = {m: {n: m != frozen for n in params[m]} for m in params}
  else:
    bits = iter(spec.trainable[1] * 100)
    mask = jax.tree.map(lambda _: next(bits), params)
  if not any(jax.tree.leaves(mask)):     # keep at least one leaf
    first = sorted(mask)[0]
    mask = {**mask, first: {n: True for n in mask[first]}}
  return mask
