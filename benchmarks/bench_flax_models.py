"""Flax twins of the Haiku benchmark models, for ``bench_ntk.py``.

``mlp_linen`` / ``mlp_nnx`` and ``cnn_linen`` / ``cnn_nnx`` have the architecture,
data and *weights* of the Haiku ``mlp`` and ``cnn`` of ``bench_models.py`` (the
Haiku parameters are copied into the Flax parameter trees), built from the
annotated Flax drop-ins:

* linen: ``ntklayers.flax.linen.Dense`` / ``Conv`` in an ``nn.Module``; kernels
  with ``kernel_fn = ntklayers.flax.ntk_fn(module)``, timed as
  ``kernel_fn({"params": params}, x)``; the factor floor captures
  ``lambda p, x: module.apply({"params": p}, x)``.
* NNX: ``ntklayers.flax.nnx.Linear`` / ``Conv`` in an ``nnx.Module``; kernels with
  ``kernel_fn = ntklayers.flax.nnx.ntk_fn()``, timed as
  ``kernel_fn((graphdef, params, *rest), x)`` on the output of
  ``nnx.split(model, nnx.Param, ...)`` taken once (passing the module itself
  also works and splits it on every call); the factor floor captures
  ``lambda p, x: nnx.merge(graphdef, p, *rest)(x)``.

So the three frameworks compute the same kernel, and ``bench_ntk.py`` compares
both their times and their kernels.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import nnx

import bench_models as bm
import ntklayers.flax
from ntklayers.flax import linen as ntk_nn
from ntklayers.flax import nnx as ntk_nnx


def _hk_layers(model: bm.Model, names: list[str]) -> list[dict[str, jax.Array]]:
  """The Haiku ``{"w", "b"}`` dicts of ``names``, as Flax ``{"kernel", "bias"}``."""
  assert sorted(names) == sorted(model.params), (names, list(model.params))
  return [{"kernel": model.params[k]["w"], "bias": model.params[k]["b"]} for k in names]


def _check_same_shapes(ours: Any, reference: Any, what: str) -> None:
  shapes = lambda t: jax.tree.map(lambda a: (tuple(a.shape), jnp.dtype(a.dtype)), t)
  if jax.tree.structure(ours) != jax.tree.structure(reference) or \
      jax.tree.leaves(shapes(ours)) != jax.tree.leaves(shapes(reference)):
    raise AssertionError(f"{what}: copied parameters {shapes(ours)} do not match the "
                         f"module's own {shapes(reference)}")


def _linen(name: str, twin: bm.Model, module: nn.Module, layers: list[dict],
           layer_names: list[str]) -> bm.Model:
  params = dict(zip(layer_names, layers))
  _check_same_shapes(params, jax.eval_shape(module.init, jax.random.key(0), twin.x)["params"],
                     name)

  def apply(p, x):
    return module.apply({"params": p}, x)

  def kernel_fn_factory(implementation: str) -> Callable[[Any, jax.Array], Any]:
    kernel_fn = ntklayers.flax.ntk_fn(module, implementation=implementation)
    return lambda p, x: kernel_fn({"params": p}, x)

  return bm.Model(name, f"{twin.description} | flax.linen twin of {twin.name!r}, "
                  f"same weights", apply, params, twin.x, framework="flax.linen",
                  kernel_fn_factory=kernel_fn_factory, twin=twin.name)


def _set(variable: nnx.Variable, value: jax.Array) -> None:
  if variable.shape != value.shape:
    raise AssertionError(f"shape {variable.shape} != {value.shape}")
  if hasattr(variable, "set_value"):
    variable.set_value(value)
  else:  # older flax
    variable.value = value


def _nnx(name: str, twin: bm.Model, model: nnx.Module, modules: list[nnx.Module],
         layers: list[dict]) -> bm.Model:
  for module, layer in zip(modules, layers, strict=True):
    _set(module.kernel, layer["kernel"])
    _set(module.bias, layer["bias"])
  graphdef, params, *rest = nnx.split(model, nnx.Param, ...)

  def apply(p, x):
    return nnx.merge(graphdef, p, *rest)(x)

  def kernel_fn_factory(implementation: str) -> Callable[[Any, jax.Array], Any]:
    kernel_fn = ntk_nnx.ntk_fn(implementation=implementation)
    return lambda p, x: kernel_fn((graphdef, p, *rest), x)

  return bm.Model(name, f"{twin.description} | flax.nnx twin of {twin.name!r}, "
                  f"same weights", apply, params, twin.x, framework="flax.nnx",
                  kernel_fn_factory=kernel_fn_factory, twin=twin.name)


def _nnx_list(modules: list[nnx.Module]):
  return nnx.List(modules) if hasattr(nnx, "List") else modules  # flax < 0.12: a list


# ------------------------------------------------------------------ MLP ---


class LinenMLP(nn.Module):
  """ReLU MLP of ``ntk_nn.Dense`` layers (``Dense_0`` ... ``Dense_{depth-1}``)."""

  width: int
  depth: int
  n_out: int

  @nn.compact
  def __call__(self, x):
    for _ in range(self.depth - 1):
      x = nn.relu(ntk_nn.Dense(self.width)(x))
    return ntk_nn.Dense(self.n_out)(x)


class NnxMLP(nnx.Module):
  """ReLU MLP of ``ntk_nnx.Linear`` layers (``layers/0`` ... ``layers/{depth-1}``)."""

  def __init__(self, d_in: int, width: int, depth: int, n_out: int, *, rngs: nnx.Rngs):
    dims = [d_in] + [width] * (depth - 1) + [n_out]
    self.layers = _nnx_list([ntk_nnx.Linear(a, b, rngs=rngs)
                             for a, b in zip(dims[:-1], dims[1:])])

  def __call__(self, x):
    for layer in self.layers[:-1]:
      x = nn.relu(layer(x))
    return self.layers[-1](x)


def _mlp_twin(**kwargs) -> tuple[bm.Model, list[dict], dict]:
  twin = bm.mlp(**kwargs)
  depth = len(twin.params)
  names = ["linear"] + [f"linear_{i}" for i in range(1, depth)]
  layers = _hk_layers(twin, names)
  sizes = dict(d_in=layers[0]["kernel"].shape[0], width=layers[0]["kernel"].shape[1],
               depth=depth, n_out=layers[-1]["kernel"].shape[1])
  return twin, layers, sizes


def mlp_linen(**kwargs) -> bm.Model:
  twin, layers, s = _mlp_twin(**kwargs)
  module = LinenMLP(s["width"], s["depth"], s["n_out"])
  return _linen("mlp_linen", twin, module, layers, [f"Dense_{i}" for i in range(s["depth"])])


def mlp_nnx(**kwargs) -> bm.Model:
  twin, layers, s = _mlp_twin(**kwargs)
  model = NnxMLP(s["d_in"], s["width"], s["depth"], s["n_out"], rngs=nnx.Rngs(0))
  return _nnx("mlp_nnx", twin, model, list(model.layers), layers)


# ------------------------------------------------------------------ CNN ---


class LinenCNN(nn.Module):
  """``ntk_nn.Conv`` 3x3 (16, 32 stride 2, 32 channels, ``SAME``), then ``Dense``."""

  n_out: int

  @nn.compact
  def __call__(self, x):
    x = nn.relu(ntk_nn.Conv(16, (3, 3))(x))
    x = nn.relu(ntk_nn.Conv(32, (3, 3), strides=2)(x))
    x = nn.relu(ntk_nn.Conv(32, (3, 3))(x))
    return ntk_nn.Dense(self.n_out)(x.reshape(x.shape[0], -1))


class NnxCNN(nnx.Module):
  """``ntk_nnx.Conv`` 3x3 (16, 32 stride 2, 32 channels, ``SAME``), then ``Linear``."""

  def __init__(self, size: int, c_in: int, n_out: int, *, rngs: nnx.Rngs):
    self.conv1 = ntk_nnx.Conv(c_in, 16, (3, 3), rngs=rngs)
    self.conv2 = ntk_nnx.Conv(16, 32, (3, 3), strides=2, rngs=rngs)
    self.conv3 = ntk_nnx.Conv(32, 32, (3, 3), rngs=rngs)
    side = -(-size // 2)
    self.head = ntk_nnx.Linear(side * side * 32, n_out, rngs=rngs)

  def __call__(self, x):
    x = nn.relu(self.conv1(x))
    x = nn.relu(self.conv2(x))
    x = nn.relu(self.conv3(x))
    return self.head(x.reshape(x.shape[0], -1))


_CNN_NAMES = ["conv2_d", "conv2_d_1", "conv2_d_2", "linear"]


def cnn_linen(**kwargs) -> bm.Model:
  twin = bm.cnn(**kwargs)
  layers = _hk_layers(twin, _CNN_NAMES)
  module = LinenCNN(layers[-1]["kernel"].shape[1])
  return _linen("cnn_linen", twin, module, layers, ["Conv_0", "Conv_1", "Conv_2", "Dense_0"])


def cnn_nnx(**kwargs) -> bm.Model:
  twin = bm.cnn(**kwargs)
  layers = _hk_layers(twin, _CNN_NAMES)
  _, size, _, c_in = twin.x.shape
  model = NnxCNN(size, c_in, layers[-1]["kernel"].shape[1], rngs=nnx.Rngs(0))
  return _nnx("cnn_nnx", twin, model,
              [model.conv1, model.conv2, model.conv3, model.head], layers)


MODELS: dict[str, Callable[[], bm.Model]] = {
    "mlp_linen": mlp_linen, "mlp_nnx": mlp_nnx, "cnn_linen": cnn_linen, "cnn_nnx": cnn_nnx}
# Each Flax model's Haiku twin (same architecture, data and weights).
TWINS: dict[str, str] = {"mlp_linen": "mlp", "mlp_nnx": "mlp", "cnn_linen": "cnn",
                         "cnn_nnx": "cnn"}
