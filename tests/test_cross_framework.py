"""One model, three frameworks: Haiku, linen and NNX with the same weights give the same NTK.

The Haiku models are ``models.py``'s ``mlp_relu`` and ``cnn2d`` (built with
``ntklayers.Linear`` / ``ntklayers.haiku.Conv2D``); the linen and NNX versions are
written with the ``ntklayers.flax`` drop-ins and get the Haiku parameters copied
in: Haiku ``w`` ``[in, out]`` is linen/NNX ``kernel``, ``b`` is ``bias``;
convolution weights are HWIO in all three. Forward passes agree (sanity check
of the copy), then kernels (float64) agree to ``rel_err <= 1e-10``, per layer
for the MLP.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import models
import models_flax
import ntklayers
import ntklayers.flax
from ntklayers.flax import linen as fl
from ntklayers.flax import nnx as fx
from reference import TOL64, assert_rel_close

F64 = jnp.float64


def _set(variable: nnx.Variable, value) -> None:
  variable.set_value(value) if hasattr(variable, "set_value") else setattr(
      variable, "value", value)


def _haiku(name: str):
  built = models.build(name)
  return built, ntklayers.ntk_fn(built.f, layerwise=True)(built.params, built.x1, built.x2)


def _assert_same_blocks(blocks, hk_blocks, names: dict[str, str]):
  """``names``: Haiku module -> Flax module."""
  assert sorted(blocks) == sorted(names.values())
  for hk_name, name in names.items():
    assert_rel_close(blocks[name], hk_blocks[hk_name], TOL64)
  assert_rel_close(sum(blocks.values()), sum(hk_blocks.values()), TOL64)


# -------------------------------------------------------------------- MLP ---

MLP_HK = ("linear", "linear_1", "linear_2")  # mlp_relu: 5 -> 16 -> 16 -> 3, relu


def test_mlp_haiku_linen_nnx_same_kernel():
  built, hk_blocks = _haiku("mlp_relu")
  p = built.params
  y_hk = built.f(p, built.x1)

  # linen: models_flax.LinenMLP has the same architecture.
  module = models_flax.LinenMLP(F64)
  variables = {"params": {f"Dense_{i}": {"kernel": p[m]["w"], "bias": p[m]["b"]}
                          for i, m in enumerate(MLP_HK)}}
  np.testing.assert_allclose(module.apply(variables, built.x1), y_hk, rtol=1e-13)
  blocks = ntklayers.flax.ntk_fn(module, layerwise=True)(variables, built.x1, built.x2)
  _assert_same_blocks(blocks, hk_blocks, {m: f"Dense_{i}" for i, m in enumerate(MLP_HK)})

  # NNX: models_flax.NnxMLP, parameters overwritten with Haiku's.
  model = models_flax.nnx_model(lambda rngs: models_flax.NnxMLP(F64, rngs), F64)
  for layer, m in zip(model.layers, MLP_HK):
    _set(layer.kernel, p[m]["w"])
    _set(layer.bias, p[m]["b"])
  np.testing.assert_allclose(model(built.x1), y_hk, rtol=1e-13)
  blocks = fx.ntk_fn(layerwise=True)(model, built.x1, built.x2)
  _assert_same_blocks(blocks, hk_blocks, {m: f"layers/{i}" for i, m in enumerate(MLP_HK)})


# -------------------------------------------------------------------- CNN ---

CNN_HK = ("conv2_d", "conv2_d_1", "conv2_d_2", "conv2_d_3", "linear")


class LinenHaikuCNN(nn.Module):
  """``models.cnn2d`` in linen: [N, 9, 9, 2] -> [N, 3]."""

  @nn.compact
  def __call__(self, x):
    kw = dict(param_dtype=F64)
    x = nn.relu(fl.Conv(4, (3, 3), strides=2, **kw)(x))
    x = nn.relu(fl.Conv(4, (3, 3), kernel_dilation=2, **kw)(x))
    x = nn.relu(fl.Conv(4, (3, 3), padding="VALID", feature_group_count=2, **kw)(x))
    x = nn.relu(fl.Conv(4, (2, 3), strides=(1, 2), padding=((1, 0), (0, 1)), **kw)(x))
    return fl.Dense(3, **kw)(x.reshape(x.shape[0], -1))


class NnxHaikuCNN(nnx.Module):
  """``models.cnn2d`` in NNX."""

  def __init__(self, rngs: nnx.Rngs):
    kw = dict(param_dtype=F64, rngs=rngs)
    self.convs = nnx.List([
        fx.Conv(2, 4, (3, 3), strides=2, **kw),
        fx.Conv(4, 4, (3, 3), kernel_dilation=2, **kw),
        fx.Conv(4, 4, (3, 3), padding="VALID", feature_group_count=2, **kw),
        fx.Conv(4, 4, (2, 3), strides=(1, 2), padding=((1, 0), (0, 1)), **kw),
    ])
    self.head = fx.Linear(12, 3, **kw)

  def __call__(self, x):
    for conv in self.convs:
      x = nnx.relu(conv(x))
    return self.head(x.reshape(x.shape[0], -1))


def test_cnn_haiku_linen_nnx_same_kernel():
  built = models.build("cnn2d")
  p = built.params
  k_hk = ntklayers.ntk_fn(built.f)(p, built.x1, built.x2)
  y_hk = built.f(p, built.x1)

  module = LinenHaikuCNN()
  flax_names = [f"Conv_{i}" for i in range(4)] + ["Dense_0"]
  variables = {"params": {n: {"kernel": p[m]["w"], "bias": p[m]["b"]}
                          for n, m in zip(flax_names, CNN_HK)}}
  assert jax.tree.map(jnp.shape, variables) == jax.tree.map(
      jnp.shape, jax.eval_shape(module.init, jax.random.key(0), built.x1))
  np.testing.assert_allclose(module.apply(variables, built.x1), y_hk, rtol=1e-12)
  k_linen = ntklayers.flax.ntk_fn(module)(variables, built.x1, built.x2)
  assert_rel_close(k_linen, k_hk, TOL64)

  model = models_flax.nnx_model(NnxHaikuCNN, F64)
  for layer, m in zip([*model.convs, model.head], CNN_HK):
    assert layer.kernel.shape == p[m]["w"].shape
    _set(layer.kernel, p[m]["w"])
    _set(layer.bias, p[m]["b"])
  np.testing.assert_allclose(model(built.x1), y_hk, rtol=1e-12)
  k_nnx = fx.ntk_fn()(model, built.x1, built.x2)
  assert_rel_close(k_nnx, k_hk, TOL64)
