"""The digits search space of ``ntklayers nas``: architectures, training, baselines.

An architecture is an :class:`Arch`: an MLP or a small CNN of ``ntklayers``
drop-ins (Haiku) with a depth, width, activation and optional LayerNorm. Each
is trained under one fixed recipe (:func:`train_accuracy`: Adam, softmax
cross-entropy, minibatches) for several seeds at once (one compile per
architecture) and scored on a stratified held-out split. The
baselines are the parameter count and the forward FLOPs (XLA's cost analysis).
"""

from __future__ import annotations

import dataclasses
import itertools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

ACTIVATIONS = {"relu": jax.nn.relu, "tanh": jnp.tanh, "gelu": jax.nn.gelu}


@dataclasses.dataclass(frozen=True)
class Arch:
  """One candidate: ``kind`` ``"mlp"`` (``depth`` hidden layers of ``width``) or
  ``"cnn"`` (``depth`` 3x3 SAME convolutions of ``width`` channels on the 8x8
  image, then a linear readout); ``norm`` ``"layer"`` adds a LayerNorm after
  every hidden layer's activation."""
  kind: str
  depth: int
  width: int
  act: str
  norm: str | None = None

  @property
  def name(self) -> str:
    return (f"{self.kind}-d{self.depth}-w{self.width}-{self.act}"
            f"{'-ln' if self.norm else ''}")

  def fn(self, x: jax.Array) -> jax.Array:
    """The Haiku function ``x [N, 64] -> logits [N, 10]`` (call inside ``hk.transform``)."""
    import ntklayers  # pylint: disable=g-import-not-at-top
    import ntklayers.haiku as nh  # pylint: disable=g-import-not-at-top
    act = ACTIVATIONS[self.act]
    if self.kind == "cnn":
      x = x.reshape(x.shape[0], 8, 8, 1)
    for _ in range(self.depth):
      x = act(nh.Conv2D(self.width, 3)(x) if self.kind == "cnn"
              else ntklayers.Linear(self.width)(x))
      if self.norm:
        x = nh.LayerNorm(axis=-1, create_scale=True, create_offset=True)(x)
    return ntklayers.Linear(10)(x.reshape(x.shape[0], -1))


def search_space(quick: bool = False) -> list[Arch]:
  """The full space (36: 24 MLPs, 12 CNNs) or the ``quick`` one (12)."""
  mlps = [Arch("mlp", d, w, a, n) for d, w, a, n in itertools.product(
      (1, 3, 6), (16, 128), ("relu", "tanh"), (None, "layer"))]
  cnns = [Arch("cnn", d, w, a, n) for d, w, a, n in itertools.product(
      (1, 3), (4, 16), ("relu", "tanh"), (None,))]
  cnns += [Arch("cnn", 2, w, "gelu", "layer") for w in (4, 16)] + [
      Arch("cnn", 2, 8, "relu", None), Arch("cnn", 2, 8, "tanh", "layer")]
  space = mlps + cnns
  if quick:
    space = space[::3]
  return space


@dataclasses.dataclass(frozen=True)
class Recipe:
  """The fixed training recipe: Adam(``lr``), batch ``batch``, ``steps`` steps."""
  steps: int = 600
  batch: int = 128
  lr: float = 3e-3


def _transformed(arch: Arch) -> Any:
  import haiku as hk  # pylint: disable=g-import-not-at-top
  return hk.without_apply_rng(hk.transform(arch.fn))


def train_accuracy(arch: Arch, data: tuple[np.ndarray, ...], seeds: list[int],
                   recipe: Recipe = Recipe()) -> np.ndarray:
  """Held-out accuracy ``[len(seeds)]`` after training each seed's init.

  ``data = (x_train, y_train, x_test, y_test)``; the minibatch order depends on
  the seed too. One compile serves all seeds (a ``vmap`` over seeds would
  batch the weights of convolutions, several times slower on CPU).
  """
  import optax  # pylint: disable=g-import-not-at-top
  net = _transformed(arch)
  x_tr, y_tr, x_te, y_te = (jnp.asarray(a) for a in data)
  opt = optax.adam(recipe.lr)
  n = x_tr.shape[0]

  def one(seed):
    key_init, key_data = jax.random.split(jax.random.key(seed))
    params = net.init(key_init, x_tr[:1])
    loss = lambda p, x, y: optax.softmax_cross_entropy_with_integer_labels(
        net.apply(p, x), y).mean()

    def step(carry, key):
      p, s = carry
      idx = jax.random.choice(key, n, (recipe.batch,), replace=False)
      g = jax.grad(loss)(p, x_tr[idx], y_tr[idx])
      u, s = opt.update(g, s, p)
      return (optax.apply_updates(p, u), s), None

    keys = jax.random.split(key_data, recipe.steps)
    (params, _), _ = jax.lax.scan(step, (params, opt.init(params)), keys)
    return jnp.mean(jnp.argmax(net.apply(params, x_te), -1) == y_te)

  run = jax.jit(one)  # one compile; the seed is traced
  return np.asarray([run(jnp.asarray(seed)) for seed in seeds])


def num_params(arch: Arch, d_in: int = 64) -> int:
  params = jax.eval_shape(_transformed(arch).init, jax.random.key(0),
                          jnp.zeros((1, d_in)))
  return int(sum(np.prod(p.shape) for p in jax.tree.leaves(params)))


def forward_flops(arch: Arch, d_in: int = 64) -> float:
  """FLOPs of the forward pass of one example (XLA's cost analysis)."""
  net = _transformed(arch)
  x = jnp.zeros((1, d_in))
  params = net.init(jax.random.key(0), x)
  cost = jax.jit(net.apply).lower(params, x).compile().cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return float("nan") if cost is None else float(cost.get("flops", float("nan")))
