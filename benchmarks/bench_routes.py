"""Benchmark: the route choice of ``implementation="auto"``, predicted vs measured.

``auto`` picks a route before computing anything, from a cost model
(``ntklayers/_core/_routes.py``: FLOPs of the passes through the model and of the
contractions, from the traced program and the factor shapes). This script checks
that model against the clock on the zoo (``benchmarks/zoo/``, Haiku forms:
``dropin`` and ``stock``; float32, default sizes). Per model and form, every route
ntklayers can be asked for (``structured``: groups + Jacobian fallback,
``jacobian`` and ``ntk_vp``: the whole model; ``auto``: whichever it chose) is
compiled ahead of time and timed in interleaved rounds (``zoo/measure.py``).
Columns:

* ``pred GFLOP``: the cost model's FLOPs of the route (``ntklayers.inspect(...).costs``);
* ``pred ms``: those FLOPs at this machine's measured float32 GEMM rate (a lower
  bound: XLA reaches that rate only on large matrix products);
* ``median ms``: measured; ``meas/pred``: how far the clock is from the model;
* ``rank p/m``: the route's rank among the measured routes by prediction and by
  measurement (the choice is right when ``auto``'s route ranks first on both, or
  when the one it chose is close to the fastest).

Then one line per form: the route ``auto`` took, the fastest measured route,
whether they are the same program, ``auto / fastest`` (pair-median over the
interleaved rounds; target <= 1.1, met by construction when ``auto`` took the
fastest route: the ratio then shows the timing noise) and ``auto``'s first call.
In each round a route that follows a much heavier one gets one untimed call first
(a program right after a large one runs slower while memory is reclaimed).
Routes whose predicted FLOPs exceed ``--skip-over`` GFLOP (or whose Jacobians are
over the memory budget) are not measured (``-``).

Usage::

  python benchmarks/bench_routes.py                                   # all, ~30 min
  python benchmarks/bench_routes.py --models mlp,cnn --repeats 3
  python benchmarks/bench_routes.py --markdown docs/benchmarks/routes.md
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
import warnings

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402

import ntklayers  # noqa: E402
import zoo  # noqa: E402
from ntklayers._bench import format_table, markdown_report  # noqa: E402
from zoo import floor as F  # noqa: E402
from zoo import measure as M  # noqa: E402

warnings.filterwarnings("ignore", message="ntklayers")

MODELS = ("mlp", "cnn", "transformer", "vit", "resnet", "wrn", "hk_resnet18")
MEASURED = ("auto", "structured", "jacobian", "ntk_vp")
TARGET = 1.1

_PAGE_INTRO = """
How good is the cost model behind `implementation="auto"`? Predicted FLOPs of each
route next to its measured time, on the zoo's Haiku forms (see the docstring of
`benchmarks/bench_routes.py` for every column). FLOPs at the GEMM rate are a lower
bound; what matters for the choice is the order of the routes, and `auto`'s time
relative to the fastest route it could have taken. Absolute times vary with the
machine's load (printed below), ranks and ratios much less.
"""


def log(msg: str) -> None:
  print(msg, file=sys.stderr, flush=True)


def _predicted(insp: ntklayers.Inspection, route: str) -> float | None:
  """Predicted FLOPs of a measurable route (``structured`` is groups + Jacobian
  fallback; ``auto`` is the route it took)."""
  if route == "auto":
    route = insp.route
  cost = insp.costs.get(route)
  return None if cost is None else cost.total


def measure_form(m: zoo.ZooModel, args, rate: float) -> list[list[str]]:
  """Times the routes of one form; prints its table; returns its summary row."""
  insp = ntklayers.inspect(m.apply, m.params, m.x)
  preds = {r: _predicted(insp, r) for r in MEASURED}
  skip = {r for r in MEASURED if r != "auto" and (
      preds[r] is None or preds[r] > args.skip_over * 1e9 or not insp.costs[r].fits)}
  rows, calls = {}, []
  for route in MEASURED:
    if route in skip:
      continue
    row, compiled = M.compile_row(m, route, log)
    rows[route] = row
    if compiled is not None:
      jax.block_until_ready(compiled(m.params, m.x))
      calls.append((row, compiled, preds[route] or 0.0))
  previous = 0.0
  for _ in range(args.repeats):
    for row, compiled, pred in calls:
      if len(row.times) >= 3 and sum(row.times) > args.budget:
        continue
      if previous > 4 * pred:  # right after a much heavier program: one untimed call
        jax.block_until_ready(compiled(m.params, m.x))
      t0 = time.perf_counter()
      jax.block_until_ready(compiled(m.params, m.x))
      row.times.append(time.perf_counter() - t0)
      previous = pred
  timed = {r: row for r, row in rows.items() if row.times}
  by_pred = sorted((r for r in timed if r != "auto"), key=lambda r: preds[r] or 0.0)
  by_meas = sorted((r for r in timed if r != "auto"), key=lambda r: timed[r].median)
  body = []
  for route in MEASURED:
    p = preds[route]
    pred_s = None if p is None else p / (rate * 1e9)
    row = timed.get(route)
    name = route + (f" ({insp.route})" if route == "auto" else "")
    rank = (f"{by_pred.index(route) + 1}/{by_meas.index(route) + 1}"
            if route in by_meas else "-")
    body.append([name, "-" if p is None else f"{p / 1e9:.3f}",
                 "-" if pred_s is None else f"{pred_s * 1e3:.1f}",
                 f"{row.median * 1e3:.1f}" if row else ("skipped" if route in skip else "failed"),
                 f"{row.median / pred_s:.2f}" if row and pred_s else "-", rank,
                 f"{row.first:.1f}" if row else "-"])
  print(f"\n-- {m.arch} haiku/{m.form}: {m.num_params:,} params; auto took {insp.route}; "
        f"structured share {100 * (1 - insp.fallback_fraction):.0f}%")
  print(format_table(["route", "pred GFLOP", "pred ms", "median ms", "meas/pred", "rank p/m",
                      "first s"], body))
  auto = timed.get("auto")
  others = [timed[r] for r in by_meas]
  if auto is None or not others:
    return [f"{m.arch} {m.form}", insp.route, "n/a", "n/a", "n/a", "n/a"]
  fastest = min(others, key=lambda r: r.median)
  ratio = M.pair_median(auto, fastest)
  # auto runs the program of the route it took ("structured" when it kept the
  # Jacobian fallback): taking the fastest route is the target; the timing ratio
  # of two runs of one program shows the noise.
  same = {"structured+ntk_vp": None}.get(insp.route, insp.route) == by_meas[0]
  verdict = "ok" if same or ratio <= TARGET else "MISS"
  return [f"{m.arch} {m.form}", insp.route, f"{by_meas[0]} {fastest.median * 1e3:.1f} ms",
          "yes" if same else "no", f"{ratio:.2f} {verdict}", f"{auto.first:.1f}"]


def main(argv: list[str] | None = None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                               formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--models", default=",".join(MODELS),
                  help=f"comma-separated zoo models (default: {','.join(MODELS)})")
  ap.add_argument("--forms", default="dropin,stock", help="Haiku forms (default: both)")
  ap.add_argument("--repeats", type=int, default=5, help="timed calls per route (default 5)")
  ap.add_argument("--budget", type=float, default=10.0,
                  help="seconds per route after 3 calls (default 10)")
  ap.add_argument("--skip-over", type=float, default=200.0,
                  help="do not measure routes predicted over this many GFLOP (default 200)")
  ap.add_argument("--markdown", default=None, help="also write the output as a Markdown page")
  args = ap.parse_args(argv)
  names = [n for n in args.models.split(",") if n]
  bad = [n for n in names if n not in zoo.FRAMEWORKS]
  if bad:
    ap.error(f"unknown model(s) {bad}; choose from {sorted(zoo.FRAMEWORKS)}")
  forms = [f for f in args.forms.split(",") if f]
  with markdown_report(args.markdown, "Route choice: predicted vs measured", _PAGE_INTRO):
    rate = F.matmul_rate()
    print(f"ntklayers {ntklayers.__version__} | jax {jax.__version__} | backend "
          f"{jax.default_backend()} ({jax.devices()[0].device_kind}) | {os.cpu_count()} CPUs | "
          f"python {platform.python_version()}")
    print(f"float32 GEMM rate (2048^3, median of 5): {rate:.1f} GFLOP/s; load average "
          f"{' '.join(f'{v:.1f}' for v in os.getloadavg())}")
    summary = []
    for arch in names:
      for form in forms:
        if form not in zoo.forms(arch, "haiku"):
          continue
        summary.append(measure_form(zoo.build(arch, "haiku", form), args, rate))
    print(f"\n== auto vs the fastest of ntklayers' own routes (target <= {TARGET})")
    print(format_table(["model form", "auto took", "fastest measured", "same route",
                        "auto/fastest", "auto first s"], summary))
  return 0


if __name__ == "__main__":
  sys.exit(main())
