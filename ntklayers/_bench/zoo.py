"""Built-in Haiku models of ``ntklayers bench`` and ``benchmarks/bench_ntk.py``.

Every model here is a Haiku function built from annotated ``ntklayers`` layers,
so ``implementation="auto"`` contracts all of its parameters from cached factors.
Their Flax (linen and NNX) twins, with the same weights, are in
``benchmarks/bench_flax_models.py``.

Glossary of shapes: ``N`` batch size, ``O`` model outputs, ``T`` sequence
length, ``D`` embedding size.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import haiku as hk
import jax
import jax.numpy as jnp

import ntklayers
import ntklayers.haiku as nh


@dataclasses.dataclass(frozen=True)
class Model:
  """A benchmark model: ``apply(params, x) -> [N, O]`` with its data.

  ``apply`` is what the factor floor captures. ``kernel_fn_factory(implementation)``
  returns the framework's public kernel function as ``(params, x) -> kernel``
  (default: ``ntklayers.ntk_fn(apply, implementation=...)``, the Haiku entry
  point). ``twin`` names the Haiku model with the same architecture and weights.
  """

  name: str
  description: str
  apply: Callable[[Any, jax.Array], jax.Array]
  params: Any
  x: jax.Array
  framework: str = "haiku"
  kernel_fn_factory: Callable[[str], Callable[[Any, jax.Array], Any]] | None = None
  twin: str | None = None

  @property
  def num_params(self) -> int:
    return sum(leaf.size for leaf in jax.tree.leaves(self.params))

  def kernel_fn(self, implementation: str) -> Callable[[Any, jax.Array], Any]:
    """The public kernel function of this model's framework, ``(params, x)``."""
    if self.kernel_fn_factory is None:
      return ntklayers.ntk_fn(self.apply, implementation=implementation)
    return self.kernel_fn_factory(implementation)


def _build(name: str, description: str, fn: Callable[[jax.Array], jax.Array],
           x_shape: tuple[int, ...], seed: int = 0) -> Model:
  net = hk.without_apply_rng(hk.transform(fn))
  kp, kx = jax.random.split(jax.random.key(seed))
  x = jax.random.normal(kx, x_shape, jnp.float32)
  params = net.init(kp, x)
  return Model(name, description, net.apply, params, x)


def mlp(n: int = 32, d_in: int = 64, width: int = 512, depth: int = 4,
        n_out: int = 10) -> Model:
  """(a) ReLU MLP of ``depth`` ``ntklayers.Linear`` layers (``linear``, ``linear_1``, ...)."""

  def fn(x):
    for _ in range(depth - 1):
      x = jax.nn.relu(ntklayers.Linear(width)(x))
    return ntklayers.Linear(n_out)(x)

  return _build("mlp", f"MLP depth {depth}, width {width}, d_in {d_in}, O={n_out}, N={n}",
                fn, (n, d_in))


def cnn(n: int = 16, size: int = 16, n_out: int = 10) -> Model:
  """(b) Three 3x3 ``Conv2D`` layers (16, 32 stride 2, 32 channels; ``SAME``
  padding), then Linear: ``conv2_d``, ``conv2_d_1``, ``conv2_d_2``, ``linear``."""

  def fn(x):
    x = jax.nn.relu(nh.Conv2D(16, 3)(x))
    x = jax.nn.relu(nh.Conv2D(32, 3, stride=2)(x))
    x = jax.nn.relu(nh.Conv2D(32, 3)(x))
    return ntklayers.Linear(n_out)(x.reshape(x.shape[0], -1))

  return _build("cnn", f"CNN 3x Conv2D(16,32/s2,32) on {size}x{size}x3 + Linear, "
                f"O={n_out}, N={n}", fn, (n, size, size, 3))


def transformer(n: int = 16, t: int = 16, d: int = 64, heads: int = 4,
                n_out: int = 10) -> Model:
  """(c) Pre-LN transformer block (attention + MLP, residuals), mean-pooled."""

  def fn(x):
    x = _haiku_block(d, heads)(x)
    return ntklayers.Linear(n_out)(x.mean(axis=1))

  return _build("transformer", f"Transformer block (LN+MHA {heads} heads+MLP), D={d}, "
                f"T={t}, O={n_out}, N={n}", fn, (n, t, d))


def _haiku_block(d: int, heads: int) -> Callable[[jax.Array], jax.Array]:
  """One pre-LN transformer block (attention + MLP, residuals), ``[N, T, D]``."""

  def block(x):
    init = hk.initializers.VarianceScaling(1.0)
    h = nh.LayerNorm(axis=-1, create_scale=True, create_offset=True)(x)
    x = x + nh.MultiHeadAttention(num_heads=heads, key_size=d // heads,
                                  w_init=init)(h, h, h)
    h = nh.LayerNorm(axis=-1, create_scale=True, create_offset=True)(x)
    h = jax.nn.gelu(ntklayers.Linear(4 * d)(h))
    return x + ntklayers.Linear(d)(h)

  return block


def scanned_transformer(n: int = 16, t: int = 16, d: int = 64, heads: int = 4,
                        blocks: int = 6, n_out: int = 10) -> Model:
  """(d) ``blocks`` pre-LN transformer blocks as one ``hk.layer_stack`` of
  ``hk.remat`` blocks (a scan over stacked parameters), between an input
  projection and a mean-pooled head."""

  def fn(x):
    x = ntklayers.Linear(d)(x)
    x = hk.layer_stack(blocks)(hk.remat(_haiku_block(d, heads)))(x)
    return ntklayers.Linear(n_out)(x.mean(axis=1))

  return _build("scanned_transformer", f"{blocks} transformer blocks in hk.layer_stack "
                f"+ hk.remat, D={d}, T={t}, O={n_out}, N={n}", fn, (n, t, d))


MODELS: dict[str, Callable[[], Model]] = {
    "mlp": mlp, "cnn": cnn, "transformer": transformer,
    "scanned_transformer": scanned_transformer}
