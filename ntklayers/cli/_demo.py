"""``ntklayers demo``: the exact NTK of an MLP on scikit-learn's digits.

Builds a ``64 -> width x depth -> 10`` ReLU MLP of annotated drop-ins in the
chosen framework (Haiku ``ntklayers.Linear``, linen ``ntklayers.flax.linen.Dense``
or NNX ``ntklayers.flax.nnx.Linear``), computes its ``[N, N, 10, 10]`` NTK on
``N`` digits, times it against the whole-model Jacobian baseline on the first
``n_compare`` examples (and checks they agree), prints the spectrum and the
label alignment, and writes ``ntk_heatmap.png`` and ``ntk_spectrum.png``.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ntklayers import _bench as _timing
from ntklayers import datasets as _data
from ntklayers import metrics as _metrics
from ntklayers import metrics as _similarity
from ntklayers.cli import _args

DIGITS = 1797  # examples in scikit-learn's digits


@dataclasses.dataclass(frozen=True)
class DemoModel:
  """A built MLP: ``kernel_fn(**options)(state, x)`` and its parameter count."""
  make_kernel_fn: Callable[..., Callable[..., Any]]
  state: Any
  num_params: int
  layer: str


def build_mlp(framework: str, width: int, depth: int, d_in: int, seed: int) -> DemoModel:
  """The demo's MLP (``depth`` hidden ReLU layers of ``width``, 10 outputs)."""
  if framework == "haiku":
    import haiku as hk  # pylint: disable=g-import-not-at-top
    import ntklayers  # pylint: disable=g-import-not-at-top

    def fn(x):
      for _ in range(depth):
        x = jax.nn.relu(ntklayers.Linear(width)(x))
      return ntklayers.Linear(10)(x)

    net = hk.without_apply_rng(hk.transform(fn))
    params = net.init(jax.random.key(seed), jnp.zeros((1, d_in), jnp.float32))
    return DemoModel(lambda **o: ntklayers.ntk_fn(net.apply, **o), params,
                     _size(params), "ntklayers.Linear")
  if framework == "linen":
    import flax.linen as nn  # pylint: disable=g-import-not-at-top
    import ntklayers.flax  # pylint: disable=g-import-not-at-top
    from ntklayers.flax import linen as ntk_nn  # pylint: disable=g-import-not-at-top

    class MLP(nn.Module):
      @nn.compact
      def __call__(self, x):
        for _ in range(depth):
          x = nn.relu(ntk_nn.Dense(width)(x))
        return ntk_nn.Dense(10)(x)

    module = MLP()
    variables = module.init(jax.random.key(seed), jnp.zeros((1, d_in), jnp.float32))
    return DemoModel(lambda **o: ntklayers.flax.ntk_fn(module, **o), variables,
                     _size(variables["params"]), "ntklayers.flax.linen.Dense")
  if framework == "nnx":
    from flax import nnx  # pylint: disable=g-import-not-at-top
    from ntklayers.flax import nnx as ntk_nnx  # pylint: disable=g-import-not-at-top

    class NnxMLP(nnx.Module):
      def __init__(self, rngs: nnx.Rngs):
        sizes = [d_in] + [width] * depth
        self.hidden = nnx.List([ntk_nnx.Linear(a, b, rngs=rngs)
                                for a, b in zip(sizes[:-1], sizes[1:])])
        self.out = ntk_nnx.Linear(sizes[-1], 10, rngs=rngs)

      def __call__(self, x):
        for layer in self.hidden:
          x = nnx.relu(layer(x))
        return self.out(x)

    model = NnxMLP(nnx.Rngs(seed))
    return DemoModel(lambda **o: ntk_nnx.ntk_fn(**o), model,
                     _size(nnx.state(model, nnx.Param)), "ntklayers.flax.nnx.Linear")
  raise ValueError(f"unknown framework {framework!r}")


def add_arguments(parser: argparse.ArgumentParser) -> None:
  count = _args.number(int, 1)
  parser.add_argument("--framework", default="haiku", choices=("haiku", "linen", "nnx"),
                      help="framework of the MLP (default haiku)")
  parser.add_argument("--n", type=_args.number(int, 1, DIGITS, "the digits set has 1797 examples"),
                      default=256, help="examples in the kernel (256; at most 1797)")
  parser.add_argument("--width", type=count, default=256, help="hidden width (256)")
  parser.add_argument("--depth", type=count, default=2, help="hidden layers (2)")
  parser.add_argument("--n-compare", type=_args.number(int, 0), default=64,
                      help="examples for the Jacobian baseline (64; 0 skips it)")
  parser.add_argument("--repeats", type=count, default=3, help="timed calls (3)")
  parser.add_argument("--seed", type=int, default=0, help="initialization seed (0)")
  parser.add_argument("--out", default="ntk_demo", help="folder for the PNGs (ntk_demo)")


