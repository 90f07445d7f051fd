"""Benchmark: ntklayers on the zoo of real architectures, side by side with neural-tangents.

For each zoo model (``benchmarks/zoo/``; float32, default sizes of issue 19, O = 10)
and each of its forms (Haiku, flax.linen, NNX, Equinox, plain JAX; ntklayers
drop-ins or stock layers, all on the same weights), every exact route of
ntklayers (``auto``, ``structured``, ``ntk_vp``, ``jacobian``) and the floor's
factors are compiled ahead of time and timed in interleaved rounds
(``zoo/measure.py``; the non-Haiku forms: ``auto`` only unless
``--framework-routes`` says more): median and min of steady-state calls, the first call (trace
with discovery + XLA compile + first run), XLA's compiled memory analysis.

* **floor** (``zoo/floor.py``): the factors of the Haiku drop-in form (every layer
  annotated) plus the multiply-adds of the cheapest per-layer contractions (the
  ops' own cost model) at this machine's measured float32 GEMM rate; both parts
  are printed. Each form's own floor (its own capture) is printed too.
* **NT** (``--nt``): ``zoo/nt_side.py`` runs in neural-tangents 0.6.5's environment
  (``--nt-python``, jax 0.4.23) on the same weights and inputs (exported to
  ``--workdir`` as ``.npz``; it checks its outputs against ours first) and times
  its ``STRUCTURED_DERIVATIVES``, ``JACOBIAN_CONTRACTION`` and
  ``NTK_VECTOR_PRODUCTS`` the same way, in a separate process before ours.
* ratios: ``xNT`` = NT's fastest median / ours (target >= 2); ``/floor`` = ours /
  floor (target <= 1.5; pair-median over interleaved rounds); ``/jac`` = ours /
  the same form's ``jacobian`` (pair-median); ``rel err`` = max |K - K_ref| /
  max |K_ref| against the Haiku drop-in ``auto`` kernel. Targets of ``auto``:
  >= 2x faster than NT's fastest, within 1.5x of the floor, first call no slower
  than NT's fastest implementation's, peak memory no larger than its.
* ``--profile``: where ``auto``'s time goes (``zoo/floor.py``: plan, factors,
  per-group blocks, the rest) for the Haiku forms, and ``ntklayers.inspect``'s plan.

Each model's results are saved as JSON in ``--workdir``; ``--reuse`` prints saved
results instead of measuring again (so models can be run one at a time, in the
background, and the page assembled at the end).

Usage::

  python benchmarks/bench_zoo.py --models vit --nt --profile          # one model, ~10 min
  python benchmarks/bench_zoo.py --nt --profile --markdown docs/benchmarks/zoo.md
  python benchmarks/bench_zoo.py --table1 --nt          # the issue's first table (Haiku forms)
  python benchmarks/bench_zoo.py --models mlp --size small --frameworks haiku --no-nt
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
import warnings

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402
import numpy as np  # noqa: E402

import ntklayers  # noqa: E402
import zoo  # noqa: E402
from ntklayers._bench import format_table, markdown_report  # noqa: E402
from zoo import floor as F  # noqa: E402
from zoo import measure as M  # noqa: E402
from zoo import weights as W  # noqa: E402

# ntklayers' notes on parameters that use the fallback: the profile reports the plan.
warnings.filterwarnings("ignore", message="ntklayers")

HERE = os.path.dirname(os.path.abspath(__file__))
MODELS = ("mlp", "cnn", "transformer", "resnet", "resnet18", "wrn", "vit", "mixer", "gpt",
          "hk_resnet18")
TABLE1 = ("mlp", "cnn", "transformer", "resnet", "wrn", "vit", "hk_resnet18")
FRAMEWORKS = ("haiku", "linen", "nnx", "eqx", "plain")
NT_SPEEDUP, FLOOR_RATIO = 2.0, 1.5
_PAGE_INTRO = """
ntklayers on real architectures (`benchmarks/zoo/`), every form of each model on the
same weights and inputs, side by side with neural-tangents 0.6.5 (its own environment,
jax 0.4.23). Times are steady-state medians of ahead-of-time compiled kernels, `first`
is trace + compile + first call, `peak` is XLA's compiled memory analysis (NT's: its
lowered program compiled by this jax's XLA, since jax 0.4.23 reports 0 bytes on CPU;
that compile does not count in NT's `first`). The floor is
the factors' time plus the cheapest per-layer contractions at the measured GEMM rate.
See the docstring of `benchmarks/bench_zoo.py` for every column. The machine is a
shared 2-core CPU: NT runs in a separate process before ntklayers, so `xNT` compares
medians taken minutes apart (the load average is printed with each model).
"""


def log(msg: str) -> None:
  print(msg, file=sys.stderr, flush=True)


def ms(s: float) -> str:
  return "-" if s != s else f"{s * 1e3:.1f}" if s < 10 else f"{s * 1e3:.0f}"


def mib(b: int | None) -> str:
  return "-" if b is None else f"{b / 2**20:.1f}"


def ratio(r: float, digits: int = 2) -> str:
  return "-" if r != r else f"{r:.{digits}f}"


# ------------------------------------------------------------------- NT ---


def run_nt(arch: str, args, data: str) -> dict | None:
  """Runs ``zoo/nt_side.py`` in NT's environment; its JSON (with ``kernels``)."""
  out = os.path.join(args.workdir, f"{arch}-{args.size}-nt.json")
  cmd = [args.nt_python, os.path.join(HERE, "zoo", "nt_side.py"), "--data", data, "--out", out,
         "--repeats", str(args.repeats), "--budget", str(args.budget)]
  log(f"  NT: {' '.join(cmd)}")
  with open(out + ".log", "w", encoding="utf-8") as fh:
    proc = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, check=False)
  if not os.path.exists(out):
    log(f"  NT failed (exit {proc.returncode}); see {out}.log")
    return None
  with open(out, encoding="utf-8") as fh:
    result = json.load(fh)
  kernels = os.path.splitext(out)[0] + ".npz"
  result["kernels"] = dict(np.load(kernels)) if os.path.exists(kernels) else {}
  for row in result.get("impls", {}).values():
    mem = row.get("memory")
    if row.get("mlir") and (not mem or not any(mem.values())):  # jax 0.4.23 on CPU: zeros
      row["memory"] = M.memory_of_stablehlo(row["mlir"])
      row["memory_note"] = "NT's StableHLO compiled by this jax's XLA"
  return result


