"""The Flax entry points on particular layers: an NNX BatchNorm in training mode
passed as a module, ``layerwise`` names of nested modules, LayerNorm axes
variants, and the fallback warning of a masked convolution.

``ntklayers.flax.ntk_fn(module)(variables, x1, x2=None, **apply_kwargs)`` (linen)
and ``ntklayers.flax.nnx.ntk_fn()(model, x1, x2=None)`` (NNX); their calling
conventions and errors are in ``test_flax_api.py``. Kernels are checked against
``reference.py`` in float64 (``rel_err <= 1e-10``).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import models_flax
import ntklayers
import ntklayers.flax
from ntklayers.flax import linen as fl
from ntklayers.flax import nnx as fx
from reference import TOL64, assert_rel_close, reference_ntk
from test_flax_api import F64, _inputs

FALLBACK_WARNING = r"handled by the exact generic fallback"


# ------------------------------------------------------- BatchNorm, train ---


def test_nnx_batchnorm_train_mode_module_form():
  """``model.train()`` passed as the module itself (the registry's
  ``nnx_batchnorm_train`` passes the split form): exact, samples interact, and
  the model's BatchStat state is left untouched.

  Regression test: ntk_fn used to merge state traced by its outer ``jax.jit``
  into the model run by the inner traces, and NNX's BatchNorm raised
  ``TraceContextError`` when writing its batch statistics."""
  built = models_flax.build("nnx_batchnorm_train")
  model = built.extra["model"]
  assert model.bn.use_running_average is False
  stats = jax.tree.map(np.asarray, nnx.state(model, nnx.BatchStat))
  with models_flax.flax_promotion(True):
    k = fx.ntk_fn()(model, built.x1, built.x2)
    ref = reference_ntk(built.f, built.params, built.x1, built.x2)
  assert_rel_close(k, ref, TOL64)
  jax.tree.map(np.testing.assert_array_equal, nnx.state(model, nnx.BatchStat), stats)


# ------------------------------------------------------------- layer names ---


class LinenBlock(nn.Module):
  @nn.compact
  def __call__(self, x):
    return jnp.tanh(fl.Dense(6, param_dtype=F64)(x))


class LinenNested(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = LinenBlock()(x)
    x = LinenBlock(name="named")(x)
    return fl.Dense(2, param_dtype=F64)(x)


class NnxBlock(nnx.Module):
  def __init__(self, d_in, rngs):
    self.lin = fx.Linear(d_in, 6, param_dtype=F64, rngs=rngs)

  def __call__(self, x):
    return jnp.tanh(self.lin(x))


class NnxNested(nnx.Module):
  def __init__(self, rngs):
    self.blocks = nnx.List([NnxBlock(5, rngs), NnxBlock(6, rngs)])
    self.head = fx.Linear(6, 2, param_dtype=F64, rngs=rngs)

  def __call__(self, x):
    for b in self.blocks:
      x = b(x)
    return self.head(x)


def test_layerwise_names_of_nested_modules():
  x1, x2 = _inputs()
  module = LinenNested()
  variables = models_flax.linen_variables(module, F64, x1)
  blocks = ntklayers.flax.ntk_fn(module, layerwise=True)(variables, x1, x2)
  assert sorted(blocks) == ["Dense_0", "LinenBlock_0/Dense_0", "named/Dense_0"]
  f = lambda p, x: module.apply({"params": p}, x)
  assert_rel_close(sum(blocks.values()), reference_ntk(f, variables["params"], x1, x2),
                   TOL64)

  model = models_flax.nnx_model(NnxNested, F64)
  blocks = fx.ntk_fn(layerwise=True)(model, x1, x2)
  assert sorted(blocks) == ["blocks/0/lin", "blocks/1/lin", "head"]
  graphdef, params = nnx.split(model, nnx.Param)
  f = lambda p, x: nnx.merge(graphdef, p)(x)
  assert_rel_close(sum(blocks.values()), reference_ntk(f, params, x1, x2), TOL64)


# ------------------------------------------------- LayerNorm axes variants ---


class LinenNorms(nn.Module):
  """[N, T=4, C=6]: LayerNorm over (T, C) with per-(T, C) parameters, scale-only."""

  @nn.compact
  def __call__(self, x):
    x = fl.LayerNorm(reduction_axes=(-2, -1), feature_axes=(-2, -1), param_dtype=F64)(x)
    x = jnp.tanh(fl.Dense(6, param_dtype=F64)(x))
    x = fl.LayerNorm(use_bias=False, param_dtype=F64)(x)
    return fl.Dense(2, param_dtype=F64)(x).mean(axis=1)


class NnxNorms(nnx.Module):
  def __init__(self, rngs):
    kw = dict(param_dtype=F64, rngs=rngs)
    # NNX keeps the parameters of several feature axes flat: [4 * 6].
    self.ln1 = fx.LayerNorm(24, reduction_axes=(-2, -1), feature_axes=(-2, -1), **kw)
    self.lin = fx.Linear(6, 6, **kw)
    self.ln2 = fx.LayerNorm(6, use_scale=False, **kw)
    self.head = fx.Linear(6, 2, **kw)

  def __call__(self, x):
    x = jnp.tanh(self.lin(self.ln1(x)))
    return self.head(self.ln2(x)).mean(axis=1)


@pytest.mark.slow
def test_linen_layer_norm_axes_variants_exact():
  x1, x2 = _inputs((4, 6))
  with models_flax.flax_promotion(True):  # Flax norms promote with float32 (see models_flax)
    module = LinenNorms()
    variables = models_flax.linen_variables(module, F64, x1)
    blocks = ntklayers.flax.ntk_fn(module, layerwise=True)(variables, x1, x2)
    assert sorted(blocks) == ["Dense_0", "Dense_1", "LayerNorm_0", "LayerNorm_1"]
    f = lambda p, x: module.apply({"params": p}, x)
    assert_rel_close(sum(blocks.values()),
                     reference_ntk(f, variables["params"], x1, x2), TOL64)


def test_nnx_layer_norm_axes_variants_exact():
  """Includes NNX's flat ``[4 * 6]`` scale/bias of a LayerNorm over two feature axes."""
  x1, x2 = _inputs((4, 6))
  with models_flax.flax_promotion(True):
    model = models_flax.nnx_model(NnxNorms, F64)
    assert model.ln1.scale.shape == (24,)
    blocks = fx.ntk_fn(layerwise=True)(model, x1, x2)
    assert sorted(blocks) == ["head", "lin", "ln1", "ln2"]
    graphdef, params = nnx.split(model, nnx.Param)
    f = lambda p, x: nnx.merge(graphdef, p)(x)
    assert_rel_close(sum(blocks.values()), reference_ntk(f, params, x1, x2), TOL64)


# -------------------------------------------------------- fallback warning ---


def test_masked_conv_falls_back_with_warning_and_is_exact():
  class MaskedConv(nn.Module):
    @nn.compact
    def __call__(self, x):
      mask = jnp.asarray(np.broadcast_to(np.tril(np.ones((3, 3)))[:, :, None, None],
                                         (3, 3, 2, 2)), F64)
      x = jnp.tanh(fl.Conv(2, (3, 3), mask=mask, param_dtype=F64, name="masked")(x))
      return fl.Dense(2, param_dtype=F64)(x.reshape(x.shape[0], -1))

  module = MaskedConv()
  x1, x2 = _inputs((4, 4, 2))
  variables = models_flax.linen_variables(module, F64, x1)
  with pytest.warns(UserWarning, match=FALLBACK_WARNING):
    k = ntklayers.flax.ntk_fn(module, implementation="structured")(variables, x1, x2)
  f = lambda p, x: module.apply({"params": p}, x)
  assert_rel_close(k, reference_ntk(f, variables["params"], x1, x2), TOL64)