def _size(tree: Any) -> int:
  return int(sum(np.size(leaf) for leaf in jax.tree.leaves(tree)))


def run(args: argparse.Namespace, progress: Callable[[str], None] = lambda s: None
        ) -> dict[str, Any]:
  """Runs the demo; prints the summary and returns its numbers (for tests)."""
  progress("loading digits")
  x_np, labels = _data.load_digits(args.n)
  x = jnp.asarray(x_np)
  progress(f"building the {args.framework} MLP")
  model = build_mlp(args.framework, args.width, args.depth, x.shape[1], args.seed)
  print(f"digits: {args.n} examples x {x.shape[1]} standardized features, 10 classes | "
        f"{args.framework} MLP 64-{'-'.join([str(args.width)] * args.depth)}-10 "
        f"({model.layer}), {model.num_params:,} params, float32 | jax {jax.__version__} "
        f"on {jax.default_backend()}")
  progress(f"NTK of {args.n} examples (compiling)")
  kernel_fn = model.make_kernel_fn()
  times, firsts, outs = _timing.time_round_robin({"auto": kernel_fn}, model.state, x,
                                                 repeats=args.repeats)
  K = outs["auto"]
  t_auto = _timing.median(times["auto"])
  print(f"NTK shape {tuple(K.shape)}: {t_auto * 1e3:.1f} ms per call "
        f"(first call incl. compile {firsts['auto']:.2f} s)")
  out: dict[str, Any] = {"shape": tuple(K.shape), "auto_s": t_auto}
  if args.n_compare:
    m = min(args.n_compare, args.n)
    progress(f"Jacobian baseline on {m} examples")
    calls = {"auto": (kernel_fn, (model.state, x[:m])),
             "jacobian": (model.make_kernel_fn(implementation="jacobian"),
                          (model.state, x[:m]))}
    times, _, outs = _timing.time_interleaved(calls, repeats=args.repeats, budget_s=10.0,
                                              min_repeats=1)
    ta, tj = _timing.median(times["auto"]), _timing.median(times["jacobian"])
    rel = _timing.max_rel_diff(outs["auto"], outs["jacobian"])
    print(f"against implementation='jacobian' (N={m}): auto {ta * 1e3:.1f} ms, jacobian "
          f"{tj * 1e3:.1f} ms -> {tj / ta:.1f}x faster; max relative difference {rel:.1e}")
    out.update(speedup=tj / ta, rel_diff=rel)
  progress("spectrum and alignment")
  ev = np.asarray(_metrics.eigvalsh(K), np.float64)
  kappa = ev[-1] / ev[0] if ev[0] > 0 else float("inf")
  align = float(_similarity.alignment(K, jnp.asarray(labels), True, num_classes=10))
  print(f"flattened [{ev.size}, {ev.size}]: trace {ev.sum():.6g}, lambda_max {ev[-1]:.6g}, "
        f"lambda_min {ev[0]:.6g}, condition number {kappa:.4g}, centered label "
        f"alignment {align:.3f}")
  out.update(lambda_max=ev[-1], lambda_min=ev[0], kappa=kappa, alignment=align)
  progress("plots")
  import ntklayers.plot  # pylint: disable=g-import-not-at-top
  os.makedirs(args.out, exist_ok=True)
  paths = [os.path.join(args.out, name) for name in ("ntk_heatmap.png", "ntk_spectrum.png")]
  k_mean = jnp.einsum("nmoo->nm", K) / K.shape[-1]  # = trace_axes=(-1,): [N, N]
  d = jnp.sqrt(jnp.diagonal(k_mean))
  ntklayers.plot.heatmap(k_mean / d[:, None] / d[None, :], labels, path=paths[0],
                         title="NTK (mean over logits), K_ij / sqrt(K_ii K_jj)")
  ntklayers.plot.spectrum(ev, paths[1])
  print("wrote " + ", ".join(paths))
  out["paths"] = paths
  return out
