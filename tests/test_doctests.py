"""The examples in ntklayers' docstrings run and print what they show.

Every module of the ``ntklayers`` package (``pkgutil.walk_packages``) is imported
and each docstring with examples is one test, run with ``doctest``
(``ELLIPSIS | NORMALIZE_WHITESPACE``) and failing on any failed example; a module
whose optional dependency is missing is skipped.

Numerics: the examples print float64 numbers (conftest's ``jax_enable_x64``, kept
here), but they are user code, so they run under JAX's default promotion rules
(``"standard"`` dtype promotion, rank promotion allowed) rather than conftest's
``"strict"`` / ``"raise"``, which are restored afterwards.
"""

from __future__ import annotations

import contextlib
import doctest
import importlib
import io
import pkgutil

import jax
import pytest

import ntklayers

OPTIONFLAGS = doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE

# Modules that must not be imported by a test: ``__main__`` runs the CLI.
SKIP = {"ntklayers.__main__"}

# Docstrings whose examples are known to fail: {doctest name: reason}. Run as
# strict xfails, so that fixing the example (or the code) forces removing the entry.
KNOWN_FAILURES: dict[str, str] = {}


@contextlib.contextmanager
def user_promotion():
  """JAX's default promotion rules for the duration of the block."""
  with jax.numpy_dtype_promotion("standard"), jax.numpy_rank_promotion("allow"):
    yield


def module_names() -> list[str]:
  names = ["ntklayers"]
  for info in pkgutil.walk_packages(ntklayers.__path__, "ntklayers.",
                                    onerror=lambda name: None):
    if info.name not in SKIP:
      names.append(info.name)
  return sorted(names)


def _doctest_params():
  finder = doctest.DocTestFinder(exclude_empty=True)
  out = []
  for name in module_names():
    try:
      module = importlib.import_module(name)
    except ImportError as e:  # an optional dependency (haiku, flax, matplotlib, ...)
      out.append(pytest.param(None, id=name, marks=pytest.mark.skip(reason=str(e))))
      continue
    for test in sorted(finder.find(module, name, module=module), key=lambda t: t.name):
      if not test.examples:
        continue
      marks = []
      if test.name in KNOWN_FAILURES:
        marks.append(pytest.mark.xfail(strict=True, reason=KNOWN_FAILURES[test.name]))
      out.append(pytest.param(test, id=test.name, marks=marks))
  return out


DOCTESTS = _doctest_params()


@pytest.mark.parametrize("test", DOCTESTS)
def test_docstring_examples(test):
  out = io.StringIO()
  runner = doctest.DocTestRunner(optionflags=OPTIONFLAGS)
  with user_promotion():
    result = runner.run(test, out=out.write, clear_globs=True)
  assert result.failed == 0, (f"{result.failed} of {result.attempted} examples of "
                              f"{test.name} failed:\n{out.getvalue()}")


def test_known_failures_exist():
  names = {p.values[0].name for p in DOCTESTS if p.values[0] is not None}
  assert set(KNOWN_FAILURES) <= names, set(KNOWN_FAILURES) - names


def test_examples_exist():
  """Not vacuous: the public entry points and every drop-in module have examples."""
  names = {p.values[0].name for p in DOCTESTS if p.values[0] is not None}
  assert {"ntklayers._core._api.ntk_fn", "ntklayers._core._api.ntk",
          "ntklayers.haiku._layers.Linear", "ntklayers.flax._linen_layers.Dense",
          "ntklayers.flax._nnx_layers.Linear"} <= names, names
