"""Every ```python snippet of README.md and of the docs (``docs/**/*.md``) runs on
its own and shows true values, so the documentation cannot rot.

Each snippet is executed in a fresh namespace, as a reader would paste it: with
JAX's defaults (float32, standard dtype promotion, rank promotion allowed), not
the strict float64 settings of ``conftest.py``. A top-level expression whose
line (or the comment-only line right after it) has a comment starting with a
Python literal, such as

    kernel_fn(params, x1).shape          # (8, 8, 10, 10): x2=None means x2 = x1
    sorted(parts)                        # ['linear', 'linear_1']

is checked: the value (or its ``.shape`` when the literal is a tuple and the
value is an array) must equal the literal.
"""

from __future__ import annotations

import ast
import io
import pathlib
import re
import textwrap
import tokenize
from typing import Any

import jax
import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
SOURCES = [README] + sorted((ROOT / "docs").rglob("*.md"))
_FENCE = re.compile(r"^(?P<indent>[ \t]*)```python[ \t]*\n(?P<body>.*?)^(?P=indent)```[ \t]*$",
                    re.MULTILINE | re.DOTALL)

_NO_VALUE = object()


def snippets() -> list[tuple[pathlib.Path, int, str]]:
  """``(file, first line number, dedented code)`` of each ```python block."""
  out = []
  for path in SOURCES:
    text = path.read_text()
    for m in _FENCE.finditer(text):
      line = text.count("\n", 0, m.start("body")) + 1
      out.append((path, line, textwrap.dedent(m.group("body"))))
  return out


def _literal_prefix(comment: str) -> Any:
  """The shortest prefix of ``comment`` that is a tuple or list literal, else _NO_VALUE."""
  comment = comment.lstrip("#").strip()
  if not comment.startswith(("(", "[")):
    return _NO_VALUE
  for end in range(2, len(comment) + 1):
    try:
      value = ast.literal_eval(comment[:end])
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
      continue
    if isinstance(value, (tuple, list)):
      return value
  return _NO_VALUE


def expectations(code: str, tree: ast.Module) -> dict[int, Any]:
  """``{index of a top-level statement: expected value}`` from the comments."""
  comments: dict[int, str] = {}
  code_lines: set[int] = set()
  for tok in tokenize.generate_tokens(io.StringIO(code).readline):
    if tok.type == tokenize.COMMENT:
      comments[tok.start[0]] = tok.string
    elif tok.type not in (tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT,
                          tokenize.ENDMARKER):
      code_lines.update(range(tok.start[0], tok.end[0] + 1))
  out = {}
  for i, stmt in enumerate(tree.body):
    if not isinstance(stmt, ast.Expr):
      continue
    end = stmt.end_lineno
    comment = comments.get(end)
    if comment is None and end + 1 in comments and end + 1 not in code_lines:
      comment = comments[end + 1]  # the value on its own line below the expression
    if comment is not None:
      value = _literal_prefix(comment)
      if value is not _NO_VALUE:
        out[i] = value
  return out


def run_snippet(path: pathlib.Path, line: int, code: str) -> int:
  """Executes ``code`` in a fresh namespace; returns the number of checked values."""
  tree = ast.parse(code)
  expected = expectations(code, tree)
  ast.increment_lineno(tree, line - 1)  # tracebacks point into the file
  filename = str(path)
  namespace: dict[str, Any] = {"__name__": "__readme__"}
  for i, stmt in enumerate(tree.body):
    if i in expected:
      value = eval(compile(ast.Expression(stmt.value), filename, "eval"), namespace)  # pylint: disable=eval-used
      want = expected[i]
      if isinstance(want, tuple) and hasattr(value, "shape"):
        value = tuple(value.shape)
      assert value == want, (f"{path.name} line {stmt.lineno}: "
                             f"{ast.unparse(stmt.value)} is {value!r}, README says {want!r}")
    else:
      exec(compile(ast.Module([stmt], type_ignores=[]), filename, "exec"), namespace)  # pylint: disable=exec-used
  return len(expected)


SNIPPETS = snippets()


def test_snippets_are_found():
  assert sum(p == README for p, _, _ in SNIPPETS) >= 3
  assert len(SNIPPETS) >= 20
  total = sum(len(expectations(code, ast.parse(code))) for _, _, code in SNIPPETS)
  assert total >= 25, total  # the checked values are found


@pytest.mark.parametrize("path,line,code", [
    pytest.param(path, line, code, id=f"{path.relative_to(ROOT)}:{line}")
    for path, line, code in SNIPPETS])
def test_snippet(path, line, code):
  with jax.enable_x64(False), jax.numpy_dtype_promotion("standard"), \
      jax.numpy_rank_promotion("allow"):
    run_snippet(path, line, code)
