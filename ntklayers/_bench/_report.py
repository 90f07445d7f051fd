"""Benchmark pages written by the benchmark scripts themselves.

``with markdown_report(path, title, intro):`` runs the block with everything it
prints to stdout also collected, and then writes ``path``: a Markdown page with
the title, the exact command line that produced it, the intro and the printed
tables in a ``text`` block. The documentation's benchmark pages are these files,
so a reader reruns the command to reproduce a page.
"""

from __future__ import annotations

import contextlib
import io
import os
import platform
import shlex
import sys
from collections.abc import Iterator

import jax


class _Tee(io.TextIOBase):
  def __init__(self, *streams: io.TextIOBase):
    self.streams = streams

  def write(self, text: str) -> int:
    for s in self.streams:
      s.write(text)
    return len(text)

  def flush(self) -> None:
    for s in self.streams:
      s.flush()


def command_line() -> str:
  """The command that is running, as a reader would type it."""
  script = os.path.relpath(sys.argv[0]) if sys.argv and sys.argv[0] else "python"
  return " ".join(["python", shlex.quote(script), *map(shlex.quote, sys.argv[1:])])


@contextlib.contextmanager
def markdown_report(path: str | None, title: str, intro: str = "") -> Iterator[None]:
  """Collects what the block prints and writes it to ``path`` as a Markdown page
  (nothing is written when ``path`` is ``None`` or the block raises)."""
  if path is None:
    yield
    return
  captured = io.StringIO()
  real = sys.stdout
  sys.stdout = _Tee(real, captured)  # type: ignore[arg-type]
  try:
    yield
  finally:
    sys.stdout = real
  machine = (f"jax {jax.__version__} on {jax.default_backend()}, {os.cpu_count()} CPUs, "
             f"python {platform.python_version()}, {platform.machine()}")
  page = (f"# {title}\n\nWritten by `{command_line()}` ({machine}).\n\n"
          + (intro.strip() + "\n\n" if intro.strip() else "")
          + "```text\n" + captured.getvalue().rstrip() + "\n```\n")
  with open(path, "w", encoding="utf-8") as fh:
    fh.write(page)
