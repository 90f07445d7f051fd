"""Public API behaviour: jit, caching, dtypes, capture/contract, summed logits, weight
sharing and samples that interact (warnings: ``test_api_warnings.py``)."""

from __future__ import annotations

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import models
import ntklayers
import ntklayers.haiku as nh
from reference import (TOL64, assert_rel_close, flat_jacobian, full_kernel, reference_ntk,
                       rel_err)


def jit_capture(f, **opts):
  """``ntklayers.capture`` under ``jax.jit`` (op-by-op it compiles every small op)."""
  return jax.jit(lambda params, x: ntklayers.capture(f, params, x, **opts))


jit_contract = jax.jit(ntklayers.contract,
                       static_argnames=("trace_axes", "diagonal_axes", "layerwise"))


def _ref(built, x2="x2", **kw):
  return reference_ntk(built.f, built.params, built.x1,
                       built.x2 if x2 == "x2" else x2, **kw)


# --------------------------------------------------------------------- jit ---


def test_jit_of_kernel_fn():
  built = models.build("mlp_relu")
  kernel_fn = ntklayers.ntk_fn(built.f, trace_axes=(-1,))
  k = jax.jit(kernel_fn)(built.params, built.x1, built.x2)
  assert k.shape == (models.N1, models.N2)
  assert_rel_close(k, _ref(built, trace_axes=(-1,)), TOL64)
  k_same = jax.jit(kernel_fn)(built.params, built.x1)
  assert_rel_close(k_same, _ref(built, x2=None, trace_axes=(-1,)), TOL64)


def test_no_retrace_on_second_call_with_same_shapes():
  built = models.build("mlp_mixed_hk_linear")
  calls = [0]
  n_calls = lambda: calls[0]

  def f(params, x):
    calls[0] += 1  # counts Python calls, i.e. traces
    return built.f(params, x)

  kernel_fn = ntklayers.ntk_fn(f)
  kernel_fn(built.params, built.x1, built.x2)
  traced = n_calls()
  assert traced > 0
  kernel_fn(built.params, 2.0 * built.x1, built.x2 + 1.0)  # new values, same shapes
  new_params = jax.tree.map(lambda a: 0.5 * a, built.params)
  kernel_fn(new_params, built.x1, built.x2)
  assert n_calls() == traced, "kernel_fn retraced f for inputs of the same shapes"
  kernel_fn(built.params, built.x1[:2], built.x2)  # a new batch size does retrace
  assert n_calls() > traced


def test_kernel_is_symmetric_for_x2_none():
  built = models.build("conv1d_seq")
  k = ntklayers.ntk_fn(built.f)(built.params, built.x1)
  k_explicit = ntklayers.ntk_fn(built.f)(built.params, built.x1, built.x1)
  assert k.shape == (3, 3, 6, 6, 4, 4)
  np.testing.assert_allclose(k, np.transpose(k, (1, 0, 3, 2, 5, 4)), rtol=1e-12, atol=1e-14)
  assert_rel_close(k, k_explicit, 1e-12)


def test_ntk_one_shot_equals_ntk_fn():
  built = models.build("conv1d_seq")
  opts = dict(trace_axes=(-1,), implementation="structured")
  k1 = ntklayers.ntk(built.f, built.params, built.x1, built.x2, **opts)
  k2 = ntklayers.ntk_fn(built.f, **opts)(built.params, built.x1, built.x2)
  np.testing.assert_array_equal(k1, k2)


# ------------------------------------------------------------------ dtypes ---


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("implementation", ["auto", "ntk_vp", "jacobian"])
def test_output_dtype_follows_inputs(dtype, implementation):
  built = models.build("mlp_mixed_hk_linear", dtype)
  assert built.x1.dtype == dtype
  assert all(p.dtype == dtype for p in jax.tree.leaves(built.params))
  k = ntklayers.ntk(built.f, built.params, built.x1, built.x2,
                    implementation=implementation)
  assert k.dtype == dtype
  blocks = ntklayers.ntk(built.f, built.params, built.x1, layerwise=True,
                         implementation=implementation)
  assert {v.dtype for v in blocks.values()} == {jnp.dtype(dtype)}


def test_integer_token_inputs():
  built = models.build("embed_tokens")
  assert jnp.issubdtype(built.x1.dtype, jnp.integer)
  k = jax.jit(ntklayers.ntk_fn(built.f))(built.params, built.x1, built.x2)
  assert k.dtype == jnp.float64
  assert_rel_close(k, _ref(built), TOL64)
  cache = jit_capture(built.f)(built.params, built.x1)
  assert_rel_close(jit_contract(cache), _ref(built, x2=None), TOL64)


