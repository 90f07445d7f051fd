"""Benchmark models and measurement helpers shared by ``bench_ntk.py``.

Every model here is a Haiku function built from annotated ``ntklayers`` layers,
so ``implementation="auto"`` contracts all of its parameters from cached factors.
Their Flax (linen and NNX) twins, with the same weights, are in
``bench_flax_models.py``.

Glossary of shapes: ``N`` batch size, ``O`` model outputs, ``T`` sequence
length, ``D`` embedding size.
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from collections.abc import Callable, Hashable
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
    init = hk.initializers.VarianceScaling(1.0)
    h = nh.LayerNorm(axis=-1, create_scale=True, create_offset=True)(x)
    x = x + nh.MultiHeadAttention(num_heads=heads, key_size=d // heads,
                                  w_init=init)(h, h, h)
    h = nh.LayerNorm(axis=-1, create_scale=True, create_offset=True)(x)
    h = jax.nn.gelu(ntklayers.Linear(4 * d)(h))
    x = x + ntklayers.Linear(d)(h)
    return ntklayers.Linear(n_out)(x.mean(axis=1))

  return _build("transformer", f"Transformer block (LN+MHA {heads} heads+MLP), D={d}, "
                f"T={t}, O={n_out}, N={n}", fn, (n, t, d))


MODELS: dict[str, Callable[[], Model]] = {
    "mlp": mlp, "cnn": cnn, "transformer": transformer}


# ------------------------------------------------------------ measuring ---


def time_round_robin(fns: dict[str, Callable[..., Any]], *args: Any, repeats: int,
                     budget_s: float = float("inf"), min_repeats: int = 3
                     ) -> tuple[dict[str, list[float]], dict[str, float], dict[str, Any]]:
  """Steady-state timing of several functions of the same arguments.

  See :func:`time_interleaved` (every function gets ``args``).
  """
  return time_interleaved({k: (fn, args) for k, fn in fns.items()}, repeats=repeats,
                          budget_s=budget_s, min_repeats=min_repeats)


def time_interleaved(calls: dict[Hashable, tuple[Callable[..., Any], tuple]], *,
                     repeats: int, budget_s: float = float("inf"), min_repeats: int = 3
                     ) -> tuple[dict[Any, list[float]], dict[Any, float], dict[Any, Any]]:
  """Steady-state timing of several calls ``{key: (fn, args)}``.

  Each function is called once untimed (compilation plus a first run), then in
  every one of ``repeats`` rounds each function is called once, in the order of
  ``calls``, so that all of them see the same machine load (useful on shared
  machines). A function drops out once it has ``min_repeats`` timed calls and
  has spent ``budget_s``, so slow baselines get few repeats. Every call is
  blocked on all output leaves.

  Returns:
    (seconds per timed call, seconds of the first call, output), keyed like ``calls``.
  """
  firsts, outs = {}, {}
  for key, (fn, args) in calls.items():
    start = time.perf_counter()
    outs[key] = jax.block_until_ready(fn(*args))
    firsts[key] = time.perf_counter() - start
  times: dict[Any, list[float]] = {key: [] for key in calls}
  for _ in range(repeats):
    for key, (fn, args) in calls.items():
      ts = times[key]
      if len(ts) >= min_repeats and sum(ts) > budget_s:
        continue
      start = time.perf_counter()
      jax.block_until_ready(fn(*args))
      ts.append(time.perf_counter() - start)
  return times, firsts, outs


def median(xs: list[float]) -> float:
  return statistics.median(xs)


@dataclasses.dataclass(frozen=True)
class Memory:
  """XLA's compiled memory analysis of one jitted call, in bytes."""

  argument: int
  output: int
  temp: int
  alias: int

  @property
  def peak(self) -> int:
    """temp + output + argument bytes (minus donated/aliased bytes)."""
    return self.temp + self.output + self.argument - self.alias


def compiled_memory(fn: Callable[..., Any], *args: Any) -> Memory | None:
  """Memory analysis of ``jax.jit(fn)`` compiled for ``args`` (None if unavailable)."""
  try:
    analysis = jax.jit(fn).lower(*args).compile().memory_analysis()
  except Exception:  # pylint: disable=broad-except  (backend-dependent)
    return None
  if analysis is None:
    return None
  get = lambda k: int(getattr(analysis, k, 0) or 0)
  return Memory(get("argument_size_in_bytes"), get("output_size_in_bytes"),
                get("temp_size_in_bytes"), get("alias_size_in_bytes"))


def max_rel_diff(a: jax.Array, b: jax.Array) -> float:
  """``max |a - b| / max |b|`` over the whole kernel."""
  return float(jnp.max(jnp.abs(a - b)) / jnp.maximum(jnp.max(jnp.abs(b)), 1e-30))


def mib(nbytes: int | None) -> str:
  return "-" if nbytes is None else f"{nbytes / 2**20:.1f}"


def format_table(headers: list[str], rows: list[list[str]]) -> str:
  """A plain-text table with right-aligned columns (the first left-aligned)."""
  widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h)
            for i, h in enumerate(headers)]

  def line(cells):
    return "  ".join(c.ljust(w) if i == 0 else c.rjust(w)
                     for i, (c, w) in enumerate(zip(cells, widths)))

  return "\n".join([line(headers), line(["-" * w for w in widths])] +
                   [line(r) for r in rows])
