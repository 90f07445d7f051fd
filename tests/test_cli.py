"""The ``ntklayers`` command line: ``demo``, ``bench``, ``nas`` and their errors.

Runs ``ntklayers.cli._main.main`` in-process on tiny settings (one compile each), and
``python -m ntklayers --help`` once in a subprocess for the module entry point.
"""

from __future__ import annotations

import os
import pathlib
import re
import subprocess
import sys

import jax
import numpy as np
import pytest
from scipy import stats

from ntklayers.cli import _main as _cli
from ntklayers.cli import _nas as _nas_search
from ntklayers.cli import _nas_space
from ntklayers.cli import _stats

ROOT = pathlib.Path(__file__).resolve().parent.parent


def test_demo_writes_pngs_and_exits_zero(tmp_path, capsys):
  out = tmp_path / "pngs"
  code = _cli.main(["demo", "--n", "12", "--width", "8", "--depth", "1",
                    "--n-compare", "4", "--repeats", "1", "--out", str(out)])
  assert code == 0
  captured = capsys.readouterr()
  printed = captured.out
  assert "NTK shape (12, 12, 10, 10)" in printed and "condition number" in printed
  # stderr is not a terminal here: one line per finished step instead of a bar.
  steps = [line for line in captured.err.splitlines() if line.startswith("ntklayers demo: [")]
  assert [line.split("] ")[0] for line in steps] == [f"ntklayers demo: [{k}/6" for k in
                                                      range(1, 7)], captured.err
  for name in ("ntk_heatmap.png", "ntk_spectrum.png"):
    with open(out / name, "rb") as f:
      assert f.read(8) == b"\x89PNG\r\n\x1a\n"
  # The Jacobian baseline agrees with the structured kernel (float32 here).
  rel = float(printed.split("max relative difference ")[1].split()[0])
  assert rel < 1e-5


@pytest.mark.parametrize("argv,fragment", [
    (["demo", "--n", "0"], "argument --n: must be >= 1, got 0"),
    (["demo", "--n", "5000"], "argument --n: must be <= 1797 (the digits set has 1797 "
                              "examples), got 5000"),
    (["bench", "--n", "-3"], "argument --n: must be >= 1, got -3"),
    (["bench", "--repeats", "0"], "argument --repeats: must be >= 1, got 0"),
    (["nas", "--seeds", "0"], "argument --seeds: must be >= 1, got 0"),
    (["demo", "--framework", "torch"], "invalid choice: 'torch'"),
    (["demo", "--width", "wide"], "expected int, got 'wide'"),
    (["bench", "--model", "resnet"], "invalid choice: 'resnet'"),
    (["nope"], "invalid choice: 'nope'"),
    ([], "required: {demo,bench,nas}"),
])
def test_bad_arguments_exit_2_with_one_line(argv, fragment, capsys):
  with pytest.raises(SystemExit) as e:
    _cli.main(argv)
  assert e.value.code == 2
  err = capsys.readouterr().err
  assert fragment in err and err.count("\n") == 1 and "--help" in err


def test_runtime_error_exits_1_with_one_line(tmp_path, capsys):
  blocker = tmp_path / "a_file"
  blocker.write_text("not a folder")
  assert _cli.main(["demo", "--n", "8", "--width", "4", "--depth", "1", "--n-compare", "0",
                    "--repeats", "1", "--out", str(blocker)]) == 1
  errors = [line for line in capsys.readouterr().err.splitlines()
            if not line.startswith("ntklayers demo: [")]
  assert len(errors) == 1 and errors[0].startswith("ntklayers demo: error: "), errors


def test_bench_prints_the_table(capsys):
  assert _cli.main(["bench", "--model", "mlp", "--n", "2", "--methods", "auto",
                    "jacobian", "--repeats", "1"]) == 0
  lines = capsys.readouterr().out.splitlines()
  rows = {line.split()[0]: line.split() for line in lines[3:]}
  assert set(rows) == {"auto", "jacobian"} and float(rows["auto"][-1]) < 1e-5


def test_module_entry_point_help():
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  done = subprocess.run([sys.executable, "-m", "ntklayers", "--help"], capture_output=True,
                        text=True, env=env, timeout=120, check=False)
  assert done.returncode == 0 and "{demo,bench,nas}" in done.stdout


# ------------------------------------------------------------- nas parts ---


def test_search_space_is_varied():
  space = _nas_space.search_space()
  assert len(space) >= 24 and len(set(space)) == len(space)
  assert {a.kind for a in space} == {"mlp", "cnn"}
  assert len({a.depth for a in space}) >= 3 and len({a.act for a in space}) >= 2
  assert {a.norm for a in space} == {None, "layer"}
  assert set(_nas_space.search_space(quick=True)) <= set(space)


