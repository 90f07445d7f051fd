"""``ntklayers.plot``: every function returns a Figure and writes a non-empty PNG."""

from __future__ import annotations

import builtins
import importlib

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ntklayers

pytest.importorskip("matplotlib")
from matplotlib.figure import Figure  # pylint: disable=g-import-not-at-top,wrong-import-position

import ntklayers.plot as nplot  # pylint: disable=g-import-not-at-top,wrong-import-position

PNG = b"\x89PNG\r\n\x1a\n"
N, O = 6, 2


@pytest.fixture(scope="module")
def kernels():
  def fn(x):
    return ntklayers.Linear(O, name="out")(jnp.tanh(ntklayers.Linear(5, name="hidden")(x)))

  net = hk.without_apply_rng(hk.transform(fn))
  x = jax.random.normal(jax.random.key(0), (N, 3))
  params = net.init(jax.random.key(1), x)
  return (ntklayers.ntk_fn(net.apply)(params, x),
          ntklayers.ntk_fn(net.apply, layerwise=True)(params, x))


def check_png(fig, path):
  assert isinstance(fig, Figure)
  data = path.read_bytes()
  assert data.startswith(PNG) and len(data) > 1000


def test_heatmap(kernels, tmp_path):
  K, _ = kernels
  labels = np.array([2, 0, 1, 0, 2, 1])
  check_png(nplot.heatmap(K, labels=labels, path=tmp_path / "h.png"), tmp_path / "h.png")
  check_png(nplot.heatmap(K[..., 0, 0], path=tmp_path / "h2.png"), tmp_path / "h2.png")
  onehot = np.eye(3)[labels]
  fig = Figure()
  ax = fig.add_subplot()
  assert nplot.heatmap(K, labels=onehot, ax=ax, path=tmp_path / "h3.png") is fig
  check_png(fig, tmp_path / "h3.png")
  with pytest.raises(ValueError, match="labels"):
    nplot.heatmap(K, labels=labels[:3])
  with pytest.raises(ValueError, match="full layout"):
    nplot.heatmap(jnp.ones((N, O, O)))


def test_spectrum(kernels, tmp_path):
  K, _ = kernels
  check_png(nplot.spectrum(K, tmp_path / "s.png"), tmp_path / "s.png")
  ev = np.array([3.0, 1.0, 1e-3, 0.0, -1e-12])  # non-positive ones are counted, not drawn
  check_png(nplot.spectrum(ev, tmp_path / "s2.png"), tmp_path / "s2.png")


def test_history(tmp_path):
  steps = np.arange(0, 500, 50)
  metrics = {"condition_number": np.geomspace(1e4, 10, 10),
             "relative_change": np.r_[np.linspace(0, 0.3, 9), np.nan]}
  check_png(nplot.history(metrics, tmp_path / "t.png", steps=steps, title="training"),
            tmp_path / "t.png")
  check_png(nplot.history({"a": [1.0, 2.0]}, tmp_path / "t2.png", log=["a"]),
            tmp_path / "t2.png")
  with pytest.raises(ValueError, match="steps"):
    nplot.history(metrics, steps=steps[:3])
  with pytest.raises(ValueError, match="empty"):
    nplot.history({})


def test_layerwise(kernels, tmp_path):
  _, comps = kernels
  assert len(comps) >= 2
  labels = np.array([1, 0, 1, 0, 1, 0])
  check_png(nplot.layerwise(comps, labels=labels, path=tmp_path / "l.png"),
            tmp_path / "l.png")


def test_missing_matplotlib_names_the_extra(monkeypatch):
  real_import = builtins.__import__

  def fake_import(name, *args, **kwargs):
    if name.startswith("matplotlib"):
      raise ImportError(f"No module named {name!r}")
    return real_import(name, *args, **kwargs)

  monkeypatch.setattr(builtins, "__import__", fake_import)
  module = importlib.reload(nplot)  # importing ntklayers.plot itself must not need it
  with pytest.raises(ImportError, match=r"pip install 'ntklayers\[plot\]'"):
    module.spectrum(np.array([1.0, 2.0]))


def _texts(fig):
  """Every text drawn on the figure's axes and in their legends."""
  out = []
  for ax in fig.axes:
    out += [t.get_text() for t in ax.texts]
    if ax.get_legend() is not None:
      out += [t.get_text() for t in ax.get_legend().get_texts()]
  return out


def test_nonfinite_kernels_are_marked_not_hidden(kernels):
  K = np.array(kernels[0])
  K[0, 1, 0, 0] = np.nan
  texts = _texts(nplot.spectrum(K))
  assert any("not finite" in t for t in texts), texts
  assert any("κ = λmax/λmin = nan" in t for t in texts), texts
  assert any("not finite" in t for t in _texts(nplot.heatmap(K)))


def test_colours_fit_the_values():
  from ntklayers.plot import _colours  # pylint: disable=g-import-not-at-top
  cmap, norm = _colours(np.array([[0.0, 0.5], [0.5, 1.0]]), 100.0)
  assert cmap == "viridis" and (norm.vmin, norm.vmax) == (0.0, 1.0)  # sequential from 0
  cmap, norm = _colours(np.array([[-0.2, 0.5], [0.5, 1.0]]), 100.0)
  assert cmap == "RdBu_r" and (norm.vmin, norm.vcenter, norm.vmax) == (-0.2, 0.0, 1.0)


def test_dicts_are_refused_with_the_function_to_use(kernels):
  with pytest.raises(TypeError, match="plot.layerwise"):
    nplot.heatmap(kernels[1])
  with pytest.raises(TypeError, match="plot.layerwise"):
    nplot.spectrum(kernels[1])
  with pytest.raises(TypeError, match="plot.heatmap"):
    nplot.layerwise(kernels[0])


def test_spectral_density(kernels, tmp_path):
  K, _ = kernels
  matvec = lambda v: jnp.asarray(ntklayers.metrics.flatten(K)) @ v
  sd = ntklayers.metrics.operator_spectral_density(matvec, N * O, num_probes=3, num_steps=6)
  fig = nplot.spectral_density(sd, tmp_path / "d.png", eigenvalues=K)
  check_png(fig, tmp_path / "d.png")
  texts = _texts(fig)
  assert any("Gaussian σ" in t for t in texts) and any("exact eigenvalues (12)" in t
                                                       for t in texts), texts
  check_png(nplot.spectral_density(sd, tmp_path / "d2.png", log=False), tmp_path / "d2.png")
  with pytest.raises(TypeError, match="SpectralDensity"):
    nplot.spectral_density(K)
  with pytest.raises(ValueError, match="`bins`"):
    nplot.spectral_density(sd, bins=0)
