"""Registry models for the classes of models of issue #6: the Haiku ones.

Each model is a :class:`models.ModelDescriptor` and joins the shared registry:
``models.py`` appends :func:`haiku_models` to ``models.CLASS_MODELS`` (in
``BY_NAME`` and ``models.registry()``), so every exactness test of
``test_exactness.py`` runs on them; their linen and NNX counterparts are in
``models_classes_flax.py``. Names start with the class: ``c1_``, ``c2_`` ...

* Class 1, a parameter read outside its annotated layer (tied decoders, a bias
  reused as a scale): exact, with a one-time fallback warning
  (``warning="require"``, checked by ``test_required_warnings``).
* Class 2, layer rows that are not the model's examples (K == N1 = 3 learned
  prototypes through a shared layer, a batch reversed / permuted / transposed
  around a layer): exact; ntklayers warnings tolerated (``warning="tolerate"``).
  Models whose output row ``n`` depends on other examples are ``coupled``.
* Class 3, examples that interact without BatchNorm (batch centering, softmax and
  attention over the batch axis, in-batch normalization, batch statistics):
  ``coupled=True``; exact with the default ``independent_samples=None``.
* Class 5, trace/diagonal over the batch axis: outputs of rank 1 and 4 (rank 2
  and 3 are in ``models.MODELS``), used by ``test_exactness.test_axes_every_rank``.

This module imports no test module at import time (``models`` imports it at its
end): the descriptor list is built by a function that imports ``models`` lazily.
Sizes are tiny (widths <= 8).
"""

from __future__ import annotations

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np

import ntklayers
import ntklayers.haiku as nh

K_PROTOS = 3  # == models.N1: prototype rows that merely equal the batch size


def _perm(n: int) -> tuple[np.ndarray, np.ndarray]:
  """A fixed permutation of ``range(n)`` (odd indices first) and its inverse."""
  perm = np.concatenate([np.arange(1, n, 2), np.arange(0, n, 2)])
  return perm, np.argsort(perm)


def _protos_init(shape, dtype):
  return hk.initializers.RandomNormal()(shape, dtype)


# ======================================================= Haiku, class 1 ===


def c1_tied_params_dict(x):
  """Tied decoder ``h @ enc_w.T`` with ``enc_w`` from ``enc.params_dict()``."""
  enc = ntklayers.Linear(6, name="c1a_enc")
  h = jnp.tanh(enc(x))                                     # [N, 6]
  w = enc.params_dict()["c1a_enc/w"]                       # [4, 6]
  return ntklayers.Linear(3, name="c1a_head")(jnp.tanh(h @ w.T))


class TiedLinear(ntklayers.Linear):
  """An ``ntklayers.Linear`` with a ``decode`` method reading its own ``w`` by
  ``hk.get_parameter`` (same module scope, outside the annotated call)."""

  def decode(self, h):
    w = hk.get_parameter("w", [self.input_size, self.output_size], h.dtype,
                         init=jnp.zeros)
    return h @ w.T


def c1_tied_get_parameter(x):
  enc = TiedLinear(6, name="c1b_enc")
  h = jnp.tanh(enc(x))
  return ntklayers.Linear(3, name="c1b_head")(jnp.tanh(enc.decode(h)))


def c1_bias_as_scale(x):
  """The bias of an annotated layer reused as an elementwise scale."""
  lin = ntklayers.Linear(6, name="c1c_lin")
  h = jnp.tanh(lin(x))
  b = lin.params_dict()["c1c_lin/b"]
  return ntklayers.Linear(3, name="c1c_head")(h * b[None])


def c1_tied_twice_and_outside(x):
  """One annotated layer called twice (tying inside) and read outside (tied decoder)."""
  enc = ntklayers.Linear(4, name="c1d_enc")                 # 4 -> 4
  h = jnp.tanh(enc(jnp.tanh(enc(x))))
  w = enc.params_dict()["c1d_enc/w"]
  return ntklayers.Linear(2, name="c1d_head")(jnp.tanh(h @ w.T) + x)


def c1_conv_kernel_outside(x):
  """[N, T=4, C=3]: a conv's first tap reused as a dense map of the input."""
  conv = nh.Conv1D(4, 2, name="c1e_conv")
  h = conv(x)                                              # [N, 4, 4]
  w = conv.params_dict()["c1e_conv/w"]                     # [2, 3, 4]
  return ntklayers.Linear(2, name="c1e_head")(jnp.tanh(h + x @ w[0]))


def c1_layernorm_scale_outside(x):
  """[N, T=3, C=4]: a LayerNorm scale also scales the residual branch."""
  ln = nh.LayerNorm(-1, create_scale=True, create_offset=True, name="c1f_ln")
  h = jnp.tanh(ntklayers.Linear(4, name="c1f_in")(ln(x)))
  s = ln.params_dict()["c1f_ln/scale"]
  return ntklayers.Linear(2, name="c1f_head")(x * s[None, None] + h)


