"""The ``ntklayers`` command line: ``demo``, ``bench`` and ``nas``.

``ntklayers demo`` is the main job on bundled data (scikit-learn's digits);
``ntklayers bench`` times the implementations on a built-in model;
``ntklayers nas`` runs the NTK architecture-search validation on digits. Also
``python -m ntklayers``. Exit codes: 0 success, 1 a runtime error (one line on
stderr, e.g. a missing optional dependency), 2 bad arguments (one line).
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from collections.abc import Callable, Iterator, Sequence

from ntklayers.cli import _bench as _cli_bench
from ntklayers.cli import _demo as _cli_demo

_PROG = "ntklayers"
_STAGES = {"demo": 6, "bench": 1, "nas": None}


class _Parser(argparse.ArgumentParser):
  """Bad arguments: one line on stderr and exit status 2 (no usage dump)."""

  def error(self, message: str) -> None:  # type: ignore[override]
    self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _positive(kind: type, minimum: float) -> Callable[[str], float]:
  def parse(text: str):
    try:
      value = kind(text)
    except ValueError:
      raise argparse.ArgumentTypeError(f"expected {kind.__name__}, got {text!r}") from None
    if value < minimum:
      raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {text}")
    return value

  parse.__name__ = kind.__name__
  return parse


def build_parser() -> argparse.ArgumentParser:
  """The argument parser of ``ntklayers`` (three sub-commands)."""
  parser = _Parser(prog=_PROG, description=__doc__.split("\n\n")[0])
  from ntklayers import __version__  # pylint: disable=g-import-not-at-top
  parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
  sub = parser.add_subparsers(dest="command", metavar="{demo,bench,nas}", required=True,
                              parser_class=_Parser)
  demo = sub.add_parser("demo", help="exact NTK of an MLP on digits, with plots",
                        description=_cli_demo.__doc__.split("\n\n")[1].replace("\n", " "))
  count = _positive(int, 1)
  demo.add_argument("--framework", default="haiku", choices=("haiku", "linen", "nnx"),
                    help="framework of the MLP (default haiku)")
  demo.add_argument("--n", type=count, default=256, help="examples in the kernel (256)")
  demo.add_argument("--width", type=count, default=256, help="hidden width (256)")
  demo.add_argument("--depth", type=count, default=2, help="hidden layers (2)")
  demo.add_argument("--n-compare", type=_positive(int, 0), default=64,
                    help="examples for the Jacobian baseline (64; 0 skips it)")
  demo.add_argument("--repeats", type=count, default=3, help="timed calls (3)")
  demo.add_argument("--seed", type=int, default=0, help="initialization seed (0)")
  demo.add_argument("--out", default="ntk_demo", help="folder for the PNGs (ntk_demo)")
  bench = sub.add_parser("bench", help="time auto, ntk_vp and jacobian on a built-in model",
                         description=_cli_bench.__doc__.split("\n\n")[0])
  _cli_bench.add_arguments(bench)
  nas = sub.add_parser("nas", help="NTK scores vs trained accuracy on digits (NAS)",
                       description="Scores a space of MLPs and CNNs at init, trains each "
                       "and prints the ranking and the correlations.")
  from ntklayers.cli import _nas as _nas_search  # pylint: disable=g-import-not-at-top
  _nas_search.add_arguments(nas)
  return parser


@contextlib.contextmanager
def _progress(total: int | None) -> Iterator[Callable[[str], None]]:
  """``progress(stage)`` advances a tqdm bar on stderr (none without tqdm or a
  terminal: tqdm's ``disable=None``)."""
  try:
    from tqdm.auto import tqdm  # pylint: disable=g-import-not-at-top
  except ImportError:
    tqdm = None
  if tqdm is None or total is None:
    yield lambda stage: None
    return
  bar = tqdm(total=total, unit="stage", leave=False, file=sys.stderr, disable=None)
  started: list[str] = []

  def progress(stage: str) -> None:
    if started:
      bar.update(1)
    started.append(stage)
    bar.set_description(stage)

  try:
    yield progress
    bar.update(total - bar.n)
  finally:
    bar.close()


def main(argv: Sequence[str] | None = None) -> int:
  """Entry point of ``ntklayers`` and ``python -m ntklayers``; returns the exit code."""
  args = build_parser().parse_args(argv)
  try:
    if args.command == "bench":
      _cli_bench.check(args)
    with _progress(_STAGES[args.command]) as progress:
      if args.command == "demo":
        _cli_demo.run(args, progress)
      elif args.command == "bench":
        _cli_bench.run(args, progress)
      else:
        from ntklayers.cli import _nas as _nas_search  # pylint: disable=g-import-not-at-top
        _nas_search.run(args)
  except (ImportError, ValueError, OSError) as e:
    print(f"{_PROG} {args.command}: error: {e}", file=sys.stderr)
    return 1
  return 0
