"""Benchmark: large-N kernels with ``ntklayers.ntk_blocked`` (time, peak RSS, scaling).

Settings (float32, Gaussian inputs, one CPU device):

* ``torchntk``: torchNTK's MLP, 784 -> 100 x4 -> 1, tanh, NTK parameterization
  (standard-normal weights, each layer's input divided by sqrt(fan-in)); the
  ``[N, N, 1, 1]`` kernel for N = 1k, 5k, 10k in memory and N = 20k written
  out of core (``out=``);
* ``mlp10``: 64 -> 512 -> 512 -> 10, ReLU; the full ``[N, N, 10, 10]`` kernel
  for N = 2,000 in memory (``max_memory="2GiB"``) and N = 5,000 (9.3 GiB)
  written out of core (``max_memory="1.5GiB"``).

Every row runs in a fresh process, so ``peak RSS`` is the whole process's
(``ru_maxrss``: Python, JAX, the inputs and the kernel). ``time`` is the wall
clock of the one call, compilation included. ``unblocked`` rows are
``ntklayers.ntk`` (the same kernel in one piece) for comparison.

The throughput rows compare work per second once compiled: the blocked kernel's
second call (its programs cached) counts the entries of the blocks it computes
(the upper triangle: ``T (T + 1) / 2`` blocks of ``b x b``), the unblocked one
is a compiled kernel of ``b`` examples against ``b`` others (the same work as
one off-diagonal block), ``b x b`` entries; ``x unblocked`` is
the ratio of their times per entry (below 1.2 is the target). The fitted
exponent is the slope of log(time) against log(N) over the blocked rows of a
setting.

Usage::

  python benchmarks/scale.py                      # everything, about 3 minutes on 2 CPU cores
  python benchmarks/scale.py --settings torchntk  # one setting
  python benchmarks/scale.py --quick              # small N, a smoke test
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import tempfile
import time

import numpy as np

ROWS = {
    "torchntk": [("unblocked", 10_000, None), ("blocked", 1_000, None),
                 ("blocked", 5_000, None), ("blocked", 10_000, None),
                 ("out of core", 20_000, None), ("throughput", 10_000, None)],
    "mlp10": [("unblocked", 1_000, None), ("blocked", 2_000, "2GiB"),
              ("out of core", 5_000, "1.5GiB"), ("throughput", 2_000, "2GiB")],
}
QUICK = {
    "torchntk": [("unblocked", 500, None), ("blocked", 500, None), ("blocked", 1_000, None),
                 ("out of core", 1_500, None), ("throughput", 1_000, None)],
    "mlp10": [("unblocked", 200, None), ("blocked", 300, "1GiB"),
              ("out of core", 400, "1GiB"), ("throughput", 300, "1GiB")],
}


def model(setting: str):
  import haiku as hk  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import ntklayers  # pylint: disable=g-import-not-at-top

  if setting == "torchntk":
    def fn(x):
      w = hk.initializers.RandomNormal(1.0)
      h = ntklayers.Linear(100, w_init=w)(x / np.sqrt(784))
      for _ in range(3):
        h = ntklayers.Linear(100, w_init=w)(jnp.tanh(h) / np.sqrt(100))
      return ntklayers.Linear(1, w_init=w)(jnp.tanh(h) / np.sqrt(100))
    dim = 784
  else:
    def fn(x):
      h = jax.nn.relu(ntklayers.Linear(512)(x))
      h = jax.nn.relu(ntklayers.Linear(512)(h))
      return ntklayers.Linear(10)(h)
    dim = 64
  net = hk.without_apply_rng(hk.transform(fn))
  params = net.init(jax.random.key(0), np.zeros((1, dim), np.float32))
  return net.apply, params, dim


def run_one(setting: str, mode: str, n: int, max_memory: str | None) -> dict:
  """One row, in this (fresh) process."""
  import jax  # pylint: disable=g-import-not-at-top
  import ntklayers  # pylint: disable=g-import-not-at-top

  f, params, dim = model(setting)
  x = np.random.default_rng(0).standard_normal((n, dim)).astype(np.float32)
  row: dict = {"setting": setting, "mode": mode, "n": n, "max_memory": max_memory}
  with tempfile.TemporaryDirectory() as tmp:
    out = os.path.join(tmp, "kernel.npy") if mode == "out of core" else None
    start = time.perf_counter()
    if mode == "unblocked":
      k = ntklayers.ntk(f, params, x)
      k.block_until_ready()
    else:
      k = ntklayers.ntk_blocked(f, params, x, out=out, max_memory=max_memory,
                                progress=False)
    row["time"] = time.perf_counter() - start
    row["shape"] = list(k.shape)
    row["bytes"] = int(np.prod(k.shape)) * 4
    if mode == "throughput":
      b = _block_size(f, params, x, max_memory)
      start = time.perf_counter()
      ntklayers.ntk_blocked(f, params, x, max_memory=max_memory, progress=False)
      steady = time.perf_counter() - start
      tiles = math.ceil(n / b)
      entries = tiles * (tiles + 1) // 2 * b * b
      kernel_fn = ntklayers.ntk_fn(f)
      x1, x2 = x[:b], x[-b:]  # an off-diagonal block (x2 given: all b x b), unblocked
      kernel_fn(params, x1, x2).block_until_ready()
      reps = []
      for _ in range(3):
        start = time.perf_counter()
        kernel_fn(params, x1, x2).block_until_ready()
        reps.append(time.perf_counter() - start)
      row.update(block=b, blocked_ns=steady / entries * 1e9,
                 unblocked_ns=min(reps) / (b * b) * 1e9)
    del k
  row["rss"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
  row["devices"] = len(jax.devices())
  return row


def _block_size(f, params, x, max_memory) -> int:
  """The block size ``ntk_blocked`` picks (read from its plan)."""
  from ntklayers._large import _exec as E
  from ntklayers._large import _plan as BP
  from ntklayers._large import _budget
  from ntklayers._large import _tiles as T  # pylint: disable=g-import-not-at-top
  from ntklayers._core._options import Options, split_kwargs  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  dyn, static = split_kwargs({})
  n = x.shape[0]
  rest = tuple(f(params, x[:1]).shape[1:])
  o2 = int(np.prod(rest)) ** 2
  req = E.Request(f, Options.create(), static, E.make_mesh(), True, rest=rest, batch=n)
  budget = (_budget.default_budget(jax.devices()[0]) if max_memory is None
            else _budget.parse_memory(max_memory))
  progs = BP.plan(req, params, x, None, dyn, block_size=None, budget=budget, kind=T.UPPER,
                  output_bytes=n * n * o2 * 4, block_bytes=lambda b: b * b * o2 * 4,
                  out_given=False)
  return progs.block_size


def fmt_gib(nbytes: float) -> str:
  return f"{nbytes / 2**30:.2f}"


def table(rows: list[dict]) -> str:
  lines = ["| setting | mode | N | kernel | time (s) | peak RSS (GiB) | notes |",
           "|---|---|---:|---|---:|---:|---|"]
  for r in rows:
    if "error" in r:
      lines.append(f"| {r['setting']} | {r['mode']} | {r['n']:,} | | | | {r['error']} |")
      continue
    notes = [] if not r.get("max_memory") else [f"max_memory={r['max_memory']}"]
    if r["mode"] == "throughput":
      notes.append(f"b={r['block']}: {r['blocked_ns']:.2f} ns/entry blocked (2nd call) vs "
                   f"{r['unblocked_ns']:.2f} unblocked -> x unblocked "
                   f"{r['blocked_ns'] / r['unblocked_ns']:.2f}")
    shape = "x".join(str(s) for s in r["shape"])
    lines.append(f"| {r['setting']} | {r['mode']} | {r['n']:,} | [{shape}] "
                 f"{fmt_gib(r['bytes'])} GiB | {r['time']:.2f} | {fmt_gib(r['rss'])} | "
                 f"{'; '.join(notes)} |")
  for setting in dict.fromkeys(r["setting"] for r in rows):
    pts = [(r["n"], r["time"]) for r in rows if r["setting"] == setting
           and r["mode"] in ("blocked", "out of core") and "time" in r]
    if len(pts) >= 2:
      slope = np.polyfit(np.log([p[0] for p in pts]), np.log([p[1] for p in pts]), 1)[0]
      lines.append(f"\n{setting}: fitted exponent of time vs N (blocked rows, "
                   f"compilation included): {slope:.2f}")
  return "\n".join(lines)


PAGE_INTRO = """
2-core CPU, float32, one device; every row a fresh process, peak RSS of the
whole process, time including compilation. `torchntk` is torchNTK's setting
(784 -> 100 x4 -> 1, tanh, NTK parameterization, Gaussian inputs); `mlp10` is
64 -> 512 -> 512 -> 10 with the full `[N, N, 10, 10]` kernel. The throughput
rows compare, once compiled, the time per kernel entry of the blocks computed
against an unblocked off-diagonal block of the same size.
"""


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--settings", nargs="+", default=list(ROWS), choices=list(ROWS))
  parser.add_argument("--quick", action="store_true", help="small N (a smoke test)")
  parser.add_argument("--modes", nargs="+", default=None,
                      help="only these rows (unblocked, blocked, 'out of core', throughput)")
  parser.add_argument("--markdown", default=None,
                      help="also write the table as a Markdown page "
                      "(docs/benchmarks/scale.md)")
  parser.add_argument("--one", help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.one:
    setting, mode, n, mem = json.loads(args.one)
    print(json.dumps(run_one(setting, mode, n, mem)))
    return
  from ntklayers._bench import markdown_report  # pylint: disable=g-import-not-at-top
  with markdown_report(args.markdown, "Large kernels: time and memory against N",
                       PAGE_INTRO):
    _rows(args)


def _rows(args: argparse.Namespace) -> None:
  rows = []
  plan = QUICK if args.quick else ROWS
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  for setting in args.settings:
    for mode, n, mem in plan[setting]:
      if args.modes and mode not in args.modes:
        continue
      cmd = [sys.executable, __file__, "--one", json.dumps([setting, mode, n, mem])]
      proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
      if proc.returncode:
        lines = [ln for ln in proc.stderr.strip().splitlines()  # not JAX's traceback note
                 if ln.strip() and not ln.startswith(("For simplicity", "-" * 20))]
        err = (lines or ["?"])[-1]
        rows.append({"setting": setting, "mode": mode, "n": n, "error": err[:120]})
      else:
        rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
      print(f"  {setting} {mode} N={n}: done", file=sys.stderr, flush=True)
  print(table(rows))


if __name__ == "__main__":
  main()
