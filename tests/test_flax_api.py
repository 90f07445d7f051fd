"""Behaviour of the Flax entry points: structured vs fallback, no retracing, apply
kwargs, errors.

``ntklayers.flax.ntk_fn(module)(variables, x1, x2=None, **apply_kwargs)`` (linen)
and ``ntklayers.flax.nnx.ntk_fn()(model, x1, x2=None)`` (NNX). Kernels are
checked against ``reference.py`` in float64 (``rel_err <= 1e-10``). What they make
of particular layers (nested modules, norms, BatchNorm, masked convs) is in
``test_flax_api_layers.py``.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import models
import models_flax
import ntklayers
import ntklayers.flax
from ntklayers.flax import linen as fl
from ntklayers.flax import nnx as fx
from reference import TOL64, assert_rel_close, reference_ntk

F64 = jnp.float64


def _inputs(x_shape=(5,)):
  return models.make_inputs(x_shape, F64)


# ------------------------------------------------ structured vs fallback ---

# Parameters of plain (not annotated) Flax modules, by model: exact fallback.
PLAIN = {
    "linen_mixed_plain": {"Dense_1", "LayerNorm_0"},
    "linen_batchnorm_eval": {"BatchNorm_0"}, "linen_batchnorm_train": {"BatchNorm_0"},
    "linen_embed": {"Embed_0"},
    "nnx_mixed_plain": {"plain", "plain_ln"},
    "nnx_batchnorm_eval": {"bn"}, "nnx_batchnorm_train": {"bn"},
    "nnx_embed": {"embed"},
}


@pytest.mark.parametrize("model", [pytest.param(m, id=m.name)
                                   for m in models_flax.FLAX_MODELS])
def test_drop_ins_are_structured_plain_modules_fall_back(model):
  """Every drop-in is captured from factors (no silent fallback: the kernel would
  still be exact, so the exactness tests cannot tell); with
  ``structure="annotated"`` plain modules are not, and by default the dense,
  norm and embedding equations of plain modules are recognized (BatchNorm's
  running statistics divide the input, not the scale: its offset alone is).
  Checked on the capture's static plan, under ``jax.eval_shape`` (no compilation)."""
  built = models_flax.build(model.name)

  def names(structure):
    with models_flax.flax_promotion(built.extra["standard"]):
      cache = jax.eval_shape(lambda p, x: ntklayers.capture(built.f, p, x,
                                                            structure=structure),
                             built.params, built.x1)
    return set(cache.layer_names)

  plain = PLAIN.get(model.name, set())
  assert plain <= set(built.layer_names)
  assert names("annotated") == set(built.layer_names) - plain
  assert names("auto") >= set(built.layer_names) - plain


# ------------------------------------------------------------- no retrace ---


# Python executions of the models' ``__call__`` (i.e. traces), by model name.
TRACES: dict[str, int] = {}


def _trace(name: str) -> None:
  TRACES[name] = TRACES.get(name, 0) + 1


class CountingLinen(nn.Module):

  @nn.compact
  def __call__(self, x):
    _trace("CountingLinen")
    return fl.Dense(3, param_dtype=F64)(jnp.tanh(fl.Dense(8, param_dtype=F64)(x)))


class CountingNnx(nnx.Module):

  def __init__(self, rngs: nnx.Rngs):
    self.inp = fx.Linear(5, 8, param_dtype=F64, rngs=rngs)
    self.out = fx.Linear(8, 3, param_dtype=F64, rngs=rngs)

  def __call__(self, x):
    _trace("CountingNnx")
    return self.out(jnp.tanh(self.inp(x)))


def test_linen_no_retrace_on_second_call_with_same_shapes():
  module = CountingLinen()
  x1, x2 = _inputs()
  variables = models_flax.linen_variables(module, F64, x1)
  kernel_fn = ntklayers.flax.ntk_fn(module)
  before = TRACES.get("CountingLinen", 0)
  k = kernel_fn(variables, x1, x2)
  traces = TRACES["CountingLinen"]
  assert traces > before
  # Same shapes, other values (inputs and parameters): no new trace.
  variables2 = jax.tree.map(lambda a: 2 * a, variables)
  x1b, x2b = x1 + 1.0, x2 - 1.0
  k2 = kernel_fn(variables2, x1b, x2b)
  assert TRACES["CountingLinen"] == traces
  assert not np.allclose(k, k2)
  # The counter does count traces: another batch size retraces.
  kernel_fn(variables, x1[:1], x2)
  assert TRACES["CountingLinen"] > traces
  f = lambda p, x: module.apply({"params": p}, x)
  assert_rel_close(k2, reference_ntk(f, variables2["params"], x1b, x2b), TOL64)


