"""Benchmark: ntklayers' structured NTK against whole-model generic methods.

Models (``bench_models.py``, ``bench_flax_models.py``): ``mlp``, ``cnn`` and
``transformer`` in Haiku, and the Flax twins ``mlp_linen``, ``mlp_nnx``,
``cnn_linen``, ``cnn_nnx`` (same architecture, data and weights as the Haiku
``mlp`` / ``cnn``, built from ``ntklayers.flax`` drop-ins and timed through
``ntklayers.flax.ntk_fn`` / ``ntklayers.flax.nnx.ntk_fn``).

One table per model, one row per method:

* ``factors``: the floor, computing the cached factors alone
  (``jax.jit(lambda p, x: ntklayers.capture(f, p, x, implementation="structured"))``,
  with ``f = lambda p, x: module.apply({"params": p}, x)`` for linen and
  ``f = lambda p, x: nnx.merge(graphdef, p, *rest)(x)`` for NNX);
* ``auto``: ``ntklayers.ntk_fn(f)`` (linen: ``ntklayers.flax.ntk_fn(module)``,
  NNX: ``ntklayers.flax.nnx.ntk_fn()``), annotated layers contracted from factors;
* ``ntk_vp``: ``implementation="ntk_vp"``, NTK-vector products over the whole model;
* ``jacobian``: ``implementation="jacobian"``, per-example Jacobians of the whole
  model contracted (the baseline).

Kernels are ``[N, N, O, O]`` (``x2=None``, no traced axes), float32.

Columns: ``median ms`` / ``min ms``: steady-state time per call over ``calls``
timed calls after one untimed warm-up call (``first s``: compile + first run),
each blocked on every output leaf; ``peak MiB``: XLA's compiled memory analysis,
argument + output + temp bytes (``temp MiB`` separately); ``RSS MiB``: the max
resident set of a fresh process that ran only that row (``--rss``);
``x faster``: jacobian time / method time; ``x floor``: method time / factors
time (both pair-medians, see below); ``rel err``: max |K - K_jacobian| / max
|K_jacobian|.

Ratios and targets are judged on robust statistics. The calls are interleaved in
rounds (below), so call ``k`` of method A and call ``k`` of method B ran under
the same machine load: the **pair-median** of A over B is the median over rounds
``k`` (those both ran) of ``time_A[k] / time_B[k]``. Every verdict is based on
the pair-median, which one stalled call (or a few) cannot move; the
**min-ratio** ``min(time_A) / min(time_B)`` is printed next to it for
comparison. A ratio of medians is never used: a few slow calls of one method
moved it tenfold in one run (factors: 69 ms median, 5 ms min). With ``--rss``
the rows run in separate processes, so call ``k`` of A and of B are not
simultaneous; the pair-median is then a median of ratios of independent calls.

Usage::

  python benchmarks/bench_ntk.py                       # all models (about 5 minutes on 2 CPU cores)
  python benchmarks/bench_ntk.py --models mlp --repeats 20
  python benchmarks/bench_ntk.py --models mlp_linen,mlp_nnx   # + their Haiku twin mlp
  python benchmarks/bench_ntk.py --skip-jacobian      # no slow baseline (floor target only)
  python benchmarks/bench_ntk.py --rss --check        # per-row max RSS; exit 1 on a missed target

Calls of one model's methods, and of the Flax twins of a Haiku model together
with it, are interleaved (round robin: every method of ``mlp``, ``mlp_linen``,
``mlp_nnx`` in turn) so that all of them see the same machine load; a Flax model
always runs with its Haiku twin (added to ``--models`` if missing), against
which its ``auto`` time and its kernel are judged. With ``--rss`` each row runs
alone in its own process. Slow rows stop after ``--budget`` seconds once 3 calls
are timed.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402
import numpy as np  # noqa: E402

import bench_models as bm  # noqa: E402
import ntklayers  # noqa: E402
from ntklayers._bench import markdown_report  # noqa: E402

try:
  import bench_flax_models as bfm  # noqa: E402
  import flax  # noqa: E402
except ImportError as _flax_error:  # Haiku models only
  bfm, flax = None, None
  _FLAX_MISSING = f"(Flax models unavailable: {_flax_error})"
else:
  _FLAX_MISSING = ""

MODELS: dict = {**bm.MODELS, **(bfm.MODELS if bfm else {})}
TWINS: dict[str, str] = dict(bfm.TWINS) if bfm else {}  # Flax model -> Haiku twin
DEFAULT_MODELS = [m for m in ("mlp", "mlp_linen", "mlp_nnx", "cnn", "cnn_linen", "cnn_nnx",
                              "transformer") if m in MODELS]

METHODS = ("factors", "auto", "ntk_vp", "jacobian")
_PAGE_INTRO = """
The kernel `[N, N, O, O]` (`x2=None`, float32) of three Haiku models (`mlp`, `cnn`,
`transformer`; `benchmarks/bench_models.py`) and of the Flax twins of the MLP and
the CNN (`benchmarks/bench_flax_models.py`; same architecture, data and weights).
Methods: `auto` (each framework's entry point), the generic whole-model `ntk_vp`
and `jacobian` (the baseline), and `factors`, the floor: the cached factors alone.
Times are medians of steady-state calls after a warm-up compile, blocked on all
outputs; the calls of a model's methods, and of a Haiku model and its Flax twins,
are interleaved in rounds; ratios are pair-medians (the median over rounds of
`time_A[k] / time_B[k]`); peak memory is XLA's compiled memory analysis.
`x faster`: jacobian time / method time; `x floor`: method time / factors time;
`rel err`: max |K - K_jacobian| / max |K_jacobian|.
"""
# Targets from the issue.
MLP_SPEEDUP_TARGET = 300.0  # MLP: auto >= 300x faster than jacobian
MLP_FLOOR_TARGET = 1.5      # MLP: auto within 1.5x of the factor floor
TWIN_TARGET = 1.2           # Flax: auto within 1.2x of the Haiku twin's auto
TWIN_KERNEL_TOL = 1e-5      # Flax: max |K - K_twin| / max |K_twin| (same weights)


@dataclasses.dataclass
class Row:
  method: str
  times: list[float]
  first: float
  memory: bm.Memory | None
  kernel: np.ndarray | None = None
  rss: int | None = None  # bytes

  @property
  def median(self) -> float:
    return bm.median(self.times)


def pair_median(a: Row, b: Row) -> float:
  """Median over interleaved rounds ``k`` of ``a.times[k] / b.times[k]``.

  ``time_interleaved`` calls every function once per round, and a slow one only
  drops out at the end, so index ``k`` is round ``k`` for both rows; rounds that
  only one row ran are left out.
  """
  n = min(len(a.times), len(b.times))
  if n == 0:
    return float("nan")
  return statistics.median(ta / tb for ta, tb in zip(a.times[:n], b.times[:n]))


def min_ratio(a: Row, b: Row) -> float:
  """``min(a.times) / min(b.times)``."""
  return min(a.times) / min(b.times)


def _callable(model: bm.Model, method: str):
  if method == "factors":
    return jax.jit(lambda p, x: ntklayers.capture(model.apply, p, x,
                                                  implementation="structured"))
  return model.kernel_fn(method)


def measure(model: bm.Model, method: str, repeats: int, budget_s: float) -> Row:
  """Times one (model, method) alone and analyses its compiled memory."""
  return measure_all(model, [method], repeats, budget_s)[method]


def measure_all(model: bm.Model, methods: list[str], repeats: int,
                budget_s: float) -> dict[str, Row]:
  """Times every method of one model with interleaved calls; compiled memory."""
  return measure_group([model], methods, repeats, budget_s)[model.name]


def measure_group(models: list[bm.Model], methods: list[str], repeats: int,
                  budget_s: float) -> dict[str, dict[str, Row]]:
  """Times every method of several models (twins), all calls interleaved."""
  fns = {(mod.name, m): (_callable(mod, m), mod) for m in methods for mod in models}
  times, firsts, outs = bm.time_interleaved(
      {k: (fn, (mod.params, mod.x)) for k, (fn, mod) in fns.items()},
      repeats=repeats, budget_s=budget_s)
  results: dict[str, dict[str, Row]] = {mod.name: {} for mod in models}
  for mod in models:
    for m in methods:
      fn = fns[mod.name, m][0]
      # The kernel functions are already jitted; re-jitting the public entry
      # point gives the same program, compiled once more for its memory analysis.
      memory = bm.compiled_memory(lambda p, x, fn=fn: fn(p, x), mod.params, mod.x)
      kernel = None if m == "factors" else np.asarray(outs[mod.name, m])
      results[mod.name][m] = Row(m, times[mod.name, m], firsts[mod.name, m], memory, kernel)
  return results


def measure_isolated(name: str, method: str, repeats: int, budget_s: float) -> Row:
  """Runs one row in a fresh Python process (for a per-row max RSS)."""
  with tempfile.TemporaryDirectory() as tmp:
    path = os.path.join(tmp, "kernel.npy")
    cmd = [sys.executable, os.path.abspath(__file__), "--row", f"{name}:{method}",
           "--repeats", str(repeats), "--budget", str(budget_s), "--kernel-out", path]
    proc = subprocess.run(cmd, check=False, capture_output=True, text=True)
    if proc.returncode != 0:
      raise RuntimeError(f"row {name}:{method} failed:\n{proc.stderr[-4000:]}")
    info = json.loads(proc.stdout.strip().splitlines()[-1])
    kernel = np.load(path) if os.path.exists(path) else None
  memory = bm.Memory(**info["memory"]) if info["memory"] else None
  return Row(method, info["times"], info["first"], memory, kernel, info["rss"])


def _row_main(spec: str, repeats: int, budget_s: float, kernel_out: str) -> None:
  name, method = spec.split(":")
  row = measure(MODELS[name](), method, repeats, budget_s)
  if row.kernel is not None:
    np.save(kernel_out, row.kernel)
  rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
  print(json.dumps(dict(times=row.times, first=row.first, rss=rss,
                        memory=dataclasses.asdict(row.memory) if row.memory else None)))


def table(rows: dict[str, Row], with_rss: bool) -> str:
  jac = rows.get("jacobian")
  floor = rows.get("factors")
  headers = ["method", "median ms", "min ms", "calls", "first s", "peak MiB",
             "temp MiB"] + (["RSS MiB"] if with_rss else []) + [
                 "x faster", "x floor", "rel err"]
  body = []
  for r in rows.values():
    mem = r.memory
    cells = [r.method, f"{r.median * 1e3:.2f}", f"{min(r.times) * 1e3:.2f}",
             str(len(r.times)), f"{r.first:.2f}", bm.mib(mem.peak if mem else None),
             bm.mib(mem.temp if mem else None)]
    if with_rss:
      cells.append(bm.mib(r.rss))
    cells.append(f"{pair_median(jac, r):.1f}" if jac else "-")
    cells.append(f"{pair_median(r, floor):.2f}" if floor else "-")
    cells.append(f"{bm.max_rel_diff(r.kernel, jac.kernel):.1e}"
                 if jac is not None and r.kernel is not None else "-")
    body.append(cells)
  return bm.format_table(headers, body)


def check_targets(results: dict[str, dict[str, Row]], twins: dict[str, str] | None = None
                  ) -> list[tuple[str, str, str, bool | None]]:
  """``(target, pair-median, min-ratio, met)``; ``met`` is judged on the
  pair-median (see the module docstring) and is None when the target cannot be
  evaluated. ``twins`` maps a Flax model to its Haiku twin (``{"mlp_linen":
  "mlp", ...}``)."""
  twins = twins or {}
  out = []
  mlps = [m for m in results if m == "mlp" or twins.get(m) == "mlp"]
  for model in mlps or ["mlp"]:
    rows = results.get(model, {})
    auto, jac = rows.get("auto"), rows.get("jacobian")
    name = f"{model}: auto >= {MLP_SPEEDUP_TARGET:.0f}x faster than jacobian"
    if auto and jac:
      speedup = pair_median(jac, auto)
      out.append((name, f"{speedup:.0f}x", f"{min_ratio(jac, auto):.0f}x",
                  speedup >= MLP_SPEEDUP_TARGET))
    else:
      out.append((name, "n/a (model or jacobian not run)", "", None))
  mlp = results.get("mlp", {})
  auto, floor = mlp.get("auto"), mlp.get("factors")
  if auto and floor:
    ratio = pair_median(auto, floor)
    out.append((f"mlp: auto within {MLP_FLOOR_TARGET}x of the factor floor",
                f"{ratio:.2f}x", f"{min_ratio(auto, floor):.2f}x",
                ratio <= MLP_FLOOR_TARGET))
  for model, twin in twins.items():
    a, t = results.get(model, {}).get("auto"), results.get(twin, {}).get("auto")
    if a is None or t is None:
      continue
    ratio = pair_median(a, t)
    out.append((f"{model}: auto within {TWIN_TARGET}x of {twin} (Haiku) auto",
                f"{ratio:.2f}x", f"{min_ratio(a, t):.2f}x", ratio <= TWIN_TARGET))
    diff = bm.max_rel_diff(a.kernel, t.kernel)
    out.append((f"{model}: kernel = {twin}'s (same weights), rel <= {TWIN_KERNEL_TOL:.0e}",
                f"{diff:.1e}", "", diff <= TWIN_KERNEL_TOL))
  for model, rows in results.items():
    if "auto" in rows and "jacobian" in rows:
      a, j = rows["auto"], rows["jacobian"]
      ratio = pair_median(a, j)
      out.append((f"{model}: auto not slower than jacobian (auto / jacobian <= 1)",
                  f"{ratio:.3g}x", f"{min_ratio(a, j):.3g}x", ratio <= 1.0))
  return out


def header() -> str:
  dev = jax.devices()[0]
  fx = f"flax {flax.__version__}" if flax else f"no flax {_FLAX_MISSING}"
  return (f"ntklayers {ntklayers.__version__} | jax {jax.__version__} | {fx} | backend "
          f"{jax.default_backend()} ({dev.device_kind}) | {os.cpu_count()} CPUs | "
          f"python {platform.python_version()} | {platform.machine()}")


def load() -> str:
  return " ".join(f"{v:.2f}" for v in os.getloadavg())


def groups(names: list[str]) -> list[list[str]]:
  """``names`` with each Flax model's Haiku twin added, grouped by twin family
  (the Haiku model first), in order of first appearance."""
  out: dict[str, list[str]] = {}
  for name in names:
    family = out.setdefault(TWINS.get(name, name), [])
    if name not in family:
      family.append(name)
  for family, members in out.items():
    if family not in members:
      members.insert(0, family)
    members.sort(key=lambda m: m != family)
  return list(out.values())


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--models", default=",".join(DEFAULT_MODELS),
                      help="comma-separated subset of: " + ",".join(MODELS) +
                      " (default: all; a Flax model brings its Haiku twin)")
  parser.add_argument("--repeats", type=int, default=10,
                      help="timed calls per row after the warm-up call (default 10)")
  parser.add_argument("--budget", type=float, default=10.0,
                      help="stop timing a row after this many seconds, once 3 calls "
                      "are done (slow baselines get few repeats; default 10)")
  parser.add_argument("--skip-jacobian", action="store_true",
                      help="skip the whole-model jacobian baseline (slow on the MLP)")
  parser.add_argument("--rss", action="store_true",
                      help="run every row in a fresh process and report its max RSS")
  parser.add_argument("--check", action="store_true",
                      help="exit with status 1 if a measured target is missed")
  parser.add_argument("--markdown", default=None,
                      help="also write the output as a Markdown page (the docs' "
                      "docs/benchmarks/bench_ntk.md)")
  parser.add_argument("--row", help=argparse.SUPPRESS)
  parser.add_argument("--kernel-out", help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  if args.row:
    _row_main(args.row, args.repeats, args.budget, args.kernel_out)
    return 0
  with markdown_report(args.markdown, "Kernel implementations on built-in models",
                       _PAGE_INTRO):
    return _run(parser, args)


def _run(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:

  names = [m.strip() for m in args.models.split(",") if m.strip()]
  unknown = [m for m in names if m not in MODELS]
  if unknown:
    parser.error(f"unknown models {unknown}; choose from {list(MODELS)} {_FLAX_MISSING}")
  methods = [m for m in METHODS if not (args.skip_jacobian and m == "jacobian")]
  print(header())
  print(f"load average before: {load()}; calls of a model's methods, and of a Haiku "
        f"model and its Flax twins, are interleaved (--rss: one process per row)")
  print("time: median/min of steady-state calls (blocked on all outputs); x faster, "
        "x floor: pair-medians (median over interleaved rounds k of time_A[k] / "
        "time_B[k]); peak: XLA compiled memory analysis, argument + output + temp bytes")
  results: dict[str, dict[str, Row]] = {}
  for group in groups(names):
    models = {name: MODELS[name]() for name in group}
    if len(group) > 1:
      how = "one process per row" if args.rss else "calls interleaved"
      print(f"\n-- {', '.join(group)}: same weights, {how}", flush=True)
    if args.rss:
      rows = {name: {m: measure_isolated(name, m, args.repeats, args.budget)
                     for m in methods} for name in group}
    else:
      rows = measure_group(list(models.values()), methods, args.repeats, args.budget)
    for name, model in models.items():
      print(f"\n== {name}: {model.description}; {model.num_params:,} params, float32, "
            f"kernel [N, N, O, O]")
      results[name] = rows[name]
      print(table(rows[name], args.rss), flush=True)
    print(f"(load average: {load()})", flush=True)

  print(f"\n== targets (load average after: {load()})")
  print("verdict on the pair-median: the median over interleaved rounds k of "
        "time_A[k] / time_B[k] (one stalled call cannot move it); min-ratio = "
        "min(time_A) / min(time_B), for comparison"
        + ("; --rss: rows ran in separate processes, so the pairs are not "
           "simultaneous" if args.rss else ""))
  twins = {m: t for m, t in TWINS.items() if m in results}
  rows = [[t, m, n, "n/a" if met is None else ("MET" if met else "NOT MET")]
          for t, m, n, met in check_targets(results, twins)]
  print(bm.format_table(["target", "pair-median", "min-ratio", "verdict"], rows))
  missed = any(r[-1] == "NOT MET" for r in rows)
  return 1 if (args.check and missed) else 0


if __name__ == "__main__":
  sys.exit(main())