# -------------------------------------------------------- capture/contract ---


def test_capture_contract_equals_kernel_fn():
  built = models.build("conv1d_seq")
  f, p = built.f, built.params
  capture = jit_capture(f)
  c1 = capture(p, built.x1)
  c2 = capture(p, built.x2)
  assert isinstance(c1, ntklayers.Factors)
  assert c1.batch_size == models.N1 and c2.batch_size == models.N2
  assert c1.layer_names == ("conv1_d", "conv1_d_1")
  kernel_fn = ntklayers.ntk_fn(f)
  assert_rel_close(jit_contract(c1, c2), kernel_fn(p, built.x1, built.x2), 1e-12)
  k11 = kernel_fn(p, built.x1)
  assert_rel_close(jit_contract(c1), k11, 1e-12)
  assert_rel_close(jit_contract(c1, c1), k11, 1e-12)
  # Options of contract (an int is accepted for a single axis).
  ref = _ref(built, trace_axes=(-1,))
  assert_rel_close(jit_contract(c1, c2, trace_axes=-1), ref, TOL64)
  blocks = jit_contract(c1, c2, layerwise=True, diagonal_axes=(1,))
  assert set(blocks) == {"conv1_d", "conv1_d_1"}
  assert_rel_close(sum(blocks.values()), _ref(built, diagonal_axes=(1,)), TOL64)


def test_capture_contract_without_jit():
  built = models.build("mlp_tanh_nobias")
  c1 = ntklayers.capture(built.f, built.params, built.x1)
  c2 = ntklayers.capture(built.f, built.params, built.x2)
  assert_rel_close(ntklayers.contract(c1, c2, trace_axes=(-1,)),
                   _ref(built, trace_axes=(-1,)), TOL64)


def test_capture_probe_once_contract_against_two_batches():
  built = models.build("conv1d_seq")
  f, p = built.f, built.params
  rng = np.random.default_rng(7)
  probe = jnp.asarray(rng.normal(size=(2, 6, 3)))
  batch_a, batch_b = built.x1, jnp.asarray(rng.normal(size=(4, 6, 3)))
  capture, contract = jit_capture(f), jit_contract
  c_probe = capture(p, probe)
  kernel_fn = ntklayers.ntk_fn(f, trace_axes=(-1,))
  for batch in (batch_a, batch_b):
    c = capture(p, batch)
    got = contract(c, c_probe, trace_axes=(-1,))
    assert got.shape == (batch.shape[0], 2, 6, 6)
    assert_rel_close(got, kernel_fn(p, batch, probe), 1e-12)
    assert_rel_close(got, reference_ntk(f, p, batch, probe, trace_axes=(-1,)), TOL64)


@pytest.mark.parametrize("implementation", ["ntk_vp", "jacobian"])
def test_capture_contract_generic_implementations(implementation):
  built = models.build("mlp_mixed_hk_linear")
  capture = jit_capture(built.f, implementation=implementation)
  c1 = capture(built.params, built.x1)
  c2 = capture(built.params, built.x2)
  assert_rel_close(jit_contract(c1, c2), _ref(built), TOL64)


# ----------------------------------------------------------- summed_logits ---


@pytest.mark.parametrize("name", ["mlp_relu", "conv1d_seq"])
def test_summed_logits(name):
  built = models.build(name)
  g = ntklayers.summed_logits(built.f)
  assert g(built.params, built.x1).shape == (models.N1,)
  k = ntklayers.ntk(g, built.params, built.x1, built.x2)
  assert k.shape == (models.N1, models.N2)
  # Reference: gradients of the summed outputs, from the full Jacobians of f.
  j1 = flat_jacobian(built.f, built.params, built.x1)
  j2 = flat_jacobian(built.f, built.params, built.x2)
  s1 = j1.reshape(models.N1, -1, j1.shape[-1]).sum(axis=1)
  s2 = j2.reshape(models.N2, -1, j2.shape[-1]).sum(axis=1)
  assert_rel_close(k, s1 @ s2.T, TOL64)
  # ... which is the full kernel of f summed over every output pair.
  rest = j1[0, ..., 0].size
  full = full_kernel(j1, j2).reshape(models.N1, rest, models.N2, rest).sum(axis=(1, 3))
  assert_rel_close(k, full, TOL64)


