"""Benchmark: overhead of ``ntklayers.optax.monitor`` in a jitted optax train step.

Model and data of ``examples/train_with_ntk_monitor.py``: scikit-learn's digits
(1797 x 64, standardized per feature), a Haiku MLP 64-256-256-10 of
``ntklayers.Linear`` (ReLU), float32, softmax cross-entropy, ``optax.adam(1e-3)``
on minibatches of ``--batch`` examples. Two jitted train steps:

* ``plain``: ``optax.adam``;
* ``monitored``: ``optax.chain(optax.adam, monitor(f, probe, every=50))`` with a
  probe batch of 64 examples and the default metrics (``λmax``, ``λmin``, ``κ``,
  trace, effective rank of the ``[640, 640]`` flattened kernel).

Timing. Blocks of ``every`` consecutive steps (so each monitored block holds
exactly one kernel computation), the time of a block measured from the first
dispatch to ``block_until_ready`` of its last step, divided by ``every``: the
mean step. Blocks of the two steps are interleaved (plain, monitored, plain,
...) for ``--rounds`` rounds so both see the same machine load. ``kernel`` is
the jitted ``ntk_fn`` call alone on the probe batch, ``kernel+metrics`` the
monitor's whole record (kernel, eigenvalues, metrics), each the median
of ``--rounds`` calls interleaved with the blocks.

Target (issue 7): ``monitored ≤ 1.10 × plain + kernel+metrics / every``, judged
per round (the pair-median of ``monitored / (1.10 × plain + kernel+metrics /
every)`` must be ≤ 1), so one stalled block cannot decide it.

Usage::

  python benchmarks/bench_monitor.py              # about 30 s on 2 CPU cores
  python benchmarks/bench_monitor.py --rounds 40 --check   # exit 1 if the target is missed
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import optax

import ntklayers
import ntklayers.metrics as nm
import ntklayers.optax as nopt

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..",
                                "examples"))
import _digits  # noqa: E402  examples/_digits.py: the standardized digits loader


def mlp(x: jax.Array) -> jax.Array:
  """64 -> 256 -> 256 -> 10 ReLU MLP of ntklayers.Linear (drop-ins for hk.Linear)."""
  x = jax.nn.relu(ntklayers.Linear(256)(x))
  x = jax.nn.relu(ntklayers.Linear(256)(x))
  return ntklayers.Linear(10)(x)


def make_step(net: hk.Transformed, opt: optax.GradientTransformation):
  def loss(params, x, y):
    return optax.softmax_cross_entropy_with_integer_labels(net.apply(params, x), y).mean()

  @jax.jit
  def train_step(params, state, x, y):
    grads = jax.grad(loss)(params, x, y)
    updates, state = opt.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  return train_step


def run_block(step, params, state, batches, start: int, every: int):
  t0 = time.perf_counter()
  for i in range(start, start + every):
    x, y = batches[i % len(batches)]
    params, state = step(params, state, x, y)
  jax.block_until_ready((params, state))
  return params, state, (time.perf_counter() - t0) / every


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--rounds", type=int, default=20, help="interleaved rounds (20)")
  parser.add_argument("--every", type=int, default=50, help="monitor period (50)")
  parser.add_argument("--probe", type=int, default=64, help="probe batch size (64)")
  parser.add_argument("--batch", type=int, default=128, help="training batch size (128)")
  parser.add_argument("--check", action="store_true", help="exit 1 if the target is missed")
  parser.add_argument("--markdown", default=None,
                      help="also write the output as a Markdown page "
                      "(docs/benchmarks/monitor.md)")
  args = parser.parse_args(argv)
  from ntklayers._bench import markdown_report  # pylint: disable=g-import-not-at-top
  with markdown_report(args.markdown, "The cost of the optax monitor", PAGE_INTRO):
    return _measure(args)


PAGE_INTRO = """
A 64-256-256-10 MLP of `ntklayers.Linear` trained with Adam on digits (batch 128),
with and without `ntklayers.optax.monitor` (probe batch 64, every 50 steps, the
five spectral metrics); medians over interleaved rounds of 50 steps. One record
costs the kernel plus one eigenvalue computation of the `[N*O, N*O]` matrix
shared by all spectral metrics; the other steps pay only a `lax.cond`.
"""


def _measure(args: argparse.Namespace) -> int:
  x_np, labels = _digits.load_data(1797)
  x_all, y_all = jnp.asarray(x_np), jnp.asarray(labels)
  batches = [(x_all[i:i + args.batch], y_all[i:i + args.batch])
             for i in range(0, len(x_np) - args.batch + 1, args.batch)]
  probe = x_all[-args.probe:]
  net = hk.without_apply_rng(hk.transform(mlp))
  params0 = net.init(jax.random.key(0), probe[:1])
  n_params = sum(p.size for p in jax.tree.leaves(params0))

  monitor = nopt.monitor(net.apply, probe, every=args.every, history=100)
  opts = {"plain": optax.adam(1e-3), "monitored": optax.chain(optax.adam(1e-3), monitor)}
  steps = {k: make_step(net, opt) for k, opt in opts.items()}
  carry = {k: (params0, opt.init(params0)) for k, opt in opts.items()}
  kernel_fn = ntklayers.ntk_fn(net.apply)
  record = jax.jit(lambda p: {m: getattr(nm, m)(kernel_fn(p, probe)) for m in (
      "lambda_max", "lambda_min", "condition_number", "trace", "effective_rank")})
  solo = {"kernel": lambda p: kernel_fn(p, probe), "kernel+metrics": record}

  compile_s = {}
  for name, step in steps.items():  # compile + one warm-up block
    t0 = time.perf_counter()
    p, s = carry[name]
    jax.block_until_ready(step(p, s, *batches[0]))
    compile_s[name] = time.perf_counter() - t0
    carry[name] = run_block(step, p, s, batches, 0, args.every)[:2]
  for fn in solo.values():
    jax.block_until_ready(fn(params0))

  times = {k: [] for k in (*steps, *solo)}
  for r in range(args.rounds):
    for name, step in steps.items():
      p, s = carry[name]
      p, s, t = run_block(step, p, s, batches, (r + 1) * args.every, args.every)
      carry[name] = (p, s)
      times[name].append(t)
    for name, fn in solo.items():
      t0 = time.perf_counter()
      jax.block_until_ready(fn(carry["plain"][0]))
      times[name].append(time.perf_counter() - t0)
  t = {k: np.asarray(v) for k, v in times.items()}
  med = {k: float(np.median(v)) for k, v in t.items()}

  work = med["kernel+metrics"]
  budget = 1.10 * t["plain"] + work / args.every
  ratio = float(np.median(t["monitored"] / budget))
  records = int(nopt.monitor_state(carry["monitored"][1]).num_records)
  print(f"digits, MLP 64-256-256-10 ({n_params:,} params), batch {args.batch}, probe "
        f"{args.probe} (kernel [{args.probe}, {args.probe}, 10, 10]), every={args.every}, "
        f"{args.rounds} rounds x {args.every} steps, {records} kernels recorded | "
        f"jax {jax.__version__} on {jax.default_backend()}, {os.cpu_count()} CPUs")
  print(f"{'':26}{'median ms':>10}{'min ms':>10}{'first s':>9}")
  for name in (*steps, *solo):
    unit = "per step" if name in steps else "per call"
    first = f"{compile_s[name]:9.2f}" if name in compile_s else f"{'':9}"
    print(f"{name + ' (' + unit + ')':26}{med[name] * 1e3:10.3f}"
          f"{t[name].min() * 1e3:10.3f}{first}")
  over = med["monitored"] - med["plain"]
  print(f"overhead per step: {over * 1e3:.3f} ms (median monitored - median plain); "
        f"expected ~ (kernel+metrics)/every = {work / args.every * 1e3:.3f} ms, "
        f"kernel/every = {med['kernel'] / args.every * 1e3:.3f} ms")
  kernel_only = float(np.median(t["monitored"] / (1.10 * t["plain"]
                                                  + med["kernel"] / args.every)))
  ok = ratio <= 1.0
  print(f"target monitored <= 1.10 x plain + (kernel+metrics)/{args.every}: pair-median "
        f"ratio {ratio:.3f} -> {'OK' if ok else 'MISSED'} (with the kernel alone in the "
        f"budget: {kernel_only:.3f})")
  return 0 if ok or not args.check else 1


if __name__ == "__main__":
  sys.exit(main())
