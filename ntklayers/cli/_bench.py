"""``ntklayers bench``: times the kernel implementations on a built-in model.

The models are those of ``benchmarks/bench_ntk.py`` (``ntklayers/_zoo.py``):
``mlp``, ``cnn`` and ``transformer`` in Haiku, with their default sizes unless
``--n`` changes the batch. Every method runs in interleaved rounds (so all see
the same machine load); ``x faster`` is the pair-median of jacobian time over
the method's time, ``rel err`` is ``max |K - K_jacobian| / max |K_jacobian|``.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

import jax
import numpy as np

from ntklayers import _bench as _timing
from ntklayers.cli import _args

METHODS = ("auto", "ntk_vp", "jacobian")


def run(args: argparse.Namespace, progress: Callable[[str], None] = lambda s: None
        ) -> dict[str, dict[str, float]]:
  """Prints the table; returns ``{method: {"median_s", "speedup", "rel_err"}}``."""
  from ntklayers._bench import zoo as _zoo  # pylint: disable=g-import-not-at-top  (needs Haiku)
  kwargs = {} if args.n is None else {"n": args.n}
  model = _zoo.MODELS[args.model](**kwargs)
  methods = [m for m in METHODS if m in args.methods]
  print(f"{model.name}: {model.description}; {model.num_params:,} params, float32, "
        f"kernel [N, N, O, O] | jax {jax.__version__} on {jax.default_backend()}")
  fns = {m: jax.jit(model.kernel_fn(m)) for m in methods}
  progress(f"compiling and timing {', '.join(methods)} ({args.repeats} rounds)")
  times, firsts, outs = _timing.time_round_robin(fns, model.params, model.x,
                                                 repeats=args.repeats, budget_s=args.budget,
                                                 min_repeats=1)
  ref = outs.get("jacobian")
  rows, result = [], {}
  for m in methods:
    t = np.asarray(times[m])
    memory = _timing.compiled_memory(fns[m], model.params, model.x)
    speedup = rel = float("nan")
    if ref is not None:
      k = min(len(t), len(times["jacobian"]))
      speedup = float(np.median(np.asarray(times["jacobian"][:k]) / t[:k]))
      rel = _timing.max_rel_diff(outs[m], ref)
    result[m] = {"median_s": float(np.median(t)), "speedup": speedup, "rel_err": rel}
    rows.append([m, f"{np.median(t) * 1e3:.2f}", f"{t.min() * 1e3:.2f}", str(len(t)),
                 f"{firsts[m]:.2f}", _timing.mib(memory.peak if memory else None),
                 "-" if ref is None else f"{speedup:.1f}",
                 "-" if ref is None else f"{rel:.1e}"])
  print(_timing.format_table(["method", "median ms", "min ms", "calls", "first s",
                              "peak MiB", "x faster", "rel err"], rows))
  return result


def add_arguments(parser: argparse.ArgumentParser) -> None:
  parser.add_argument("--model", default="mlp",
                      choices=("mlp", "cnn", "transformer", "scanned_transformer"),
                      help="built-in Haiku model (default mlp: depth 4, width 512, N=32)")
  parser.add_argument("--n", type=_args.number(int, 1), default=None,
                      help="batch size N (default: the model's, 32 / 16 / 16)")
  parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS,
                      help="implementations to time (default: all three)")
  parser.add_argument("--repeats", type=_args.number(int, 1), default=5,
                      help="timed rounds (default 5)")
  parser.add_argument("--budget", type=_args.number(float, 0.0), default=20.0,
                      help="seconds after which a slow method stops repeating (default 20)")