def nt_rows(nt: dict | None) -> dict[str, M.Row]:
  if not nt:
    return {}
  rows = {}
  for name, d in nt.get("impls", {}).items():
    rows[name] = M.Row(("NT", name, ""), d.get("times", []), d.get("first", float("nan")),
                       d.get("lower_s", float("nan")), d.get("compile_s", float("nan")),
                       d.get("memory"), d.get("error"), nt.get("kernels", {}).get(name))
  return rows


# --------------------------------------------------------------- measure ---


def measure_model(arch: str, args, rate: float) -> dict:
  """Measures one zoo model (all requested forms and routes; NT first)."""
  t_start = time.time()
  load_before = list(os.getloadavg())
  cfg, canon, x = zoo.canonical(arch, args.size)
  data = os.path.join(args.workdir, f"{arch}-{args.size}.npz")
  W.save(data, canon, x, zoo.reference_output(arch, args.size), arch=arch, size=args.size)
  nt = run_nt(arch, args, data) if args.nt else None
  models = [zoo.build(arch, fw, form, args.size)
            for fw in args.frameworks if fw in zoo.FRAMEWORKS[arch]
            for form in zoo.forms(arch, fw) if form in args.forms]
  routes = lambda m: args.routes if m.framework == "haiku" else args.framework_routes
  rows = M.measure(models, routes, args.repeats, args.budget, log)
  floors = {}
  for m in models:
    fac_row = rows.get((m.framework, m.form, "factors"))
    if fac_row is None or not fac_row.times:
      continue
    factors = jax.jit(lambda p, x, m=m: ntklayers.capture(m.apply, p, x,
                                                         implementation="structured"))(
        m.params, m.x)
    cs = F.contractions(factors)
    macs = sum(c.macs for c in cs)
    floors[f"{m.framework}/{m.form}"] = dict(
        factors_s=fac_row.median, macs=macs, contraction_s=2 * macs / (rate * 1e9),
        groups=len([c for c in cs if c.kind == "structured"]),
        fallback=[c.name for c in cs if c.kind == "fallback"])
  profiles = {}
  if args.profile:
    for m in models:
      auto = rows.get((m.framework, m.form, "auto"))
      if m.framework == "haiku" and auto is not None and auto.times:
        profiles[f"{m.framework}/{m.form}"] = _profile(m, auto.median)
  ref = rows.get(("haiku", "dropin", "auto")) or next(
      (r for r in rows.values() if r.kernel is not None), None)
  errs = {"/".join(k): M.rel_err(r.kernel, ref.kernel if ref else None)
          for k, r in rows.items()}
  for name, r in nt_rows(nt).items():
    errs[f"NT/{name}"] = M.rel_err(r.kernel, ref.kernel if ref else None)
  if nt:
    nt.pop("kernels", None)
  result = dict(arch=arch, size=args.size, cfg=repr(cfg), n=int(x.shape[0]),
                description=models[0].description if models else arch,
                num_params=models[0].num_params if models else 0, rate_gflops=rate,
                rows=[r.to_json() for r in rows.values()], floors=floors, nt=nt,
                errs=errs, profiles=profiles, load_before=load_before,
                load_after=list(os.getloadavg()), started=time.ctime(t_start),
                seconds=time.time() - t_start)
  with open(_result_path(arch, args), "w", encoding="utf-8") as fh:
    json.dump(result, fh, indent=1)
  return result


