"""The ``ntklayers`` command line: ``demo``, ``bench`` and ``nas``.

``ntklayers demo`` is the main job on bundled data (scikit-learn's digits);
``ntklayers bench`` times the implementations on a built-in model;
``ntklayers nas`` runs the NTK architecture-search validation on digits. Also
``python -m ntklayers``. Exit codes: 0 success, 1 a runtime error (one line on
stderr, e.g. a missing optional dependency), 2 bad arguments (one line).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from ntklayers.cli import _args
from ntklayers.cli import _bench as _cli_bench
from ntklayers.cli import _demo as _cli_demo

_STAGES = {"demo": 6, "bench": 1}



def _plain(text: str) -> str:
  """A docstring paragraph for ``--help``: one line, without reST's double backticks."""
  return " ".join(text.replace("``", "").split())

def build_parser() -> _args.Parser:
  """The argument parser of ``ntklayers`` (three sub-commands)."""
  parser = _args.Parser(prog=_args.PROG, description=_plain(__doc__.split("\n\n")[0]))
  from ntklayers import __version__  # pylint: disable=g-import-not-at-top
  parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
  sub = parser.add_subparsers(dest="command", metavar="{demo,bench,nas}", required=True,
                              parser_class=_args.Parser)
  demo = sub.add_parser("demo", help="exact NTK of an MLP on digits, with plots",
                        description=_plain(_cli_demo.__doc__.split("\n\n")[1]))
  _cli_demo.add_arguments(demo)
  bench = sub.add_parser("bench", help="time auto, ntk_vp and jacobian on a built-in model",
                         description=_plain(_cli_bench.__doc__.split("\n\n")[0]))
  _cli_bench.add_arguments(bench)
  nas = sub.add_parser("nas", help="NTK scores vs trained accuracy on digits (NAS)",
                       description="Scores a space of MLPs and CNNs at init, trains each "
                       "and prints the ranking and the correlations.")
  from ntklayers.cli import _nas  # pylint: disable=g-import-not-at-top  (imports Haiku lazily)
  _nas.add_arguments(nas)
  return parser


def main(argv: Sequence[str] | None = None) -> int:
  """Entry point of ``ntklayers`` and ``python -m ntklayers``; returns the exit code."""
  args = build_parser().parse_args(argv)
  try:
    if args.command == "nas":
      from ntklayers.cli import _nas  # pylint: disable=g-import-not-at-top
      with _args.progress("nas", None) as step:
        _nas.run(args, step)
    else:
      run = _cli_demo.run if args.command == "demo" else _cli_bench.run
      with _args.progress(args.command, _STAGES[args.command]) as step:
        run(args, step)
  except (ImportError, ValueError, OSError) as e:
    print(f"{_args.PROG} {args.command}: error: {e}", file=sys.stderr)
    return 1
  return 0
