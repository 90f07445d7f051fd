"""``ntklayers.equinox.ntk_fn`` against the ``jax.jacrev`` reference (float64, 1e-10).

The plain kernel of every Equinox model of the registry (``models_stock_eqx``: an
``eqx.nn.MLP``, an ``eqx.nn.Conv2d`` CNN, ``eqx.nn.MultiheadAttention`` with
``eqx.nn.LayerNorm``, ``eqx.nn.Embedding``, ``RMSNorm``/``GroupNorm``, a stateful
``BatchNorm``) with every ``implementation`` is checked by ``test_registry``; this
file checks what is specific to the Equinox entry point: ``layerwise`` names
(attribute paths), ``trainable`` masks shaped like the model (Equinox's filter
specifications), model kwargs (a traced dropout key, a static ``inference``
flag), ``batched=True``, ``(model, state)`` and ``axis_name`` (BatchNorm in
training mode), float32, and that the older idiom (``eqx.partition`` and
``ntklayers.ntk_fn``) gives the same kernel.

Reference Jacobians are shared with ``test_registry`` through
``reference.batch_jacobians``' cache (keyed by the model's name). Which warnings a
model gets depends on how much of it the core recognizes: ntklayers' warnings are
ignored here (``test_registry`` tolerates them the same way).
"""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
import models_stock
import models_stock_eqx
import numpy as np
import pytest
from compile_log import log_compilations
from reference import (TOL32, TOL64, apply_axes, assert_rel_close, batch_jacobians,
                       flat_jacobian, full_kernel, mask_columns)

import ntklayers
import ntklayers.equinox

pytestmark = pytest.mark.filterwarnings("ignore:ntklayers")

EQX = [m for m in models_stock.stock_models() if m.framework == "equinox"]
FAST = {"equinox_stock_mlp", "equinox_stock_batchnorm_eval"}


def _jacobians(name: str):
  built = models_stock.build(name)
  return batch_jacobians(built.f, built.params, built.x1, built.x2, coupled=False,
                         cache_key=name)


@pytest.mark.parametrize("name", [
    pytest.param(m.name, id=m.name, marks=[] if m.name in FAST else [pytest.mark.slow])
    for m in EQX])
def test_layerwise_names_are_attribute_paths(name):
  """Keys are the modules' attribute paths (``layers/0``, ``att/query_proj``), the
  parts sum to the reference kernel; a stateful model is passed as (model, state)."""
  built = models_stock.build(name)
  parts = built.ntk_fn(layerwise=True)(built.x1, built.x2)
  assert sorted(parts) == sorted(built.layer_names)
  j1, j2 = _jacobians(name)
  assert_rel_close(sum(parts.values()), apply_axes(full_kernel(j1, j2), j1.ndim - 1), TOL64)


def _first_layer_mask(tree):
  """``tree`` (the model, or its filtered parameters) with True on ``layers[0]`` and
  on the last layer's bias, False elsewhere."""
  mask = jax.tree.map(lambda _: False, tree)
  mask = eqx.tree_at(lambda m: m.layers[0], mask, replace_fn=lambda s: jax.tree.map(
      lambda _: True, s))
  return eqx.tree_at(lambda m: m.layers[2].bias, mask, True)


def _masked_reference(params, mask, trace_axes=()):
  j1, j2 = _jacobians("equinox_stock_mlp")
  cols = mask_columns(params, mask)
  return apply_axes(full_kernel(j1[..., cols], j2[..., cols]), 2, trace_axes)


def test_trainable_filter_spec_and_trace_axes():
  """A mask shaped like the whole model (bools at every leaf, functions included:
  Equinox's filter specification) selects the parameters it marks."""
  built = models_stock.build("equinox_stock_mlp")
  model = built.extra["model"]
  k = ntklayers.equinox.ntk_fn(trainable=_first_layer_mask(model), trace_axes=(-1,))(
      model, built.x1, built.x2)
  ref = _masked_reference(built.params, _first_layer_mask(built.params), (-1,))
  assert k.shape == (3, 2)
  assert_rel_close(k, ref, TOL64)


@pytest.mark.slow
@pytest.mark.parametrize("form", ["params", "callable", "prefix"])
def test_trainable_other_forms(form):
  """A mask shaped like the filtered parameters, a callable of them, or a prefix
  (``{layers: (True, False, False)}``-like: a module with bools for whole layers)."""
  built = models_stock.build("equinox_stock_mlp")
  model, params = built.extra["model"], built.params
  if form == "params":
    mask, ref_mask = _first_layer_mask(params), _first_layer_mask(params)
  elif form == "callable":
    mask, ref_mask = _first_layer_mask, _first_layer_mask(params)
  else:
    mask = jax.tree.map(lambda _: False, model, is_leaf=lambda a: isinstance(
        a, eqx.nn.Linear))
    mask = eqx.tree_at(lambda m: m.layers[1], mask, True)
    ref_mask = jax.tree.map(lambda _: False, params)
    ref_mask = eqx.tree_at(lambda m: (m.layers[1].weight, m.layers[1].bias), ref_mask,
                           (True, True))
  k = ntklayers.equinox.ntk_fn(trainable=mask)(model, built.x1, built.x2)
  assert_rel_close(k, _masked_reference(params, ref_mask), TOL64)