def test_nnx_no_retrace_on_second_call_with_same_shapes():
  model = models_flax.nnx_model(CountingNnx, F64)
  x1, x2 = _inputs()
  kernel_fn = fx.ntk_fn()
  before = TRACES.get("CountingNnx", 0)
  k = kernel_fn(model, x1, x2)
  traces = TRACES["CountingNnx"]
  assert traces > before
  # Updated parameter values (e.g. after a training step): no new trace.
  for layer in (model.inp, model.out):
    layer.kernel.set_value(2 * layer.kernel.get_value())
  k2 = kernel_fn(model, x1 + 1.0, x2)
  assert TRACES["CountingNnx"] == traces
  assert not np.allclose(k, k2)
  # The split form of the same model: no new trace either.
  kernel_fn(nnx.split(model, nnx.Param, ...), x1, x2)
  assert TRACES["CountingNnx"] == traces
  kernel_fn(model, x1[:1], x2)
  assert TRACES["CountingNnx"] > traces


# ------------------------------------------------------------ apply kwargs ---


class TrainFlag(nn.Module):
  """Static ``train`` flag and array ``scale`` kwarg, both passed through ``apply``."""

  @nn.compact
  def __call__(self, x, train: bool = False, scale=None):
    _trace("TrainFlag")
    h = fl.Dense(8, param_dtype=F64)(x)
    h = jax.nn.relu(h) if train else jnp.tanh(h)
    out = fl.Dense(3, param_dtype=F64)(h)
    return out if scale is None else out * scale[None, :]


def test_linen_apply_kwargs_pass_through():
  module = TrainFlag()
  x1, x2 = _inputs()
  variables = models_flax.linen_variables(module, F64, x1)
  params = variables["params"]
  kernel_fn = ntklayers.flax.ntk_fn(module)

  def ref(**kw):
    return reference_ntk(lambda p, x: module.apply({"params": p}, x, **kw), params, x1, x2)

  k_eval = kernel_fn(variables, x1, x2)
  k_train = kernel_fn(variables, x1, x2, train=True)
  assert_rel_close(k_eval, ref(), TOL64)
  assert_rel_close(k_train, ref(train=True), TOL64)
  assert not np.allclose(k_eval, k_train)
  # An array kwarg is traced: new values, no new trace; the kernel scales by scale**2.
  scale = jnp.asarray([1.0, 2.0, 3.0], F64)
  k_scaled = kernel_fn(variables, x1, x2, train=True, scale=scale)
  traces = TRACES["TrainFlag"]
  k_scaled2 = kernel_fn(variables, x1, x2, train=True, scale=2 * scale)
  assert TRACES["TrainFlag"] == traces
  outer = np.asarray(scale)[:, None] * np.asarray(scale)[None, :]
  np.testing.assert_allclose(k_scaled, np.asarray(k_train) * outer, rtol=1e-12)
  np.testing.assert_allclose(k_scaled2, 4 * k_scaled, rtol=1e-12)


def test_linen_method_kwarg():
  class TwoHeads(nn.Module):
    def setup(self):
      self.body = fl.Dense(8, param_dtype=F64)
      self.a = fl.Dense(3, param_dtype=F64)
      self.b = fl.Dense(2, param_dtype=F64)

    def __call__(self, x):
      h = jnp.tanh(self.body(x))
      return self.a(h) + jnp.sum(self.b(h), axis=-1, keepdims=True)

    def head_b(self, x):
      return self.b(jnp.tanh(self.body(x)))

  module = TwoHeads()
  x1, x2 = _inputs()
  variables = models_flax.linen_variables(module, F64, x1)
  blocks = ntklayers.flax.ntk_fn(module, method="head_b", layerwise=True)(variables, x1, x2)
  # `a` is a parameter that head_b does not use: an exact zero block.
  assert sorted(blocks) == ["a", "b", "body"]
  np.testing.assert_array_equal(blocks["a"], 0.0)
  f = lambda p, x: module.apply({"params": p}, x, method="head_b")
  assert_rel_close(sum(blocks.values()), reference_ntk(f, variables["params"], x1, x2),
                   TOL64)


