"""The Haiku models of the shared test registry (``models.MODELS``).

Plain Haiku functions ``fn(x)`` (MLPs, convolutions in 1 to 3 dimensions,
attention, embeddings, norms, weight sharing, ``hk.remat`` / ``hk.layer_stack`` /
``hk.scan``) and the builders of the BatchNorm models (``hk.BatchNorm`` and the
drop-in ``nh.BatchNorm``, in training and inference mode). ``models.py`` lists
them as descriptors and re-exports them. Sizes are tiny (widths <= 16).
"""

from __future__ import annotations

import contextlib
import functools

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np

import ntklayers
import ntklayers.haiku as nh
from models_base import Built, _w_init, init_params, make_inputs


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
