"""Tests of ``ntklayers.init``: NTK-calibrated per-layer scales and LSUV."""

from __future__ import annotations

import flax.linen as nn
import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.tree_util import DictKey

import ntklayers
import ntklayers.init as ni
import ntklayers.metrics as nm

DEPTH, WIDTH, N, D_IN = 3, 16, 12, 5


def _mlp(x):
  for _ in range(DEPTH):
    x = jnp.tanh(ntklayers.Linear(WIDTH)(x))
  return ntklayers.Linear(3)(x)


NET = hk.without_apply_rng(hk.transform(_mlp))


def _setup(dtype=jnp.float64, seed=0):
  x = jax.random.normal(jax.random.key(100), (N, D_IN), dtype)
  return NET.init(jax.random.key(seed), x), x


def _stats(params, x):
  K = ntklayers.ntk(NET.apply, params, x, trace_axes=(-1,))
  return float(nm.trace(K)) / N, float(nm.condition_number(K))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64])
def test_calibrate_keeps_structure_and_dtypes(dtype):
  params, x = _setup(dtype)
  new = ni.calibrate(NET.apply, params, x, steps=5)
  assert jax.tree.structure(new) == jax.tree.structure(params)
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(new)):
    assert a.shape == b.shape and a.dtype == b.dtype == dtype


def test_calibrate_moves_scale_to_target_and_lowers_kappa():
  params, x = _setup()  # default init: tr K / N ≈ 9, κ ≈ 250
  tr0, kappa0 = _stats(params, x)
  new, scales, history = ni.calibrate(NET.apply, params, x, steps=150, target_trace=1.0,
                                      return_scales=True, return_history=True)
  tr1, kappa1 = _stats(new, x)
  assert abs(np.log(tr1)) < 0.6 * abs(np.log(tr0))
  assert kappa1 < 0.85 * kappa0
  assert float(history["final"]["loss"]) < float(history["loss"][0])
  assert history["loss"].shape == (150,)
  np.testing.assert_allclose(float(history["final"]["log_mean"]), np.log(tr1), rtol=1e-6)


def test_scales_are_applied_per_layer():
  params, x = _setup()
  new, scales = ni.calibrate(NET.apply, params, x, steps=20, return_scales=True)
  assert sorted(scales) == sorted(params)  # one scale per Haiku module
  assert len(set(scales.values())) == len(scales)  # fitted independently
  for layer, leaves in params.items():
    for name, leaf in leaves.items():
      np.testing.assert_allclose(new[layer][name], leaf * scales[layer], rtol=1e-12)
  again = ni.scale_params(params, scales)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-12), again, new)


def test_custom_grouping_and_unscaled_leaves():
  params, x = _setup()
  only_w = lambda path: "all_w" if path[-1].key == "w" else None
  new, scales = ni.calibrate(NET.apply, params, x, steps=10, group_fn=only_w,
                             return_scales=True)
  assert list(scales) == ["all_w"]
  for layer in params:
    np.testing.assert_array_equal(new[layer]["b"], params[layer]["b"])
    np.testing.assert_allclose(new[layer]["w"], params[layer]["w"] * scales["all_w"],
                               rtol=1e-12)


def test_target_modes():
  params, x = _setup()
  tr0, _ = _stats(params, x)
  new = ni.calibrate(NET.apply, params, x, steps=100, target_trace="init",
                     cond_weight=0.1, scale_reg=0.0)
  assert abs(np.log(_stats(new, x)[0] / tr0)) < 0.1
  with pytest.raises(ValueError, match="target_trace"):
    ni.calibrate(NET.apply, params, x, target_trace="mean")
  with pytest.raises(ValueError, match="steps >= 1"):
    ni.calibrate(NET.apply, params, x, steps=0)


def test_calibrate_is_deterministic():
  params, x = _setup()
  a = ni.calibrate(NET.apply, params, x, steps=30)
  b = ni.calibrate(NET.apply, params, x, steps=30)
  jax.tree.map(np.testing.assert_array_equal, a, b)


def test_calibrate_linen_groups():
  class MLP(nn.Module):

    @nn.compact
    def __call__(self, x):
      return nn.Dense(2)(jnp.tanh(nn.Dense(8)(x)))

  model = MLP()
  x = jax.random.normal(jax.random.key(1), (6, 3), jnp.float32)  # linen params are f32
  params = model.init(jax.random.key(0), x)["params"]
  f = lambda p, x: model.apply({"params": p}, x)
  new, scales = ni.calibrate(f, params, x, steps=10, return_scales=True)
  assert sorted(scales) == ["Dense_0", "Dense_1"]
  np.testing.assert_allclose(new["Dense_1"]["kernel"],
                             params["Dense_1"]["kernel"] * scales["Dense_1"], rtol=1e-6)