def _profile(m: zoo.ZooModel, total_s: float) -> dict:
  p = F.profile(m.apply, m.params, m.x, total_s)
  if hasattr(ntklayers, "inspect"):
    try:
      p["inspect"] = str(ntklayers.inspect(m.apply, m.params, m.x))
    except Exception as e:  # pylint: disable=broad-except  (an API in progress)
      p["inspect"] = f"(ntklayers.inspect failed: {type(e).__name__}: {e})"
  return p


def _result_path(arch: str, args) -> str:
  return os.path.join(args.workdir, f"{arch}-{args.size}-result.json")


# ----------------------------------------------------------------- print ---


def model_floor(result: dict) -> tuple[str, dict] | None:
  """The model's floor: the Haiku drop-in form's (every layer annotated)."""
  floors = result["floors"]
  for key in ("haiku/dropin", *floors):
    if key in floors:
      return key, floors[key]
  return None


def print_model(result: dict) -> list[list[str]]:
  """The model's table, floor and targets; returns the target rows."""
  rows = {tuple(d["key"]): M.Row.from_json(d) for d in result["rows"]}
  nts = nt_rows(result.get("nt"))
  nt_ok = {k: r for k, r in nts.items() if r.times}
  best_nt = min(nt_ok.values(), key=lambda r: r.median) if nt_ok else None
  fl = model_floor(result)
  print(f"\n== {result['arch']}: {result['description']}; {result['num_params']:,} params, "
        f"float32, kernel [N, N, O, O]")
  print(f"   measured {result['started']} in {result['seconds'] / 60:.1f} min; load average "
        f"{' '.join(f'{v:.1f}' for v in result['load_before'])} -> "
        f"{' '.join(f'{v:.1f}' for v in result['load_after'])}")
  if result.get("nt"):
    nt = result["nt"]
    print(f"   NT {nt.get('neural_tangents')} on jax {nt.get('jax')}: outputs vs ours rel err "
          f"{nt.get('output_rel_err', float('nan')):.1e}; load "
          f"{' '.join(f'{v:.1f}' for v in nt.get('load_before', []))}"
          + (f"; ERROR {nt['error']}" if nt.get("error") else ""))
  floor_s, floor_fac = float("nan"), None
  if fl:
    key, f = fl
    floor_s = f["factors_s"] + f["contraction_s"]
    floor_fac = rows.get((*key.split("/"), "factors"))
    print(f"   floor ({key}): factors {ms(f['factors_s'])} ms + contractions "
          f"{f['macs'] / 1e9:.3f} GMAC = {ms(f['contraction_s'])} ms at "
          f"{result['rate_gflops']:.1f} GFLOP/s -> {ms(floor_s)} ms"
          + (f"; fallback: {', '.join(f['fallback'])}" if f["fallback"] else ""))
  headers = ["form / route", "median ms", "min ms", "calls", "first s", "trace s",
             "compile s", "peak MiB", "xNT", "/floor", "/jac", "rel err"]
  body = []
  for key, r in list(rows.items()) + [(("NT", k, ""), r) for k, r in nts.items()]:
    if key[2] == "factors":
      own = result["floors"].get(f"{key[0]}/{key[1]}")
      name = f"{key[0]}/{key[1]} factors" + (f" (+{ms(own['contraction_s'])} ms contractions)"
                                            if own else "")
    else:
      name = "/".join(k for k in key if k)
    if r.error or not r.times:
      body.append([name, f"FAILED: {(r.error or 'no calls')[:60]}"] + [""] * 10)
      continue
    jac = rows.get((key[0], key[1], "jacobian"))
    to_floor = (M.pair_median(r, floor_fac, fl[1]["contraction_s"])
                if fl and floor_fac and key[0] != "NT" else r.median / floor_s)
    body.append([name, ms(r.median), ms(min(r.times)), str(len(r.times)), f"{r.first:.1f}",
                 f"{r.lower_s:.1f}", f"{r.compile_s:.1f}", mib(r.peak),
                 ratio(best_nt.median / r.median) if best_nt else "-",
                 ratio(to_floor),
                 ratio(M.pair_median(r, jac)) if jac and key[0] != "NT" else "-",
                 f"{result['errs'].get('/'.join(k for k in key if k), float('nan')):.0e}"])
  print(format_table(headers, body))
  targets = []
  for key, r in rows.items():
    if key[2] != "auto" or not r.times:
      continue
    name = f"{result['arch']} {key[0]}/{key[1]}"
    to_floor = (M.pair_median(r, floor_fac, fl[1]["contraction_s"]) if fl and floor_fac
                else float("nan"))
    cells = [name]
    cells.append(_verdict(best_nt.median / r.median, NT_SPEEDUP, ">=") if best_nt else "n/a")
    cells.append(_verdict(to_floor, FLOOR_RATIO, "<="))
    cells.append(_verdict(r.first / best_nt.first, 1.0, "<=") if best_nt else "n/a")
    cells.append(_verdict(r.peak / best_nt.peak, 1.0, "<=")
                 if best_nt and r.peak and best_nt.peak else "n/a")
    targets.append(cells)
  for name, p in result.get("profiles", {}).items():
    print(f"-- profile of auto, {name}:")
    print("   " + F.format_profile(p).replace("\n", "\n   "))
    if p.get("inspect"):
      print("   ntklayers.inspect:\n     " + p["inspect"].replace("\n", "\n     "))
  return targets


