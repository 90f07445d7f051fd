"""``ntklayers nas``: do NTK scores at init predict trained accuracy on digits?

Every architecture of :func:`ntklayers.cli._nas_space.search_space` is scored at
initialization on a probe batch of training digits by
:class:`ntklayers.nas.Scorer` (TE-NAS κ, full-NTK κ, trace norm, centered label
alignment; ``repeats`` init seeds), trained under one fixed recipe for several
seeds, and evaluated on a stratified held-out split. Kendall τ and Spearman ρ
(95 % bootstrap intervals over architectures) relate each score, and the
parameter-count and FLOP baselines, to the mean held-out accuracy.
"""

from __future__ import annotations

import argparse
import dataclasses
import time

import numpy as np

from ntklayers import _bench as _timing
from ntklayers import datasets as _data
from ntklayers.cli import _nas_space
from ntklayers.cli import _args
from ntklayers.cli import _stats

SCORES = ("te_nas_kappa", "kappa", "trace_norm", "alignment")
# Direction in which a score predicts a better architecture (TE-NAS: low κ).
BETTER = {"te_nas_kappa": "low", "kappa": "low", "trace_norm": "high", "alignment": "high",
          "params": "high", "flops": "high"}


@dataclasses.dataclass
class Row:
  arch: _nas_space.Arch
  params: int
  flops: float
  scores: dict[str, float]
  rejected: str
  accuracy: np.ndarray
  seconds: float


def add_arguments(parser: argparse.ArgumentParser) -> None:
  count = _args.number(int, 1)
  parser.add_argument("--quick", action="store_true",
                      help="12 architectures, 2 seeds, 300 steps (a few minutes)")
  parser.add_argument("--seeds", type=count, default=None,
                      help="training seeds per architecture (default 3; quick 2)")
  parser.add_argument("--steps", type=count, default=None,
                      help="training steps (default 400; quick 300)")
  parser.add_argument("--probe", type=_args.number(int, 1, 1347, "the digits training split"),
                      default=64, help="probe batch size for the scores (default 64)")
  parser.add_argument("--repeats", type=count, default=3,
                      help="init seeds per score (default 3)")
  parser.add_argument("--markdown", default=None,
                      help="also write the tables as markdown to this file")


def evaluate(space: list[_nas_space.Arch], *, seeds: int, steps: int, probe: int,
             repeats: int, step: _args.Progress = lambda name: None) -> list[Row]:
  """Scores, trains and evaluates every architecture (``step(name)`` before each)."""
  import ntklayers.nas  # pylint: disable=g-import-not-at-top
  x, labels = _data.load_digits()
  data = _data.split(x, labels, test_fraction=0.25, seed=0)
  scorer = ntklayers.nas.Scorer(data[0][:probe], data[1][:probe], scores=SCORES,
                                repeats=repeats, seed=0, num_classes=10)
  recipe = _nas_space.Recipe(steps=steps)
  rows = []
  for k, arch in enumerate(space):
    step(f"{arch.name} ({k + 1}/{len(space)})")
    start = time.perf_counter()
    result = scorer(arch.fn)
    acc = _nas_space.train_accuracy(arch, data, list(range(seeds)), recipe)
    rows.append(Row(arch, _nas_space.num_params(arch), _nas_space.forward_flops(arch),
                    {s: float(result.means[s]) if s in result.means else float("nan")
                     for s in SCORES},
                    result.reason if result.rejected else "", acc,
                    time.perf_counter() - start))
  return rows


def correlations(rows: list[Row]) -> dict[str, dict[str, _stats.Correlation]]:
  """``{score: {"kendall": c, "spearman": c}}`` of each score vs mean accuracy."""
  acc = np.asarray([r.accuracy.mean() for r in rows])
  values = {s: np.asarray([r.scores[s] for r in rows]) for s in SCORES}
  values["params"] = np.asarray([r.params for r in rows], np.float64)
  values["flops"] = np.asarray([r.flops for r in rows])
  return {name: {"kendall": _stats.bootstrap(_stats.kendall_tau, v, acc),
                 "spearman": _stats.bootstrap(_stats.spearman_rho, v, acc)}
          for name, v in values.items()}


def tables(rows: list[Row], corr: dict[str, dict[str, _stats.Correlation]]
           ) -> tuple[str, str]:
  """(ranking table, correlation table) as plain text."""
  order = sorted(rows, key=lambda r: -r.accuracy.mean())
  ranking = _timing.format_table(
      ["architecture (by accuracy)", "params", "kFLOPs", "acc % (mean ± std)",
       "TE-NAS κ", "κ", "trace", "align", "s"],
      [[r.arch.name, f"{r.params:,}", f"{r.flops / 1e3:.1f}",
        f"{100 * r.accuracy.mean():.2f} ± {100 * r.accuracy.std():.2f}",
        *(f"{r.scores[s]:.3g}" for s in SCORES), f"{r.seconds:.0f}"]
       + ([f"rejected: {r.rejected}"] if r.rejected else []) for r in order])
  table = _timing.format_table(
      ["score vs accuracy", "better", "Kendall τ [95% CI]", "Spearman ρ [95% CI]"],
      [[name, BETTER[name], str(c["kendall"]), str(c["spearman"])]
       for name, c in corr.items()])
  return ranking, table


def run(args: argparse.Namespace, step: _args.Progress = lambda name: None) -> list[Row]:
  """``ntklayers nas``: prints the ranking and the correlations."""
  seeds = args.seeds or (2 if args.quick else 3)
  steps = args.steps or (300 if args.quick else 400)
  space = _nas_space.search_space(args.quick)
  start = time.perf_counter()
  rows = evaluate(space, seeds=seeds, steps=steps, probe=args.probe, repeats=args.repeats,
                  step=step)
  ranking, table = tables(rows, correlations(rows))
  head = (f"digits (1,347 train / 450 held-out, stratified), {len(space)} architectures, "
          f"{seeds} training seeds x {steps} Adam steps (lr 3e-3, batch 128); scores on "
          f"{args.probe} training digits, {args.repeats} init seeds; "
          f"{time.perf_counter() - start:.0f} s")
  print(head, ranking, "", table, sep="\n")
  if args.markdown:
    with open(args.markdown, "w", encoding="utf-8") as f:
      f.write(f"{head}\n\n```text\n{ranking}\n```\n\n```text\n{table}\n```\n")
  return rows
