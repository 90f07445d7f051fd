"""Registry models for the classes of models of issue #6: the linen and NNX ones.

The Flax counterparts of the Haiku models of ``models_classes.py`` (whose
docstring describes the classes): each is a ``models_flax.FlaxModelDescriptor``;
``models_flax.py`` appends :func:`flax_models` to ``models_flax.CLASS_MODELS`` (in
``models_flax.BY_NAME`` and ``models.registry()``), so every exactness test of
``test_flax_exactness.py`` runs on them. Names start with the framework and the
class: ``linen_c1_`` / ``nnx_c1_`` ...

At import time this module imports only ``models_classes`` (which imports no test
module); ``models_flax`` imports it at its end, and :func:`flax_models` imports
``models_flax`` lazily. Sizes are tiny (widths <= 8).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import nnx

from models_classes import K_PROTOS, _perm
from ntklayers.flax import linen as fl
from ntklayers.flax import nnx as fx


# ======================================================= linen models ===


class LinenTiedVariables(nn.Module):
  """Class 1: ``h @ enc.variables["params"]["kernel"].T`` (compact)."""

  dtype: object

  @nn.compact
  def __call__(self, x):
    enc = fl.Dense(6, param_dtype=self.dtype, name="enc")
    h = jnp.tanh(enc(x))
    w = enc.variables["params"]["kernel"]                  # [4, 6]
    return fl.Dense(3, param_dtype=self.dtype, name="head")(jnp.tanh(h @ w.T))


class LinenTiedSetup(nn.Module):
  """Class 1, setup style: the parent reads ``self.enc.variables``."""

  dtype: object

  def setup(self):
    self.enc = fl.Dense(6, param_dtype=self.dtype)
    self.head = fl.Dense(3, param_dtype=self.dtype)

  def __call__(self, x):
    h = jnp.tanh(self.enc(x))
    w = self.enc.variables["params"]["kernel"]
    return self.head(jnp.tanh(h @ w.T) + x[:, :1])


class LinenBiasScale(nn.Module):
  """Class 1: a Dense bias read from the parent's ``self.variables``, as a scale."""

  dtype: object

  @nn.compact
  def __call__(self, x):
    h = jnp.tanh(fl.Dense(6, param_dtype=self.dtype, name="lin")(x))
    b = self.variables["params"]["lin"]["bias"]
    return fl.Dense(3, param_dtype=self.dtype, name="head")(h * b[None])


class LinenProtos(nn.Module):
  d: int
  dtype: object

  @nn.compact
  def __call__(self):
    return self.param("protos", nn.initializers.normal(1.0), (K_PROTOS, self.d),
                      self.dtype)


class LinenPrototypes(nn.Module):
  """Class 2: a shared Dense on the batch and on K == N1 prototypes."""

  dtype: object

  @nn.compact
  def __call__(self, x):
    protos = LinenProtos(4, self.dtype, name="bank")()
    lin = fl.Dense(6, param_dtype=self.dtype, name="shared")
    return fl.Dense(3, param_dtype=self.dtype, name="head")(
        jnp.tanh(lin(x)) @ jnp.tanh(lin(protos)).T)


class LinenReversed(nn.Module):
  """Class 2: ``Dense(x[::-1])[::-1]``."""

  dtype: object

  @nn.compact
  def __call__(self, x):
    h = fl.Dense(6, param_dtype=self.dtype, name="lin")(x[::-1])[::-1]
    return fl.Dense(3, param_dtype=self.dtype, name="head")(jnp.tanh(h))


class LinenCenter(nn.Module):
  """Class 3: batch centering."""

  dtype: object

  @nn.compact
  def __call__(self, x):
    h = fl.Dense(6, param_dtype=self.dtype, name="lin")(x)
    h = h - jnp.mean(h, axis=0, keepdims=True)
    return fl.Dense(3, param_dtype=self.dtype, name="head")(jnp.tanh(h))


class LinenBatchSoftmax(nn.Module):
  """Class 3: softmax over the batch axis, then a plain ``nn.Dense``."""

  dtype: object

  @nn.compact
  def __call__(self, x):
    h = jax.nn.softmax(fl.Dense(6, param_dtype=self.dtype, name="lin")(x), axis=0)
    return nn.Dense(3, param_dtype=self.dtype, name="plain_head")(h)


# ========================================================= NNX models ===


class NnxTied(nnx.Module):
  """Class 1: ``self.enc.kernel[...]`` read in the parent's ``__call__``."""

  def __init__(self, dtype, rngs):
    self.enc = fx.Linear(4, 6, param_dtype=dtype, rngs=rngs)
    self.head = fx.Linear(4, 3, param_dtype=dtype, rngs=rngs)

  def __call__(self, x):
    h = jnp.tanh(self.enc(x))
    return self.head(jnp.tanh(h @ self.enc.kernel[...].T))