def _verdict(value: float, target: float, how: str) -> str:
  if value != value:
    return "n/a"
  ok = value >= target if how == ">=" else value <= target
  return f"{value:.2f} {'ok' if ok else 'MISS'}"


def _cell(r: M.Row | None, best) -> str:
  if r is None or not r.times:
    return "-"
  return ms(r.median) + (f" ({best[1].median / r.median:.1f}x)" if best else "")


def print_table1(results: list[dict]) -> None:
  """The issue's first table: NT fastest, Haiku drop-in and stock ``auto``, stock ``jacobian``."""
  print("\n== summary (issue 19's first table): medians in ms; xNT = NT fastest / ntklayers")
  body = []
  for res in results:
    rows = {tuple(d["key"]): M.Row.from_json(d) for d in res["rows"]}
    nts = {k: r for k, r in nt_rows(res.get("nt")).items() if r.times}
    best = min(nts.items(), key=lambda kv: kv[1].median) if nts else None
    fmt = lambda key, rows=rows, best=best: _cell(rows.get(key), best)
    fl = model_floor(res)
    body.append([res["arch"], f"{ms(best[1].median)} ({best[0][:10].lower()})" if best else "-",
                 fmt(("haiku", "dropin", "auto")), fmt(("haiku", "stock", "auto")),
                 fmt(("haiku", "stock", "jacobian")),
                 ms(fl[1]["factors_s"] + fl[1]["contraction_s"]) if fl else "-"])
  print(format_table(["model", "NT fastest", "drop-ins auto", "stock auto", "stock jacobian",
                      "floor"], body))