# ======================================================= Haiku, class 2 ===


def c2_prototypes_shared(x):
  """One annotated layer applied to the batch and to K == N1 learned prototypes."""
  protos = hk.get_parameter("protos", [K_PROTOS, 4], x.dtype, init=_protos_init)
  lin = ntklayers.Linear(6, name="c2a_shared")
  hx, hp = jnp.tanh(lin(x)), jnp.tanh(lin(protos))       # [N, 6], [K, 6]
  return ntklayers.Linear(3, name="c2a_head")(hx @ hp.T)


class Prototypes(hk.Module):
  def __call__(self, d, dtype):
    return hk.get_parameter("protos", [K_PROTOS, d], dtype, init=_protos_init)


def c2_prototypes_own_layer(x):
  """A layer that only ever sees the K == N1 prototypes."""
  protos = Prototypes(name="c2b_bank")(4, x.dtype)
  hp = jnp.tanh(ntklayers.Linear(5, name="c2b_proto_proj")(protos))   # [K, 5]
  hx = jnp.tanh(ntklayers.Linear(5, name="c2b_in")(x))                # [N, 5]
  return hx @ hp.T + ntklayers.Linear(K_PROTOS, name="c2b_skip")(x)


def c2_reversed(x):
  h = ntklayers.Linear(6, name="c2c_lin")(x[::-1])[::-1]
  return ntklayers.Linear(3, name="c2c_head")(jnp.tanh(h))


def c2_rolled(x):
  h = jnp.roll(ntklayers.Linear(6, name="c2d_lin")(jnp.roll(x, 1, axis=0)), -1, axis=0)
  return ntklayers.Linear(3, name="c2d_head")(jnp.tanh(h))


def c2_permuted_gather(x):
  perm, inv = _perm(x.shape[0])
  h = jnp.tanh(ntklayers.Linear(6, name="c2e_lin")(x[perm]))
  h = ntklayers.Linear(6, name="c2e_mid")(h)[inv]
  return ntklayers.Linear(3, name="c2e_head")(jnp.tanh(h))


def c2_batch_transposed(x):
  """[N, T=3, C=4]: the layer sees [T, N, C] (its rows are positions, T == N1)."""
  h = ntklayers.Linear(5, name="c2f_lin")(jnp.swapaxes(x, 0, 1))     # [T, N, 5]
  h = jnp.tanh(jnp.swapaxes(h, 0, 1))
  return ntklayers.Linear(2, name="c2f_head")(h)                       # [N, T, 2]


def c2_rolled_uninverted(x):
  """Output row n is computed from example n - 1 (the batch is not restored)."""
  h = jnp.tanh(ntklayers.Linear(6, name="c2g_lin")(jnp.roll(x, 1, axis=0)))
  return ntklayers.Linear(3, name="c2g_head")(h) + ntklayers.Linear(3, name="c2g_skip")(x)


def c2_gather_duplicates(x):
  """A gather that repeats rows: output row n is computed from example min(n+1, N-1)."""
  idx = np.minimum(np.arange(x.shape[0]) + 1, x.shape[0] - 1)
  h = jnp.tanh(ntklayers.Linear(6, name="c2i_lin")(x)[idx])
  return ntklayers.Linear(3, name="c2i_head")(h) + ntklayers.Linear(3, name="c2i_skip")(x)


def c2_conv_over_batch(x):
  """A conv whose spatial axis is the batch: [1, N, C] -> [1, N, 5]."""
  h = nh.Conv1D(5, 2, name="c2h_conv")(x[None])[0]
  return ntklayers.Linear(3, name="c2h_head")(jnp.tanh(h))


# ======================================================= Haiku, class 3 ===


def c3_center(x):
  h = ntklayers.Linear(6, name="c3a_lin")(x)
  h = h - jnp.mean(h, axis=0, keepdims=True)
  return ntklayers.Linear(3, name="c3a_head")(jnp.tanh(h))


def c3_center_input(x):
  """The coupling happens before any parameter is read."""
  x = x - jnp.mean(x, axis=0, keepdims=True)
  return ntklayers.Linear(3, name="c3b_head")(jnp.tanh(ntklayers.Linear(6, name="c3b_lin")(x)))


def c3_batch_softmax(x):
  h = jax.nn.softmax(ntklayers.Linear(6, name="c3c_lin")(x), axis=0)
  return ntklayers.Linear(3, name="c3c_head")(h)


def c3_batch_attention(x):
  """Attention across the examples of the batch: [N, N] weights."""
  q = ntklayers.Linear(4, name="c3d_q")(x)
  k = ntklayers.Linear(4, name="c3d_k")(x)
  v = ntklayers.Linear(4, name="c3d_v")(x)
  a = jax.nn.softmax(q @ k.T / 2.0, axis=-1)
  return ntklayers.Linear(3, name="c3d_head")(jnp.tanh(a @ v) + v)