def test_params_and_flops_of_an_mlp():
  arch = _nas_space.Arch("mlp", 1, 16, "relu")
  assert _nas_space.num_params(arch) == 64 * 16 + 16 + 16 * 10 + 10
  flops = _nas_space.forward_flops(arch)
  assert 2 * (64 * 16 + 16 * 10) <= flops < 4 * (64 * 16 + 16 * 10)


def test_training_is_deterministic_and_learns():
  from ntklayers.datasets import _digits as _data
  x, y = _data.load_digits(400)
  data = _data.split(x, y, test_fraction=0.25, seed=0)
  arch = _nas_space.Arch("mlp", 1, 16, "tanh")
  recipe = _nas_space.Recipe(steps=60, batch=32, lr=1e-2)
  # optax.adam's bias correction raises an int32 count to a float power, which
  # this suite's strict dtype promotion rejects (an optax matter, see conftest).
  with jax.numpy_dtype_promotion("standard"):
    a = _nas_space.train_accuracy(arch, data, [0, 1], recipe)
    b = _nas_space.train_accuracy(arch, data, [0, 1], recipe)
  np.testing.assert_array_equal(a, b)
  assert a.shape == (2,) and a.min() > 0.5


@pytest.mark.parametrize("stat,ref", [(_stats.kendall_tau, stats.kendalltau),
                                      (_stats.spearman_rho, stats.spearmanr)])
def test_rank_correlations_match_scipy(stat, ref):
  rng = np.random.default_rng(0)
  a = rng.normal(size=30)
  b = a + rng.normal(size=30)
  b[:3] = b[3]  # ties
  np.testing.assert_allclose(stat(a, b), ref(a, b).statistic, rtol=1e-12)
  c = _stats.bootstrap(stat, a, b, samples=200)
  assert c.low <= c.value <= c.high and c.high - c.low > 0.05
  # inf (a singular kernel's κ) is a rank like any other; NaN pairs are dropped.
  a_inf, a_nan = a.copy(), a.copy()
  a_inf[a.argmax()], a_nan[0] = np.inf, np.nan
  assert _stats.bootstrap(stat, a_inf, b, samples=10).value == pytest.approx(stat(a, b))
  assert _stats.bootstrap(stat, a_nan, b, samples=10).value == pytest.approx(
      stat(a[1:], b[1:]))


def test_correlation_table_of_synthetic_rows():
  archs = _nas_space.search_space()[:6]
  rows = [_nas_search.Row(a, 100 * i, 1e3 * i, {"te_nas_kappa": 10.0 - i, "kappa": 5.0,
                                                 "trace_norm": float(i), "alignment": 0.1},
                          "", np.asarray([0.5 + 0.05 * i, 0.5 + 0.05 * i]), 1.0)
          for i, a in enumerate(archs)]
  corr = _nas_search.correlations(rows)
  assert corr["trace_norm"]["kendall"].value == pytest.approx(1.0)
  assert corr["te_nas_kappa"]["spearman"].value == pytest.approx(-1.0)
  assert np.isnan(corr["kappa"]["kendall"].value)  # constant score: no ranking
  ranking, table = _nas_search.tables(rows, corr)
  assert ranking.splitlines()[2].startswith(archs[-1].name)  # best accuracy first
  assert "trace_norm" in table and "params" in table and "flops" in table


def _shape_of(line: str) -> str:
  """A printed line with its numbers (and the paths of the PNGs) replaced by ``#``."""
  line = re.sub(r"\S*ntk_(heatmap|spectrum)\.png", "PNG", line)
  line = re.sub(r"[-+]?(\d+(,\d{3})*(\.\d+)?(e[-+]?\d+)?|inf|nan)", "#", line)
  return re.sub(r"#(-?#)+", "#", line)  # 64-256-256-10: one number sequence


def test_the_documented_demo_output_is_what_the_demo_prints(tmp_path, capsys):
  """docs/demo_output.md (shown in the docs) has the lines the demo prints today,
  number for number in shape (the values vary with the machine)."""
  sample = (ROOT / "docs" / "demo_output.md").read_text().splitlines()
  sample = [line for line in sample if line and not line.startswith(("```", "$"))]
  assert _cli.main(["demo", "--n", "12", "--width", "8", "--depth", "1", "--n-compare", "4",
                    "--repeats", "1", "--out", str(tmp_path)]) == 0
  printed = capsys.readouterr().out.splitlines()
  assert [_shape_of(x) for x in printed] == [_shape_of(x) for x in sample]