# ------------------------------------------------------------------ main ---


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--models", default=None, help="comma-separated subset of " +
                      ",".join(MODELS) + " (default: all; --table1: the table's)")
  parser.add_argument("--size", default="default", choices=("default", "small", "tiny", "full"))
  parser.add_argument("--frameworks", default=None, help="default: all (--table1: haiku)")
  parser.add_argument("--forms", default="dropin,stock,entry")
  parser.add_argument("--routes", default=None, help="default: " + ",".join(M.ROUTES) +
                      " (--table1: auto,jacobian)")
  parser.add_argument("--framework-routes", default="auto",
                      help="routes of the non-Haiku forms (default: auto; the generic routes "
                      "are the same programs in every framework)")
  parser.add_argument("--repeats", type=int, default=10)
  parser.add_argument("--budget", type=float, default=20.0,
                      help="seconds per row after which it stops (once 3 calls are timed)")
  parser.add_argument("--nt", action="store_true", help="run neural-tangents' side")
  parser.add_argument("--nt-python", default="/work/nt-env/bin/python")
  parser.add_argument("--table1", action="store_true", help="the issue's first table")
  parser.add_argument("--profile", action="store_true", help="where auto's time goes")
  parser.add_argument("--reuse", action="store_true",
                      help="print the saved results of a model instead of measuring it")
  parser.add_argument("--workdir", default=os.path.join(os.environ.get("TMPDIR", "/tmp"),
                                                        "ntklayers-zoo"))
  parser.add_argument("--markdown", default=None, help="also write a Markdown page")
  args = parser.parse_args(argv)
  names = (args.models.split(",") if args.models else list(TABLE1 if args.table1 else MODELS))
  args.frameworks = (args.frameworks.split(",") if args.frameworks else
                     ["haiku"] if args.table1 else list(FRAMEWORKS))
  args.forms = args.forms.split(",")
  args.framework_routes = args.framework_routes.split(",")
  args.routes = (args.routes.split(",") if args.routes else
                 ["auto", "jacobian"] if args.table1 else list(M.ROUTES))
  unknown = [n for n in names if n not in MODELS]
  if unknown:
    parser.error(f"unknown models {unknown}; choose from {MODELS}")
  os.makedirs(args.workdir, exist_ok=True)
  title = "The zoo: issue 19's first table" if args.table1 else "The zoo: real architectures"
  with markdown_report(args.markdown, title, _PAGE_INTRO):
    return _run(names, args)


def _run(names: list[str], args) -> int:
  print(f"ntklayers {ntklayers.__version__} | jax {jax.__version__} | backend "
        f"{jax.default_backend()} ({jax.devices()[0].device_kind}) | {os.cpu_count()} CPUs | "
        f"python {platform.python_version()}")
  rate = F.matmul_rate()
  print(f"float32 GEMM rate (2048^3, median of 5): {rate:.1f} GFLOP/s; load average "
        f"{' '.join(f'{v:.1f}' for v in os.getloadavg())}")
  results, targets = [], []
  for arch in names:
    path = _result_path(arch, args)
    if args.reuse and os.path.exists(path):
      with open(path, encoding="utf-8") as fh:
        result = json.load(fh)
    else:
      log(f"== measuring {arch} ({args.size})")
      result = measure_model(arch, args, rate)
    results.append(result)
    targets += print_model(result)
    sys.stdout.flush()
  print(f"\n== targets of auto: xNT >= {NT_SPEEDUP:g}, /floor <= {FLOOR_RATIO:g}, first call "
        f"and peak memory / NT fastest's <= 1")
  print(format_table(["model form", "xNT", "/floor", "first / NT", "peak / NT"], targets))
  print_table1(results)
  return 0


if __name__ == "__main__":
  sys.exit(main())