def c3_inbatch_norm(x):
  """A hand-written BatchNorm (plain parameters, batch statistics)."""
  h = ntklayers.Linear(6, name="c3e_lin")(x)
  mean = jnp.mean(h, axis=0, keepdims=True)
  var = jnp.mean(jnp.square(h - mean), axis=0, keepdims=True)
  h = (h - mean) * jax.lax.rsqrt(var + 0.5)
  scale = hk.get_parameter("scale", [6], x.dtype, init=jnp.ones)
  return ntklayers.Linear(3, name="c3e_head")(jax.nn.gelu(h * scale[None]))


def c3_batch_rms(x):
  """[N, T=3, C=4] -> [N, T, 2]: divided by an RMS over the whole batch."""
  h = ntklayers.Linear(4, name="c3f_lin")(x)
  h = h * jax.lax.rsqrt(jnp.mean(jnp.square(h)) + 1.0)
  return ntklayers.Linear(2, name="c3f_head")(jnp.tanh(h))


def c3_batch_logsumexp(x):
  """Every output row minus a log-sum-exp over the batch."""
  h = ntklayers.Linear(3, name="c3g_lin")(jnp.tanh(ntklayers.Linear(5, name="c3g_in")(x)))
  return h - jax.nn.logsumexp(h, axis=0, keepdims=True)


# ======================================================= Haiku, class 5 ===


def c5_rank1(x):
  """[N, 4] -> [N]."""
  h = jnp.tanh(ntklayers.Linear(6, name="c5a_lin")(x))
  return ntklayers.Linear(1, name="c5a_head")(h)[:, 0]


def c5_rank4_conv(x):
  """[N, 3, 3, 2] -> [N, 3, 3, 2]."""
  h = jnp.tanh(nh.Conv2D(3, 2, name="c5b_conv")(x))
  return nh.Conv2D(2, 2, name="c5b_out")(h) + ntklayers.Linear(2, name="c5b_skip")(x)


def c5_mlp_rank2(x):
  """The plain ``ntklayers.Linear`` MLP of the issue's class 5."""
  h = jnp.tanh(ntklayers.Linear(6, name="c5c_lin")(x))
  return ntklayers.Linear(3, name="c5c_head")(h)


def haiku_models() -> tuple:
  import models  # pylint: disable=g-import-not-at-top  (models imports this module)
  d = models.descriptor
  req, tol = dict(warning="require"), dict(warning="tolerate")
  return (
      d("c1_tied_params_dict", c1_tied_params_dict, (4,), **req),
      d("c1_tied_get_parameter", c1_tied_get_parameter, (4,), **req),
      d("c1_bias_as_scale", c1_bias_as_scale, (4,), **req),
      d("c1_tied_twice_and_outside", c1_tied_twice_and_outside, (4,), **req),
      d("c1_conv_kernel_outside", c1_conv_kernel_outside, (4, 3), out_rank=3, **req),
      d("c1_layernorm_scale_outside", c1_layernorm_scale_outside, (3, 4), out_rank=3,
        **req),
      d("c2_prototypes_shared", c2_prototypes_shared, (4,), **tol),
      d("c2_prototypes_own_layer", c2_prototypes_own_layer, (4,), **tol),
      d("c2_reversed", c2_reversed, (4,), **tol),
      d("c2_rolled", c2_rolled, (4,), **tol),
      d("c2_permuted_gather", c2_permuted_gather, (4,), **tol),
      d("c2_batch_transposed", c2_batch_transposed, (3, 4), out_rank=3, **tol),
      d("c2_rolled_uninverted", c2_rolled_uninverted, (4,), coupled=True, **tol),
      d("c2_gather_duplicates", c2_gather_duplicates, (4,), coupled=True, **tol),
      d("c2_conv_over_batch", c2_conv_over_batch, (4,), coupled=True, **tol),
      d("c3_center", c3_center, (4,), coupled=True, **tol),
      d("c3_center_input", c3_center_input, (4,), coupled=True, **tol),
      d("c3_batch_softmax", c3_batch_softmax, (4,), coupled=True, **tol),
      d("c3_batch_attention", c3_batch_attention, (4,), coupled=True, **tol),
      d("c3_inbatch_norm", c3_inbatch_norm, (4,), coupled=True, **tol),
      d("c3_batch_rms", c3_batch_rms, (3, 4), out_rank=3, coupled=True, **tol),
      d("c3_batch_logsumexp", c3_batch_logsumexp, (4,), coupled=True, **tol),
      d("c5_rank1", c5_rank1, (4,), out_rank=1),
      d("c5_mlp_rank2", c5_mlp_rank2, (4,)),
      d("c5_rank4_conv", c5_rank4_conv, (3, 3, 2), out_rank=4),
  )
