"""Compilation counts of the kernel entry points, read from JAX's compile log.

``compile_log.log_compilations`` collects the ``"Compiling ..."`` records of
``jax.log_compiles`` (not Python call counts or traces): a kernel function called
again with new values of the same shapes must compile nothing, through every
entry point (Haiku ``ntklayers.ntk_fn``, ``ntklayers.flax.ntk_fn`` for linen,
``ntklayers.flax.nnx.ntk_fn``), and a kernel computed inside a user's
``jax.jit`` train step is part of that one program.

New values are made with NumPy (``jnp.asarray`` of a host array transfers, it
does not compile), and every test builds its own function or module, so that no
compiled program of another test can be reused.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import models
import numpy as np
from compile_log import log_compilations
from flax import nnx

import ntklayers
import ntklayers.flax
from ntklayers.flax import linen as fl
from ntklayers.flax import nnx as fx


def _like(tree, seed: int):
  """New values with the shapes and dtypes of ``tree`` (host random numbers)."""
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda a: jnp.asarray(rng.normal(size=a.shape), a.dtype), tree)


def _fresh(f):
  """A new function object (ntklayers caches one compiled kernel per ``f``)."""
  def g(params, x):
    return f(params, x)
  return g


def test_log_counts_compilations():
  """The context manager itself: one program, compiled once per input shape."""
  f = jax.jit(lambda x: jnp.sin(x) * 2)
  a, b, c = (jnp.asarray(np.ones(s)) for s in ((3,), (3,), (4,)))
  with log_compilations() as first:
    f(a)
  with log_compilations() as again:
    f(b)
  with log_compilations() as other_shape:
    f(c)
  assert first.count("<lambda>") == 1
  assert len(again) == 0
  assert other_shape.count("<lambda>") == 1


def test_haiku_ntk_fn_compiles_once():
  built = models.build("mlp_relu")
  kernel_fn = ntklayers.ntk_fn(_fresh(built.f))
  with log_compilations() as first:
    k1 = kernel_fn(built.params, built.x1, built.x2)
  params, x1, x2 = _like((built.params, built.x1, built.x2), seed=3)
  with log_compilations() as second:
    k2 = kernel_fn(params, x1, x2)
  assert first.count("_jitted_kernel") == 1, first.names
  assert len(second) == 0, second.names
  assert k1.shape == k2.shape and not np.allclose(k1, k2)


def test_haiku_kernel_shared_by_ntk_fn_and_ntk():
  """One compiled kernel per ``f`` and options: a second ``ntk_fn`` and ``ntk``
  with the same ``f`` and options reuse it."""
  built = models.build("mlp_relu")
  f = _fresh(built.f)
  with log_compilations() as first:
    ntklayers.ntk_fn(f, trace_axes=(-1,))(built.params, built.x1)
  params, x1 = _like((built.params, built.x1), seed=4)
  with log_compilations() as second:
    ntklayers.ntk_fn(f, trace_axes=(-1,))(params, x1)
    ntklayers.ntk(f, params, x1, trace_axes=(-1,))
  assert first.count("_jitted_kernel") == 1, first.names
  assert len(second) == 0, second.names


class _LinenMLP(nn.Module):
  width: int

  @nn.compact
  def __call__(self, x, *, scale):
    h = nn.tanh(fl.Dense(self.width, param_dtype=jnp.float64)(x)) * scale
    return fl.Dense(2, param_dtype=jnp.float64)(h)


def test_linen_ntk_fn_compiles_once():
  module = _LinenMLP(width=7)
  x1, x2 = _like((jnp.zeros((3, 4)), jnp.zeros((2, 4))), seed=5)
  scale = jnp.asarray(np.array(1.5))  # not weakly typed, like the new value below
  variables = _like(jax.eval_shape(lambda: module.init(jax.random.key(0), x1, scale=scale)),
                    seed=6)
  kernel_fn = ntklayers.flax.ntk_fn(module)
  with log_compilations() as first:
    k1 = kernel_fn(variables, x1, x2, scale=scale)
  new_variables, y1, y2, new_scale = _like((variables, x1, x2, scale), seed=7)
  with log_compilations() as second:
    k2 = kernel_fn(new_variables, y1, y2, scale=new_scale)  # array kwargs are traced
  assert first.count("_jitted_kernel") == 1, first.names
  assert len(second) == 0, second.names
  assert k1.shape == k2.shape == (3, 2, 2, 2)


class _NnxMLP(nnx.Module):
  def __init__(self, rngs: nnx.Rngs):
    self.inp = fx.Linear(4, 6, param_dtype=jnp.float64, rngs=rngs)
    self.out = fx.Linear(6, 2, param_dtype=jnp.float64, rngs=rngs)

  def __call__(self, x):
    return self.out(jnp.tanh(self.inp(x)))


def test_nnx_ntk_fn_compiles_once():
  graphdef, shapes = nnx.split(nnx.eval_shape(lambda: _NnxMLP(nnx.Rngs(0))))
  model1, model2 = (nnx.merge(graphdef, _like(shapes, seed)) for seed in (11, 12))
  x1, x2 = _like((jnp.zeros((3, 4)), jnp.zeros((2, 4))), seed=8)
  kernel_fn = fx.ntk_fn()
  with log_compilations() as first:
    k1 = kernel_fn(model1, x1, x2)
  y1, y2 = _like((x1, x2), seed=9)
  with log_compilations() as second:
    k2 = kernel_fn(model2, y1, y2)  # another model of the same structure
  assert first.count("_jitted_kernel") == 1, first.names
  assert len(second) == 0, second.names
  assert k1.shape == k2.shape and not np.allclose(k1, k2)


def test_kernel_inside_user_jit_train_step_compiles_once():
  built = models.build("mlp_relu")
  f = _fresh(built.f)
  kernel_fn = ntklayers.ntk_fn(f, trace_axes=(-1,))

  @jax.jit
  def train_step(params, x, y):
    def loss(p):
      return jnp.mean(jnp.square(f(p, x) - y))
    value, grads = jax.value_and_grad(loss)(params)
    k = kernel_fn(params, x)  # [N, N]
    new = jax.tree.map(lambda p, g: p - 0.1 * g, params, grads)
    return new, value, jnp.linalg.eigvalsh(k)[-1]

  y = jnp.asarray(np.zeros((models.N1, 3)))
  with log_compilations() as first:
    params, _, top1 = train_step(built.params, built.x1, y)
  x, y2 = _like((built.x1, y), seed=10)
  with log_compilations() as second:
    params, _, top2 = train_step(params, x, y2)
    params, _, _ = train_step(params, built.x1, y)
  assert first.count("train_step") == 1 and len(first) == 1, first.names
  assert len(second) == 0, second.names
  assert top1 > 0 and top2 > 0
