"""``examples/finite_width.py --quick`` runs as a reader would run it and writes its
table and plot; the committed results of the full run are well formed."""

from __future__ import annotations

import pathlib
import re
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "examples" / "finite_width.py"

pytest.importorskip("sklearn")
pytest.importorskip("matplotlib")


def table_rows(text: str) -> list[list[str]]:
  rows = [line.strip("|").split("|") for line in text.splitlines()
          if line.startswith("| ") and not line.startswith("| width")]
  return [[c.strip() for c in row] for row in rows]


def test_quick_run_writes_table_and_plot(tmp_path):
  md, png = tmp_path / "fw.md", tmp_path / "fw.png"
  proc = subprocess.run(
      [sys.executable, str(SCRIPT), "--quick", "--md", str(md), "--png", str(png)],
      capture_output=True, text=True, timeout=300, cwd=ROOT, check=False)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert png.read_bytes().startswith(b"\x89PNG") and png.stat().st_size > 10_000
  text = md.read_text()
  rows = table_rows(text)
  assert [r[0] for r in rows] == ["16", "64"], text
  gaps = [float(r[2]) for r in rows]
  assert gaps[1] < gaps[0], text  # the gap shrinks with the width
  assert "Written by `python examples/finite_width.py --quick" in text


def test_committed_full_run():
  text = (ROOT / "examples" / "finite_width.md").read_text()
  rows = table_rows(text)
  assert [r[0] for r in rows] == ["64", "256", "1,024", "4,096"], text
  gaps = [float(r[2]) for r in rows]
  assert all(b < a for a, b in zip(gaps, gaps[1:])), gaps
  assert re.search(r"slope of the test gap at the end against the width: -[0-9.]+", text)
  assert (ROOT / "docs" / "finite_width.png").stat().st_size > 10_000
