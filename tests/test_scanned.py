"""Issue 9's target: a scanned, rematerialized 6-block transformer is structured and exact.

The architecture of ``benchmarks/bench_scan.py`` (``hk.layer_stack(6)`` of
``hk.remat`` pre-LN blocks; its linen twin ``nn.scan(nn.remat(Block))`` with stacked
params), shrunk to ``[N, T, D] = [3, 3, 8]`` and run in float64: every parameter is
in a structured group (none in the fallback) and the kernel matches the
whole-batch ``jax.jacrev`` reference to ``TOL64``.
"""

from __future__ import annotations

import flax.linen as nn
import haiku as hk
import jax
import jax.numpy as jnp
import pytest

import models
import models_flax
import ntklayers
import ntklayers.flax
import ntklayers.haiku as nh
from ntklayers.flax import linen as fl
from reference import TOL64, assert_rel_close, reference_ntk

BLOCKS, D = 6, 8


def _haiku_model(x):
  def block(h):
    a = nh.LayerNorm(-1, create_scale=True, create_offset=True)(h)
    h = h + nh.MultiHeadAttention(num_heads=2, key_size=D // 2,
                                  w_init=hk.initializers.VarianceScaling(1.0))(a, a, a)
    a = nh.LayerNorm(-1, create_scale=True, create_offset=True)(h)
    return h + ntklayers.Linear(D)(jax.nn.gelu(ntklayers.Linear(2 * D)(a)))

  x = ntklayers.Linear(D)(x)
  x = hk.layer_stack(BLOCKS)(hk.remat(block))(x)
  return ntklayers.Linear(3)(x.mean(axis=1))


class _Block(nn.Module):
  @nn.compact
  def __call__(self, x, _):
    pd = jnp.float64
    h = fl.LayerNorm(param_dtype=pd)(x)
    x = x + fl.MultiHeadDotProductAttention(num_heads=2, qkv_features=D, param_dtype=pd)(h)
    h = fl.LayerNorm(param_dtype=pd)(x)
    return x + fl.Dense(D, param_dtype=pd)(nn.gelu(fl.Dense(2 * D, param_dtype=pd)(h))), None


class _LinenModel(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = fl.Dense(D, param_dtype=jnp.float64)(x)
    stack = nn.scan(nn.remat(_Block), variable_axes={"params": 0},
                    split_rngs={"params": True}, length=BLOCKS)
    x, _ = stack()(x, None)
    return fl.Dense(3, param_dtype=jnp.float64)(x.mean(axis=1))


def _build(framework: str):
  x1, x2 = models.make_inputs((3, D), jnp.float64)
  if framework == "haiku":
    net = hk.without_apply_rng(hk.transform(_haiku_model))
    params = models.init_params(net.init, jnp.float64, x1)
    return net.apply, params, x1, x2, ntklayers.ntk_fn(net.apply)
  module = _LinenModel()
  params = models_flax.linen_variables(module, jnp.float64, x1)["params"]
  kernel_fn = ntklayers.flax.ntk_fn(module)
  return (lambda p, x: module.apply({"params": p}, x), params, x1, x2,
          lambda p, a, b: kernel_fn({"params": p}, a, b))


@pytest.mark.parametrize("framework", ["haiku", "linen"])
def test_scanned_six_block_transformer_is_structured_and_exact(framework):
  # linen's LayerNorm mixes float32 constants in: standard promotion, as in models_flax.
  with models_flax.flax_promotion(framework == "linen"):
    f, params, x1, x2, kernel_fn = _build(framework)
    cache = ntklayers.capture(f, params, x1)
    assert not cache.meta.plan.fallback, [g.name for g in cache.meta.plan.fallback]
    stacked = [g for g, calls in zip(cache.meta.plan.groups, cache.layers)
               if calls[0][0].shape[0] == BLOCKS]
    assert len(stacked) >= 8, cache.layer_names  # 2 LNs, q/k/v/out, 2 MLP layers a block
    assert_rel_close(kernel_fn(params, x1, x2), reference_ntk(f, params, x1, x2), TOL64)
