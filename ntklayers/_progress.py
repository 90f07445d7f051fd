"""Progress bars of long host loops: ``ntk_blocked``'s rounds, the matrix-free
solvers of ``ntklayers.predict`` and the spectral estimators of ``ntklayers.metrics``
share this one.

``progress=None`` shows a bar only when stderr is a terminal, ``True`` always,
``False`` never; tqdm is optional (``True`` without it is an ``ImportError``
that says how to install it).
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from typing import Any


@contextlib.contextmanager
def progress_bar(total: int, desc: str, progress: bool | None,
                 unit: str = "it", leave: bool = False) -> Iterator[Any]:
  """A tqdm bar of ``total`` steps, or ``None`` where no bar is shown.

  Example:
    >>> with progress_bar(3, "solve", False) as bar:
    ...   bar is None
    True
  """
  if progress is False or (progress is None and not sys.stderr.isatty()):
    yield None
    return
  try:
    from tqdm.auto import tqdm  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    if progress:
      raise ImportError("`progress=True` needs tqdm: `pip install tqdm`.") from e
    yield None
    return
  bar = tqdm(total=total, desc=desc, unit=unit, leave=leave)
  try:
    yield bar
  finally:
    bar.close()