class DropoutNet(nn.Module):
  """Dropout between annotated layers: ``train=True`` needs ``rngs={"dropout": key}``."""

  @nn.compact
  def __call__(self, x, train: bool = False):
    _trace("DropoutNet")
    h = jnp.tanh(fl.Dense(8, param_dtype=F64)(x))
    h = nn.Dropout(0.5, deterministic=not train)(h)
    return fl.Dense(3, param_dtype=F64)(h)


@pytest.mark.parametrize("new_style", [True, False], ids=["key", "PRNGKey"])
def test_linen_dropout_rngs_kwarg_is_traced_and_exact(new_style):
  """``rngs={"dropout": key}`` (a dict holding a key array) is traced: the kernel is
  the exact kernel of the deterministic function for that key, and new keys of the
  same shape reuse the compiled function."""
  make_key = jax.random.key if new_style else jax.random.PRNGKey
  module = DropoutNet()
  x1, x2 = _inputs()
  variables = models_flax.linen_variables(module, F64, x1)
  params = variables["params"]
  kernel_fn = ntklayers.flax.ntk_fn(module)
  key1, key2 = make_key(1), make_key(2)

  def f_for(key):
    return lambda p, x: module.apply({"params": p}, x, train=True, rngs={"dropout": key})

  k1 = kernel_fn(variables, x1, x2, train=True, rngs={"dropout": key1})
  traces = TRACES["DropoutNet"]
  k2 = kernel_fn(variables, x1, x2, train=True, rngs={"dropout": key2})
  assert TRACES["DropoutNet"] == traces  # a new key value: no new trace
  assert_rel_close(k1, reference_ntk(f_for(key1), params, x1, x2), TOL64)
  assert_rel_close(k2, reference_ntk(f_for(key2), params, x1, x2), TOL64)
  assert not np.allclose(k1, k2)  # the masks differ, so dropout is active
  # Eval mode (static train=False, no rngs) is another function.
  k_eval = kernel_fn(variables, x1, x2)
  assert_rel_close(k_eval, reference_ntk(lambda p, x: module.apply({"params": p}, x),
                                         params, x1, x2), TOL64)


class PlainDropoutNet(nn.Module):
  """A plain ``nn.Dense`` (exact fallback) before the dropout."""

  @nn.compact
  def __call__(self, x, train: bool = False):
    h = jnp.tanh(nn.Dense(8, param_dtype=F64)(x))
    h = nn.Dropout(0.5, deterministic=not train)(h)
    return fl.Dense(3, param_dtype=F64)(h)


@pytest.mark.parametrize("module,implementation", [
    (DropoutNet(), "structured"), (DropoutNet(), "ntk_vp"),
    (DropoutNet(), "jacobian"), (PlainDropoutNet(), "auto"),
    (PlainDropoutNet(), "structured"),
    (PlainDropoutNet(), "ntk_vp"),
], ids=["structured", "ntk_vp", "jacobian", "plain-auto", "plain-structured", "plain-ntk_vp"])
def test_linen_dropout_rngs_kwarg_other_implementations(module, implementation):
  x1, x2 = _inputs()
  variables = models_flax.linen_variables(module, F64, x1)
  key = jax.random.key(1)
  f = lambda p, x: module.apply({"params": p}, x, train=True, rngs={"dropout": key})
  k = ntklayers.flax.ntk_fn(module, implementation=implementation)(
      variables, x1, x2, train=True, rngs={"dropout": key})
  assert_rel_close(k, reference_ntk(f, variables["params"], x1, x2), TOL64)


class NestedKwargs(nn.Module):
  """Arrays and static values nested in one ``cfg`` kwarg."""

  @nn.compact
  def __call__(self, x, cfg):
    _trace("NestedKwargs")
    act = {"tanh": jnp.tanh, "relu": jax.nn.relu}[cfg["mode"][0]]
    h = act(fl.Dense(8, param_dtype=F64)(x)) * cfg["scales"][0][None, :]
    out = fl.Dense(3, param_dtype=F64)(h + cfg["shift"][1][0])
    return out * cfg["mode"][1] if cfg["extra"] is None else out