# --------------------------------------------------- weight sharing, BatchNorm ---


def test_weight_shared_module_cross_terms():
  """The block of a module called twice includes the cross terms between calls."""
  built = models.build("weight_shared")
  blocks = ntklayers.ntk(built.f, built.params, built.x1, built.x2, layerwise=True)
  assert "shared" in blocks
  only_shared = {m: {n: m == "shared" for n in v} for m, v in built.params.items()}
  ref = _ref(built, mask=only_shared)
  assert_rel_close(blocks["shared"], ref, TOL64)
  # Both calls form one structured group (not two, and not the fallback).
  cache = jit_capture(built.f)(built.params, built.x1)
  assert cache.layer_names.count("shared") == 1


def _shared_different_shapes(x):
  lin = ntklayers.Linear(4, name="shared_linear")
  conv = nh.Conv1D(3, 2, name="shared_conv")
  a = jnp.tanh(lin(x))                                   # [N, 5] -> [N, 4]
  b = jnp.sum(jnp.tanh(lin(jnp.stack([x, 2 * x], 1))), 1)  # [N, 2, 5] -> [N, 4]
  img = x.reshape(x.shape[0], 5, 1)
  c = jnp.mean(jnp.tanh(conv(img)), 1) + jnp.mean(conv(img[:, :3]), 1)  # [N, 3]
  return jnp.concatenate([a + b, c], axis=-1)


@pytest.mark.parametrize("implementation", ["auto", "structured"])
def test_weight_shared_calls_of_different_shapes(implementation):
  net = hk.without_apply_rng(hk.transform(_shared_different_shapes))
  x1, x2 = models.make_inputs((5,), jnp.float64)
  params = models.init_params(net.init, jnp.float64, x1)
  blocks = ntklayers.ntk(net.apply, params, x1, x2, layerwise=True,
                         implementation=implementation)
  assert set(blocks) == {"shared_linear", "shared_conv"}
  assert_rel_close(sum(blocks.values()), reference_ntk(net.apply, params, x1, x2), TOL64)


def _batch_centering(x):
  """Examples interact without a BatchNorm: nothing for ntklayers to detect."""
  h = ntklayers.Linear(6)(x)
  h = h - jnp.mean(h, axis=0, keepdims=True)
  return ntklayers.Linear(2)(jnp.tanh(h))


@pytest.mark.parametrize("implementation", ["auto", "jacobian"])
def test_independent_samples_false_declares_custom_coupling(implementation):
  net = hk.without_apply_rng(hk.transform(_batch_centering))
  x1, x2 = models.make_inputs((5,), jnp.float64)
  params = models.init_params(net.init, jnp.float64, x1)
  k = ntklayers.ntk(net.apply, params, x1, x2, independent_samples=False,
                    implementation=implementation)
  assert_rel_close(k, reference_ntk(net.apply, params, x1, x2), TOL64)


def _per_example_reference(built):
  """What the kernel would be if examples did not interact (each alone in a batch)."""
  js = [flat_jacobian(built.f, built.params, built.x1[i:i + 1]) for i in range(models.N1)]
  j1 = np.concatenate(js, axis=0)
  return np.transpose(full_kernel(j1, j1), (0, 2, 1, 3))


@pytest.mark.parametrize("implementation", ["auto", "structured", "ntk_vp"])
def test_batchnorm_training_mode_detected_and_exact(implementation):
  built = models.build("batchnorm_train")
  k = ntklayers.ntk(built.f, built.params, built.x1, implementation=implementation)
  ref = _ref(built, x2=None)
  assert_rel_close(k, ref, TOL64)
  # The model's examples really interact, so ignoring it would be wrong.
  assert rel_err(_per_example_reference(built), ref) > 1e-2


def test_batchnorm_training_declared_coupling_matches_detected():
  built = models.build("batchnorm_train")
  declared = ntklayers.ntk(built.f, built.params, built.x1, built.x2,
                           independent_samples=False)
  assert_rel_close(declared, _ref(built), TOL64)


@pytest.mark.parametrize("name", ["mlp_relu", "conv1d_seq"])
def test_independent_samples_false_on_independent_model_is_exact(name):
  built = models.build(name)
  k = ntklayers.ntk(built.f, built.params, built.x1, built.x2, independent_samples=False)
  assert_rel_close(k, _ref(built), TOL64)
  k_true = ntklayers.ntk(built.f, built.params, built.x1, built.x2,
                         independent_samples=True)
  assert_rel_close(k_true, _ref(built), TOL64)