def test_partition_idiom_gives_the_same_kernel():
  """``ntklayers.ntk_fn`` on ``eqx.partition``'s parameters (a module of floating
  arrays only, accepted as a pytree of parameters) equals the entry point's kernel."""
  built = models_stock.build("equinox_stock_mlp")
  k = ntklayers.ntk_fn(built.f)(built.params, built.x1, built.x2)
  j1, j2 = _jacobians("equinox_stock_mlp")
  assert_rel_close(k, apply_axes(full_kernel(j1, j2), 2), TOL64)


class Dropout(eqx.Module):
  """Linear, dropout, Linear; ``key=`` and ``inference=`` as Equinox layers take them."""

  inp: eqx.nn.Linear
  drop: eqx.nn.Dropout
  out: eqx.nn.Linear

  def __init__(self, key):
    k1, k2 = jax.random.split(key)
    self.inp = eqx.nn.Linear(3, 6, key=k1)
    self.drop = eqx.nn.Dropout(0.5)
    self.out = eqx.nn.Linear(6, 2, key=k2)

  def __call__(self, x, *, key=None, inference=False):
    return self.out(self.drop(jnp.tanh(self.inp(x)), key=key, inference=inference))


def _reference(model, x1, x2, **kwargs):
  params, static = eqx.partition(model, eqx.is_inexact_array)
  f = lambda p, x: jax.vmap(lambda xi: eqx.combine(p, static)(xi, **kwargs))(x)
  j = flat_jacobian(f, params, jnp.concatenate([x1, x2]))
  return apply_axes(full_kernel(j[:len(x1)], j[len(x1):]), 2)


def _dropout_case():
  model = Dropout(jax.random.key(0))
  rng = np.random.default_rng(0)
  return (model, *(jnp.asarray(rng.normal(size=(n, 3))) for n in (3, 2)))


def test_model_kwargs_key_is_traced():
  """A PRNG key is traced: a new key compiles nothing; the kernel is that of one
  fixed dropout mask (the same for every example)."""
  model, x1, x2 = _dropout_case()
  kernel_fn = ntklayers.equinox.ntk_fn()
  kernel_fn(model, x1, x2, key=jax.random.key(1))
  with log_compilations() as log:
    k = kernel_fn(model, x1, x2, key=jax.random.key(2))
  assert log.count("_jitted_kernel") == 0, log.names
  assert_rel_close(k, _reference(model, x1, x2, key=jax.random.key(2)), TOL64)


@pytest.mark.slow
def test_model_kwargs_inference_is_static():
  model, x1, x2 = _dropout_case()
  k = ntklayers.equinox.ntk_fn()(model, x1, x2, key=jax.random.key(2), inference=True)
  assert_rel_close(k, _reference(model, x1, x2, inference=True), TOL64)


class Batched(eqx.Module):
  """A model that takes the whole batch (its own vmap)."""

  mlp: eqx.nn.MLP

  def __call__(self, x):
    return jax.vmap(self.mlp)(x)


def test_batched_model():
  built = models_stock.build("equinox_stock_mlp")
  k = ntklayers.equinox.ntk_fn(batched=True)(Batched(built.extra["model"]), built.x1,
                                              built.x2)
  j1, j2 = _jacobians("equinox_stock_mlp")
  assert_rel_close(k, apply_axes(full_kernel(j1, j2), 2), TOL64)


@pytest.mark.slow
def test_batchnorm_training_mode_with_axis_name():
  """``axis_name`` names the vmapped batch axis: BatchNorm's batch statistics couple
  the examples (the reference differentiates each batch whole)."""
  built = models_stock.build("equinox_stock_batchnorm_eval")
  model, state = built.extra["model"], built.extra["state"]
  k = ntklayers.equinox.ntk_fn(axis_name="batch")((model, state), built.x1, built.x2,
                                                   inference=False)
  params, static = eqx.partition(model, eqx.is_inexact_array)

  def f(p, x):
    def one(xi):
      return eqx.combine(p, static)(xi, jax.tree.map(lambda a: a, state),
                                    inference=False)[0]
    with jax.numpy_dtype_promotion("standard"):
      return jax.vmap(one, axis_name="batch")(x)

  ref = apply_axes(full_kernel(flat_jacobian(f, params, built.x1),
                               flat_jacobian(f, params, built.x2)), 2)
  assert_rel_close(k, ref, TOL64)


@pytest.mark.slow
def test_float32():
  """An MLP in float32 against the float64 reference of the same values."""
  make = lambda dtype, key: models_stock_eqx._mlp(dtype, key)
  built32 = models_stock_eqx.eqx_build(make, (5,), ())(jnp.float32)
  k = built32.ntk_fn()(built32.x1, built32.x2)
  assert k.dtype == jnp.float32
  j1, j2 = _jacobians("equinox_stock_mlp")  # the same NumPy values in float64
  assert_rel_close(k, apply_axes(full_kernel(j1, j2), 2), TOL32)


class Scaled(eqx.Module):
  """A weakly typed scalar parameter (``jnp.asarray(0.5)``): inexact, so
  differentiated (inside ``jax.jit`` it looks like a Python float would)."""

  linear: eqx.nn.Linear
  alpha: jax.Array

  def __call__(self, x):
    return self.alpha * jnp.tanh(self.linear(x))


def test_weakly_typed_scalar_parameter():
  model = Scaled(eqx.nn.Linear(3, 2, key=jax.random.key(0)), jnp.asarray(0.5))
  assert model.alpha.weak_type
  _, x1, x2 = _dropout_case()
  k = ntklayers.equinox.ntk_fn()(model, x1, x2)
  assert_rel_close(k, _reference(model, x1, x2), TOL64)