def test_linen_nested_apply_kwargs():
  """Array leaves of nested dicts / lists / tuples are traced, the hashable rest
  (strings, numbers, None) is static; an unhashable non-array leaf is a TypeError
  naming the kwarg."""
  module = NestedKwargs()
  x1, x2 = _inputs()

  def cfg(c, mode="tanh"):
    return {"scales": [c * jnp.linspace(0.5, 1.5, 8, dtype=F64)],
            "shift": (None, [jnp.asarray(c, F64), "unused"]),
            "mode": (mode, 2.0), "extra": None}

  variables = models_flax.linen_variables(module, F64, x1, cfg(1.0))
  params = variables["params"]
  kernel_fn = ntklayers.flax.ntk_fn(module)

  def ref(c):
    return reference_ntk(lambda p, x: module.apply({"params": p}, x, c), params, x1, x2)

  k1 = kernel_fn(variables, x1, x2, cfg=cfg(1.0))
  traces = TRACES["NestedKwargs"]
  k2 = kernel_fn(variables, x1, x2, cfg=cfg(2.0))
  assert TRACES["NestedKwargs"] == traces  # new array values: no new trace
  assert_rel_close(k1, ref(cfg(1.0)), TOL64)
  assert_rel_close(k2, ref(cfg(2.0)), TOL64)
  k3 = kernel_fn(variables, x1, x2, cfg=cfg(1.0, mode="relu"))  # a new static value
  assert TRACES["NestedKwargs"] > traces
  assert_rel_close(k3, ref(cfg(1.0, mode="relu")), TOL64)
  bad = {**cfg(1.0), "extra": {"tags": {"a", "b"}}}
  with pytest.raises(TypeError, match=r"model kwarg 'cfg' \(at \['extra'\]\['tags'\]\)"):
    kernel_fn(variables, x1, x2, cfg=bad)


# ------------------------------------------------------------------ errors ---


def test_linen_variables_without_params():
  built = models_flax.build("linen_mlp")
  kernel_fn = ntklayers.flax.ntk_fn(built.extra["module"])
  with pytest.raises(ValueError, match="`variables`.*'params'"):
    kernel_fn(built.params, built.x1)  # the params tree itself, not {"params": ...}
  with pytest.raises(ValueError, match="`variables`"):
    kernel_fn({"batch_stats": {}}, built.x1)
  with pytest.raises(ValueError, match="`variables`"):
    kernel_fn([built.params], built.x1)


def test_linen_module_not_a_module():
  with pytest.raises(TypeError, match="`module`"):
    ntklayers.flax.ntk_fn(lambda p, x: x)
  with pytest.raises(TypeError, match="`module`"):
    ntklayers.flax.ntk_fn(models_flax.build("nnx_mlp").extra["model"])


@pytest.mark.parametrize("bad", ["model", None, (1,)], ids=["str", "none", "1-tuple"])
def test_nnx_kernel_fn_non_module(bad):
  x1, _ = _inputs()
  with pytest.raises(TypeError, match="`model`"):
    fx.ntk_fn()(bad, x1)


def test_nnx_kernel_fn_linen_module_is_rejected():
  built = models_flax.build("linen_mlp")
  with pytest.raises(TypeError, match="`model`"):
    fx.ntk_fn()(built.extra["module"], built.x1)


def test_flax_options_validated_eagerly():
  module = models_flax.LinenMLP(F64)
  with pytest.raises(ValueError, match="`implementation`"):
    ntklayers.flax.ntk_fn(module, implementation="fast")
  with pytest.raises(TypeError, match="`trace_axes`"):
    fx.ntk_fn(trace_axes="last")
  with pytest.raises(TypeError, match="`layerwise`"):
    fx.ntk_fn(layerwise=1)


def test_flax_x1_x2_mismatch():
  built = models_flax.build("nnx_mlp")
  with pytest.raises(ValueError, match="`x1` and `x2`"):
    built.ntk_fn()(built.x1, built.x2[:, :4])
  built = models_flax.build("linen_mlp")
  with pytest.raises(ValueError, match="`x1` and `x2`"):
    built.ntk_fn()(built.x1, built.x2.astype(jnp.float32))
