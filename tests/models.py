"""The shared registry of test models (after Haiku's ``integration/descriptors.py``).

Every model is a :class:`ModelDescriptor`; ``descriptor.build(dtype)`` returns
``Built(f, params, x1, x2)`` with ``f(params, x) -> [N, ...]`` a plain function
(Haiku ``apply`` or a closure over Haiku state), ``x1`` a batch of ``N1 = 3`` and
``x2`` a batch of ``N2 = 2`` examples. Sizes are tiny (widths <= 16) so that every
JAX compilation stays cheap. ``MODELS`` are the Haiku models below,
``CLASS_MODELS`` the Haiku models of the classes of issue #6 (``models_classes``);
``BY_NAME`` and ``build`` cover both, :func:`registry` adds the Flax ones.

Parameters have the structure Haiku's ``init`` creates but random values (see
:func:`init_params`): Haiku's zero biases and unit scales would let some terms
of the kernel vanish by accident.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np

import ntklayers
import ntklayers.haiku as nh

N1, N2 = 3, 2


class Built(NamedTuple):
  f: Callable[[Any, Any], jax.Array]
  params: Any
  x1: Any
  x2: Any


@dataclasses.dataclass(frozen=True)
class ModelDescriptor:
  """How to build one test model.

  Attributes:
    name: test id.
    build: ``build(dtype) -> Built(f, params, x1, x2)``; params and float inputs
      in ``dtype``.
    x_shape: shape of one example (a dict of shapes for pytree inputs).
    out_rank: rank of ``f``'s output, batch axis included.
    fallback_warning: annotated layers run under an inner transform (``hk.remat``,
      ``hk.scan``, ``hk.layer_stack``), so ntklayers warns that they go to the
      exact fallback (tolerated, like ``warning="require"``).
    warning: ntklayers warnings the model may emit: ``None`` (none: warnings are
      errors), ``"tolerate"`` (any ``ntklayers:`` ``UserWarning`` may or may not
      appear) or ``"require"`` (the one-time fallback warning must appear on the
      model's first kernel, checked by ``test_required_warnings``;
      elsewhere tolerated, since it is emitted once).
    coupled: samples interact inside the model (BatchNorm in training mode, batch
      centering, ...): the reference differentiates each batch whole.
    int_inputs: inputs are integer token ids.
    slow: heavier model (``pytest.mark.slow``).
    expect_structured: with ``implementation="auto"``, no trainable parameter is
      left on the generic fallback (``kernel_fn.fallback == ()``, checked by
      ``test_registry``): how the model is handled, not only that it is exact.
  """

  name: str
  build: Callable[[Any], Built]
  x_shape: Any
  out_rank: int = 2
  fallback_warning: bool = False
  warning: str | None = None
  coupled: bool = False
  int_inputs: bool = False
  slow: bool = False
  expect_structured: bool = False

  def __post_init__(self):
    assert self.warning in (None, "tolerate", "require"), self.warning

  def __str__(self) -> str:
    return self.name


# --------------------------------------------------------------- helpers ---


def _key(seed: int) -> jax.Array:
  return jax.random.key(seed)


def make_inputs(x_shape: Any, dtype: Any, *, vocab: int | None = None,
                seed: int = 1) -> tuple[Any, Any]:
  """Batches ``x1 [N1, *x_shape]`` and ``x2 [N2, *x_shape]`` (pytrees allowed).

  Drawn with NumPy: op-by-op JAX random calls would each cost a compilation.
  """
  leaves, treedef = jax.tree.flatten(x_shape, is_leaf=lambda s: isinstance(s, tuple))
  rng = np.random.default_rng(seed)
  out = []
  for n in (N1, N2):
    if vocab is not None:
      arrs = [jnp.asarray(rng.integers(0, vocab, (n, *s)), jnp.int32) for s in leaves]
    else:
      arrs = [jnp.asarray(rng.normal(size=(n, *s)), dtype) for s in leaves]
    out.append(jax.tree.unflatten(treedef, arrs))
  return out[0], out[1]


def init_params(init_fn: Callable, dtype: Any, *args, seed: int = 2) -> Any:
  """Parameters with the shapes ``init_fn(key, *args)`` would create, drawn with NumPy.

  Only ``jax.eval_shape`` of Haiku's ``init`` runs: compiling Haiku's truncated
  normal initializers in float64 costs seconds per model on CPU. Weights ``w`` are
  ``N(0, 1 / fan_in)``; everything else (biases, offsets, embeddings) is drawn
  around Haiku's initial value (``scale`` around 1, others around 0), so that no
  term of the kernel vanishes by accident. Returns ``(params, state)`` when
  ``init_fn`` does.
  """
  rng = np.random.default_rng(seed)
  shapes = jax.eval_shape(init_fn, _key(0), *args)

  def fill(path, leaf):
    name = str(getattr(path[-1], "key", path[-1]))
    shape = leaf.shape
    if not jnp.issubdtype(leaf.dtype, jnp.floating):
      return jnp.asarray(np.ones(shape), leaf.dtype)  # e.g. a moving average counter
    noise = rng.normal(size=shape)
    if name == "w":
      value = noise / np.sqrt(max(1, int(np.prod(shape[:-1]))))
    elif name == "scale":
      value = 1.0 + 0.3 * noise
    elif name in ("average", "hidden") and "var_ema" in jax.tree_util.keystr(path):
      value = 1.0 + 0.3 * np.abs(noise)  # a positive moving variance
    else:
      value = 0.3 * noise
    return jnp.asarray(value, dtype)

  return jax.tree_util.tree_map_with_path(fill, shapes)


def _stateless(fn: Callable, x_shape: Any, *, vocab: int | None = None):
  """``build`` for a stateless Haiku function ``fn(x)``."""

  def build(dtype) -> Built:
    net = hk.without_apply_rng(hk.transform(fn))
    x1, x2 = make_inputs(x_shape, dtype, vocab=vocab)
    params = init_params(net.init, dtype, x1)
    return Built(net.apply, params, x1, x2)

  return build


def descriptor(name: str, fn: Callable, x_shape: Any, **kw) -> ModelDescriptor:
  vocab = kw.pop("vocab", None)
  return ModelDescriptor(name, _stateless(fn, x_shape, vocab=vocab), x_shape,
                         int_inputs=vocab is not None, **kw)


def _w_init():
  return hk.initializers.VarianceScaling(1.0)


# ---------------------------------------------------------------- models ---


def mlp_relu(x):
  x = jax.nn.relu(ntklayers.Linear(16)(x))
  x = jax.nn.relu(ntklayers.Linear(16)(x))
  return ntklayers.Linear(3)(x)


def mlp_tanh_nobias(x):
  x = jnp.tanh(ntklayers.Linear(8, with_bias=False)(x))
  x = jnp.tanh(ntklayers.Linear(8, with_bias=False)(x))
  return ntklayers.Linear(3, with_bias=False)(x)


def mlp_deep_narrow(x):
  for _ in range(6):
    x = jnp.tanh(ntklayers.Linear(4)(x))
  return ntklayers.Linear(2)(x)


def mlp_mixed(x):
  """A plain ``hk.Linear`` (not annotated) between annotated layers."""
  x = jax.nn.relu(ntklayers.Linear(8)(x))
  x = jax.nn.relu(hk.Linear(8)(x))
  return ntklayers.Linear(3)(x)


def cnn2d(x):
  """[N, 9, 9, 2]: stride 2, SAME, dilation, VALID + groups, explicit padding."""
  x = jax.nn.relu(nh.Conv2D(4, 3, stride=2)(x))                     # [5, 5, 4]
  x = jax.nn.relu(nh.Conv2D(4, 3, rate=2)(x))                       # [5, 5, 4]
  x = jax.nn.relu(nh.Conv2D(4, 3, padding="VALID",
                            feature_group_count=2)(x))              # [3, 3, 4]
  x = jax.nn.relu(nh.Conv2D(4, (2, 3), stride=(1, 2),
                            padding=((1, 0), (0, 1)))(x))           # [3, 1, 4]
  return ntklayers.Linear(3)(x.reshape(x.shape[0], -1))


def cnn2d_nchw_nobias(x):
  """[N, 2, 6, 6] channels-first, one conv without bias, strided VALID conv."""
  x = jax.nn.relu(nh.Conv2D(4, 3, stride=2, data_format="NCHW")(x))  # [4, 3, 3]
  x = nh.Conv2D(3, 2, padding="VALID", with_bias=False, data_format="NCHW")(x)
  return jnp.mean(x, axis=(2, 3))                                    # [N, 3]


def conv1d_seq(x):
  """[N, T=6, C=3] -> [N, T, 4] (rank-3 output); the second conv is causal."""
  x = jax.nn.relu(nh.Conv1D(8, 3)(x))
  return nh.Conv1D(4, 3, rate=2, padding=hk.pad.causal)(x)


def conv3d(x):
  """[N, 4, 4, 4, 2]."""
  x = jax.nn.relu(nh.Conv3D(3, 2, stride=2)(x))                      # [2, 2, 2, 3]
  x = jax.nn.relu(nh.ConvND(3, 3, 2, padding="VALID")(x))            # [1, 1, 1, 2]
  return ntklayers.Linear(2)(x.reshape(x.shape[0], -1))


def transformer(x):
  """Pre-LN transformer block on [N, T=4, d=8] -> [N, T, d] (rank-3 output)."""
  h = nh.LayerNorm(-1, create_scale=True, create_offset=True)(x)
  h = nh.MultiHeadAttention(num_heads=2, key_size=4, w_init=_w_init())(h, h, h)
  x = x + h
  return x + ntklayers.Linear(8)(jax.nn.gelu(x))


def cross_attention(x):
  """Pytree inputs {"q": [N, 3, 8], "kv": [N, 5, 6]}, masked, value/model size."""
  q, kv = x["q"], x["kv"]
  mask = jnp.asarray(np.tril(np.ones((3, 5), bool), k=2))[None, None]  # [1, 1, 3, 5]
  mha = nh.MultiHeadAttention(num_heads=2, key_size=4, value_size=3, model_size=5,
                              w_init=_w_init())
  h = mha(q, kv, kv, mask=mask)                                       # [N, 3, 5]
  return ntklayers.Linear(3)(jnp.mean(jnp.tanh(h), axis=1))


def embed_tokens(x):
  """Integer token ids [N, T=5] -> [N, 3]."""
  e = hk.Embed(vocab_size=11, embed_dim=8)(x)
  h = jax.nn.relu(ntklayers.Linear(8)(e))
  return ntklayers.Linear(3)(jnp.mean(h, axis=1))


def weight_shared(x):
  """One ``ntklayers.Linear`` called twice (its cross terms must be counted)."""
  shared = ntklayers.Linear(8, name="shared")
  x = jnp.tanh(ntklayers.Linear(8)(x))
  x = jnp.tanh(shared(x))
  x = jnp.tanh(shared(x))
  return ntklayers.Linear(2)(x)


def layernorm_variants(x):
  """[N, T=4, C=6] -> [N, T, 3]: LayerNorm with param_axis not last, no scale."""
  x = nh.LayerNorm(axis=-1, create_scale=True, create_offset=True, param_axis=1)(x)
  x = jnp.tanh(ntklayers.Linear(6)(x))
  x = nh.LayerNorm(axis=(1, 2), create_scale=False, create_offset=True)(x)
  x = nh.LayerNorm(axis=1, create_scale=True, create_offset=False, param_axis=-1)(x)
  return ntklayers.Linear(3)(x)


def remat_model(x):
  x = jnp.tanh(ntklayers.Linear(8)(x))
  x = hk.remat(lambda h: jnp.tanh(ntklayers.Linear(8, name="in_remat")(h)))(x)
  return ntklayers.Linear(2)(x)


def layer_stack_model(x):
  x = jnp.tanh(ntklayers.Linear(8)(x))
  x = hk.layer_stack(3)(lambda h: jnp.tanh(ntklayers.Linear(8, name="stacked")(h)))(x)
  return ntklayers.Linear(2)(x)


def scanned_blocks(x):
  """[N, T=3, d=8]: an input Linear, 2 pre-LN transformer blocks as one
  ``hk.layer_stack`` of ``hk.remat`` blocks (stacked parameters), a pooled head."""

  def block(h):
    a = nh.LayerNorm(-1, create_scale=True, create_offset=True)(h)
    h = h + nh.MultiHeadAttention(num_heads=2, key_size=4, w_init=_w_init())(a, a, a)
    a = nh.LayerNorm(-1, create_scale=True, create_offset=True)(h)
    return h + ntklayers.Linear(8)(jax.nn.gelu(ntklayers.Linear(12)(a)))

  x = ntklayers.Linear(8)(x)
  x = hk.layer_stack(2)(hk.remat(block))(x)
  return ntklayers.Linear(3)(x.mean(axis=1))


def scan_rnn(x):
  """[N, T=4, C=3]: an RNN written with ``hk.scan``."""
  cell = ntklayers.Linear(6, name="cell")
  inp = ntklayers.Linear(6, name="inp")

  def step(h, xt):
    h = jnp.tanh(cell(h) + inp(xt))
    return h, h

  h0 = jnp.zeros((x.shape[0], 6), x.dtype)
  h, _ = hk.scan(step, h0, jnp.swapaxes(x, 0, 1))
  return ntklayers.Linear(2)(h)


# ------------------------------------------------------------- BatchNorm ---


def _bn_net(x, is_training: bool):
  x = ntklayers.Linear(8)(x)
  x = hk.BatchNorm(create_scale=True, create_offset=True, decay_rate=0.9)(x, is_training)
  return ntklayers.Linear(3)(jax.nn.relu(x))


def _haiku_strict_exception():
  # hk.BatchNorm's moving averages compute jnp.power(float decay, int32 counter),
  # which jax_numpy_dtype_promotion="strict" rejects (a Haiku issue, see conftest).
  return jax.numpy_dtype_promotion("standard")


def _batchnorm_build(is_training: bool, net_fn=_bn_net):
  x_shape = (5,)

  def build(dtype) -> Built:
    net = hk.without_apply_rng(hk.transform_with_state(net_fn))
    x1, x2 = make_inputs(x_shape, dtype)
    with _haiku_strict_exception():
      # Random moving averages (as after some training), not Haiku's zeros.
      params, state = init_params(functools.partial(net.init, is_training=True), dtype, x1)

    def f(params, x):
      ctx = _haiku_strict_exception() if is_training else contextlib.nullcontext()
      with ctx:
        out, _ = net.apply(params, state, x, is_training)
      return out

    return Built(f, params, x1, x2)

  return build


# ------------------------------------- Embed, RMSNorm, GroupNorm, BatchNorm ---


def embed_shared_ids(x):
  """Token ids [N, T=6] from a vocabulary of 5 (ids repeat within and across
  examples); one ``nh.Embed`` called twice (weight sharing: cross terms)."""
  emb = nh.Embed(vocab_size=5, embed_dim=6)
  e = emb(x) + 0.5 * emb(x[:, ::-1])
  h = jnp.tanh(ntklayers.Linear(8)(e))
  return ntklayers.Linear(3)(jnp.mean(h, axis=1))


def rmsnorm_groupnorm(x):
  """[N, T=4, C=6]: RMSNorm (two param layouts), GroupNorm (channels last and
  first, with and without offset)."""
  x = nh.RMSNorm(axis=-1)(x)
  x = jnp.tanh(ntklayers.Linear(6)(x))
  x = nh.GroupNorm(groups=3)(x)
  x = jnp.swapaxes(nh.GroupNorm(groups=2, axis=(2, 1), create_offset=False,
                                data_format="channels_first")(jnp.swapaxes(x, 1, 2)), 1, 2)
  x = nh.RMSNorm(axis=(1, 2), param_axis=(1, 2))(x)
  return ntklayers.Linear(3)(jnp.mean(x, axis=1))


def _bn_dropin_net(x, is_training: bool):
  x = ntklayers.Linear(8)(x)
  x = nh.BatchNorm(create_scale=True, create_offset=True, decay_rate=0.9)(x, is_training)
  return ntklayers.Linear(3)(jax.nn.relu(x))


def _bn_dropin_build(is_training: bool):
  """As ``_batchnorm_build`` with the drop-in ``nh.BatchNorm``."""
  return _batchnorm_build(is_training, _bn_dropin_net)


# -------------------------------------------------------------- registry ---

MODELS: tuple[ModelDescriptor, ...] = (
    descriptor("mlp_relu", mlp_relu, (5,)),
    descriptor("mlp_tanh_nobias", mlp_tanh_nobias, (5,)),
    descriptor("mlp_deep_narrow", mlp_deep_narrow, (3,)),
    descriptor("mlp_mixed_hk_linear", mlp_mixed, (5,)),
    descriptor("cnn2d", cnn2d, (9, 9, 2)),
    descriptor("cnn2d_nchw_nobias", cnn2d_nchw_nobias, (2, 6, 6)),
    descriptor("conv1d_seq", conv1d_seq, (6, 3), out_rank=3),
    descriptor("conv3d", conv3d, (4, 4, 4, 2)),
    descriptor("transformer", transformer, (4, 8), out_rank=3, slow=True),
    descriptor("cross_attention_mask", cross_attention, {"q": (3, 8), "kv": (5, 6)}),
    descriptor("embed_tokens", embed_tokens, (5,), vocab=11),
    ModelDescriptor("batchnorm_eval", _batchnorm_build(False), (5,)),
    ModelDescriptor("batchnorm_train", _batchnorm_build(True), (5,), coupled=True),
    descriptor("weight_shared", weight_shared, (5,)),
    descriptor("layernorm_variants", layernorm_variants, (4, 6), out_rank=3),
    descriptor("remat", remat_model, (5,)),
    descriptor("layer_stack", layer_stack_model, (5,)),
    descriptor("scan_rnn", scan_rnn, (4, 3)),
    descriptor("scanned_blocks", scanned_blocks, (3, 8)),
    descriptor("embed_shared_ids", embed_shared_ids, (6,), vocab=5),
    descriptor("rmsnorm_groupnorm", rmsnorm_groupnorm, (4, 6)),
    ModelDescriptor("batchnorm_infer_dropin", _bn_dropin_build(False), (5,)),
    ModelDescriptor("batchnorm_train_dropin", _bn_dropin_build(True), (5,), coupled=True),
)

# The classes of models of issue #6 (tests/models_classes.py; that module imports
# this one lazily, so it is imported here, after everything it needs is defined).
import models_classes  # pylint: disable=g-import-not-at-top,wrong-import-position

CLASS_MODELS: tuple[ModelDescriptor, ...] = models_classes.haiku_models()

BY_NAME = {m.name: m for m in MODELS + CLASS_MODELS}
assert len(BY_NAME) == len(MODELS) + len(CLASS_MODELS), "model names must be unique"


@functools.lru_cache(maxsize=None)
def build(name: str, dtype: Any = jnp.float64) -> Built:
  """Cached ``BY_NAME[name].build(dtype)`` (params and inputs are immutable)."""
  return BY_NAME[name].build(jnp.dtype(dtype))


def model_params(models=MODELS, slow: bool = False):
  """``pytest.param``s over descriptors, slow ones (or all, with ``slow``) marked."""
  import pytest  # pylint: disable=g-import-not-at-top
  return [pytest.param(m, id=m.name, marks=[pytest.mark.slow] if m.slow or slow else [])
          for m in models]


@contextlib.contextmanager
def expect_fallback_warning(model: ModelDescriptor):
  """Tolerates the ntklayers warnings that ``model`` may legitimately emit.

  The fallback warning is emitted once, so whether a given call warns depends on
  test order; ``test_api`` and ``test_required_warnings`` check the
  warning itself. ``warning="tolerate"``: any ``ntklayers:`` ``UserWarning``.
  """
  import warnings  # pylint: disable=g-import-not-at-top
  with warnings.catch_warnings():
    if model.fallback_warning or model.warning == "require":
      warnings.filterwarnings("ignore", message=r".*handled by the exact generic fallback",
                              category=UserWarning)
    if model.warning == "tolerate":
      warnings.filterwarnings("ignore", message=NTKLAYERS_WARNING, category=UserWarning)
    yield


NTKLAYERS_WARNING = r"ntklayers\b"  # every ntklayers warning starts "ntklayers: "


def registry(*, stock: bool = False) -> tuple[ModelDescriptor, ...]:
  """The whole shared registry: the Haiku models above, the linen/NNX models of
  ``models_flax`` (which extends :class:`ModelDescriptor` with Flax entry points)
  and the models of the classes of issue #6 (``models_classes``) of both.

  ``stock=True`` adds the stock-layer models of ``models_stock`` (Haiku, plain JAX,
  linen, NNX, Equinox; built with ``models_stock.build``), which ``test_registry``
  checks; tests that dispatch on ``framework`` to ``build`` / ``models_flax.build``
  leave them out.
  """
  import models_flax  # pylint: disable=g-import-not-at-top  (it imports this module)
  out = (MODELS + tuple(models_flax.FLAX_MODELS) + CLASS_MODELS
         + tuple(models_flax.CLASS_MODELS))
  if stock:
    import models_stock  # pylint: disable=g-import-not-at-top  (it imports this module)
    out += models_stock.stock_models()
  return out