def test_module_path():
  assert ni.module_path((DictKey("mlp/~/linear"), DictKey("w"))) == "mlp/~/linear"
  assert ni.module_path((DictKey("params"), DictKey("A_0"), DictKey("Dense_0"),
                         DictKey("kernel"))) == "A_0/Dense_0"
  assert ni.module_path((DictKey("batch_stats"), DictKey("BN_0"), DictKey("mean"))) is None
  assert ni.module_path((DictKey("bias"),)) == "bias"


def test_objective_terms():
  K = jnp.diag(jnp.array([4.0, 2.0, 1.0], jnp.float64))
  log_mean, log_kappa = ni.objective_terms(K, ridge=1e-3)
  r = 1e-3 * 7 / 3
  np.testing.assert_allclose(float(log_mean), np.log(7 / 3), rtol=1e-12)
  np.testing.assert_allclose(float(log_kappa), np.log((4 + r) / (1 + r)), rtol=1e-12)


def _hk_mlp(x):
  for width in (32, 32, 32):
    x = jnp.tanh(hk.Linear(width)(x))
  return hk.Linear(4)(x)


HK_NET = hk.without_apply_rng(hk.transform(_hk_mlp))


def test_lsuv_unit_variance_per_layer():
  x = jax.random.normal(jax.random.key(3), (64, 6), jnp.float64) * 3.0
  params = HK_NET.init(jax.random.key(0), x)
  new, var = ni.lsuv(HK_NET.apply, params, x, key=jax.random.key(1),
                     return_variances=True)
  assert list(var) == ["linear", "linear_1", "linear_2", "linear_3"]  # forward order
  measured = ni.layer_variances(HK_NET.apply, new, x)
  assert list(measured) == list(var)
  for name, v in measured.items():
    assert abs(float(v) - 1.0) < 0.1, (name, float(v))
    np.testing.assert_allclose(float(v), var[name], rtol=1e-9)
  assert jax.tree.structure(new) == jax.tree.structure(params)
  for layer in params:  # biases untouched; weights are rescaled orthonormal matrices
    np.testing.assert_array_equal(new[layer]["b"], params[layer]["b"])
    w = np.asarray(new[layer]["w"])
    gram = w.T @ w if w.shape[0] >= w.shape[1] else w @ w.T
    np.testing.assert_allclose(gram / gram[0, 0], np.eye(len(gram)), atol=1e-10)
    assert new[layer]["w"].dtype == params[layer]["w"].dtype


def test_lsuv_with_ntklayers_linear_and_without_orthonormal():
  params, x = _setup()
  new = ni.lsuv(NET.apply, params, x, key=jax.random.key(0), orthonormal=False)
  for layer in params:  # only rescaled: w is a positive multiple of the original
    ratio = np.asarray(new[layer]["w"]) / np.asarray(params[layer]["w"])
    np.testing.assert_allclose(ratio, ratio.flat[0], rtol=1e-10)
  for v in ni.layer_variances(NET.apply, new, x).values():
    assert abs(float(v) - 1.0) < 0.1


def test_lsuv_is_deterministic():
  x = jax.random.normal(jax.random.key(3), (32, 6), jnp.float64)
  params = HK_NET.init(jax.random.key(0), x)
  a = ni.lsuv(HK_NET.apply, params, x, key=jax.random.key(7))
  b = ni.lsuv(HK_NET.apply, params, x, key=jax.random.key(7))
  c = ni.lsuv(HK_NET.apply, params, x, key=jax.random.key(8))
  jax.tree.map(np.testing.assert_array_equal, a, b)
  assert not np.array_equal(a["linear"]["w"], c["linear"]["w"])


def test_lsuv_errors():
  net = hk.without_apply_rng(hk.transform(lambda x: 2.0 * x))
  x = jnp.ones((3, 2), jnp.float64)
  with pytest.raises(ValueError, match="no module with a `w`"):
    ni.lsuv(net.apply, net.init(jax.random.key(0), x), x, key=jax.random.key(0))
  with pytest.raises(ValueError, match="tol > 0"):
    ni.lsuv(net.apply, {}, x, key=jax.random.key(0), tol=0.0)