class NnxBiasScale(nnx.Module):
  """Class 1: an annotated layer's bias reused as a scale."""

  def __init__(self, dtype, rngs):
    self.lin = fx.Linear(4, 6, param_dtype=dtype, rngs=rngs)
    self.head = fx.Linear(6, 3, param_dtype=dtype, rngs=rngs)

  def __call__(self, x):
    return self.head(jnp.tanh(self.lin(x)) * self.lin.bias[...][None])


class NnxProtoBank(nnx.Module):
  def __init__(self, dtype, rngs):
    self.protos = nnx.Param(jax.random.normal(rngs.params(), (K_PROTOS, 4), dtype))


class NnxPrototypes(nnx.Module):
  """Class 2: a shared Linear on the batch and on K == N1 prototypes."""

  def __init__(self, dtype, rngs):
    self.bank = NnxProtoBank(dtype, rngs)
    self.shared = fx.Linear(4, 6, param_dtype=dtype, rngs=rngs)
    self.head = fx.Linear(K_PROTOS, 3, param_dtype=dtype, rngs=rngs)

  def __call__(self, x):
    hp = jnp.tanh(self.shared(self.bank.protos[...]))
    return self.head(jnp.tanh(self.shared(x)) @ hp.T)


class NnxPermuted(nnx.Module):
  """Class 2: ``Linear(x[perm])[inv_perm]``."""

  def __init__(self, dtype, rngs):
    self.lin = fx.Linear(4, 6, param_dtype=dtype, rngs=rngs)
    self.head = fx.Linear(6, 3, param_dtype=dtype, rngs=rngs)

  def __call__(self, x):
    perm, inv = _perm(x.shape[0])
    return self.head(jnp.tanh(self.lin(x[perm])[inv]))


class NnxCenter(nnx.Module):
  """Class 3: batch centering."""

  def __init__(self, dtype, rngs):
    self.lin = fx.Linear(4, 6, param_dtype=dtype, rngs=rngs)
    self.head = fx.Linear(6, 3, param_dtype=dtype, rngs=rngs)

  def __call__(self, x):
    h = self.lin(x)
    return self.head(jnp.tanh(h - jnp.mean(h, axis=0, keepdims=True)))


class NnxBatchAttention(nnx.Module):
  """Class 3: attention across the examples of the batch."""

  def __init__(self, dtype, rngs):
    kw = dict(param_dtype=dtype, rngs=rngs)
    self.q, self.k, self.v = (fx.Linear(4, 4, **kw), fx.Linear(4, 4, **kw),
                              fx.Linear(4, 4, **kw))
    self.head = fx.Linear(4, 3, **kw)

  def __call__(self, x):
    a = jax.nn.softmax(self.q(x) @ self.k(x).T / 2.0, axis=-1)
    return self.head(jnp.tanh(a @ self.v(x)))


def flax_models() -> tuple:
  import models_flax as mf  # pylint: disable=g-import-not-at-top  (imports this module)
  req, tol = dict(warning="require"), dict(warning="tolerate")
  return (
      mf._linen("linen_c1_tied_variables", LinenTiedVariables, (4,), ("enc", "head"),
                **req),
      mf._linen("linen_c1_tied_setup", LinenTiedSetup, (4,), ("enc", "head"), **req),
      mf._linen("linen_c1_bias_scale", LinenBiasScale, (4,), ("lin", "head"), **req),
      mf._linen("linen_c2_prototypes", LinenPrototypes, (4,), ("bank", "shared", "head"),
                **tol),
      mf._linen("linen_c2_reversed", LinenReversed, (4,), ("lin", "head"), **tol),
      mf._linen("linen_c3_center", LinenCenter, (4,), ("lin", "head"), coupled=True,
                **tol),
      mf._linen("linen_c3_batch_softmax", LinenBatchSoftmax, (4,), ("lin", "plain_head"),
                coupled=True, **tol),
      mf._nnx("nnx_c1_tied", NnxTied, (4,), ("enc", "head"), **req),
      mf._nnx("nnx_c1_bias_scale", NnxBiasScale, (4,), ("lin", "head"), **req),
      mf._nnx("nnx_c2_prototypes", NnxPrototypes, (4,), ("bank", "shared", "head"),
              **tol),
      mf._nnx("nnx_c2_permuted", NnxPermuted, (4,), ("lin", "head"), **tol),
      mf._nnx("nnx_c3_center", NnxCenter, (4,), ("lin", "head"), coupled=True, **tol),
      mf._nnx("nnx_c3_batch_attention", NnxBatchAttention, (4,),
              ("q", "k", "v", "head"), coupled=True, **tol),
  )
