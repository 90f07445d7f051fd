"""Counting JAX compilations from JAX's own compile log (after optax's
``_src/test_utils.py`` ``log_compilations``).

``with log_compilations() as log: ...`` turns on ``jax.log_compiles`` and collects
the ``"Compiling <name> ..."`` records that JAX emits (logger
``jax._src.interpreters.pxla``) once per XLA compilation, whatever triggered it
(``jax.jit``, an op-by-op primitive, a cache miss inside a library), so a test
can assert that a second call with new values of the same shapes compiles
nothing, without counting Python calls or traces.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import re
from collections.abc import Iterator

import jax

_LOGGER = "jax"  # JAX's compile records propagate to it
_COMPILING = re.compile(r"^Compiling (\S+)")


@dataclasses.dataclass
class CompileLog:
  """The names of the programs compiled (``"jit(f)"``), in order."""

  names: list[str] = dataclasses.field(default_factory=list)

  def count(self, pattern: str | None = None) -> int:
    """Number of compilations, or of those whose name contains ``pattern``."""
    return sum(1 for n in self.names if pattern is None or pattern in n)

  def __len__(self) -> int:
    return len(self.names)


class _Handler(logging.Handler):
  def __init__(self, log: CompileLog):
    super().__init__(level=logging.DEBUG)
    self.log = log

  def emit(self, record: logging.LogRecord) -> None:
    match = _COMPILING.match(record.getMessage())
    if match:
      self.log.names.append(match.group(1))


@contextlib.contextmanager
def log_compilations() -> Iterator[CompileLog]:
  """Collects the compilations that happen inside the ``with`` block."""
  log = CompileLog()
  handler = _Handler(log)
  logger = logging.getLogger(_LOGGER)
  logger.addHandler(handler)
  try:
    with jax.log_compiles(True):
      yield log
  finally:
    logger.removeHandler(handler)
