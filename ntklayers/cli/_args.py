"""What every sub-command shares: the argument parser's error style, argument
types, and progress that shows on a terminal and in a pipe alike.

Bad arguments exit with status 2 and one line on stderr,
``ntklayers <command>: error: argument --n: <what is wrong> (see ntklayers
<command> --help)``, whether argparse or a range check finds them.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

PROG = "ntklayers"


class Parser(argparse.ArgumentParser):
  """Bad arguments: one line on stderr and exit status 2 (no usage dump)."""

  def error(self, message: str) -> None:  # type: ignore[override]
    self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def number(kind: type, minimum: float, maximum: float | None = None,
           why: str = "") -> Callable[[str], float]:
  """An argparse ``type``: ``kind`` in ``[minimum, maximum]`` (``why`` explains the
  maximum); out-of-range values are argument errors (exit status 2)."""
  def parse(text: str):
    try:
      value = kind(text)
    except ValueError:
      raise argparse.ArgumentTypeError(f"expected {kind.__name__}, got {text!r}") from None
    if not value >= minimum:
      raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {text}")
    if maximum is not None and value > maximum:
      raise argparse.ArgumentTypeError(
          f"must be <= {maximum}{f' ({why})' if why else ''}, got {text}")
    return value

  parse.__name__ = kind.__name__
  return parse


Progress = Callable[[str], None]


@contextlib.contextmanager
def progress(command: str, total: int | None) -> Iterator[Progress]:
  """``step(name)`` marks the start of the next step of ``command``.

  On a terminal: a tqdm bar on stderr (if tqdm is installed). Elsewhere (a pipe,
  a log file, CI): one line per finished step on stderr,
  ``ntklayers demo: [2/6] loading digits: 0.3 s``, so that a long command is
  never silent.
  """
  tty = sys.stderr.isatty()
  bar: Any = None
  if tty:
    try:
      from tqdm.auto import tqdm  # pylint: disable=g-import-not-at-top
      bar = tqdm(total=total, unit="step", leave=False, file=sys.stderr)
    except ImportError:
      pass
  current: list = []  # [name, start time, index]

  def finish() -> None:
    if not current:
      return
    name, start, k = current
    if bar is not None:
      bar.update(1)
    elif not tty:
      of = f"/{total}" if total else ""
      print(f"{PROG} {command}: [{k}{of}] {name}: {time.perf_counter() - start:.1f} s",
            file=sys.stderr, flush=True)

  def step(name: str) -> None:
    finish()
    current[:] = [name, time.perf_counter(), (current[2] + 1) if current else 1]
    if bar is not None:
      bar.set_description(name)

  try:
    yield step
    finish()
  finally:
    if bar is not None:
      bar.close()
