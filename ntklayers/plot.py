"""Pictures of NTKs: kernel heatmaps, spectra, spectral densities, metric histories, layerwise
components.

Needs matplotlib (``pip install 'ntklayers[plot]'``), imported on first use. Every
function builds a :class:`matplotlib.figure.Figure` directly (no ``pyplot`` global
state, safe with the Agg backend and in threads), returns it, and saves a PNG
when ``path`` is given. Kernels are read with the flattening rule of
:mod:`ntklayers.metrics` (``[N, N, O, O] -> [N·O, N·O]``, row ``n·O + o``).
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import numpy as np
from jax.typing import ArrayLike

from ntklayers import metrics as _metrics

_INSTALL = "ntklayers.plot needs matplotlib: pip install 'ntklayers[plot]'"


def _figure(layout: Literal["constrained", "compressed"] = "constrained", **kwargs: Any) -> Any:
  try:
    from matplotlib.figure import Figure  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError(_INSTALL) from e
  return Figure(layout=layout, **kwargs)


def _finish(fig: Any, path: str | os.PathLike[str] | None) -> Any:
  if path is not None:
    fig.savefig(os.fspath(path), format="png", dpi=100)
  return fig


def _labels(labels: ArrayLike | None, n: int) -> np.ndarray | None:
  if labels is None:
    return None
  out = np.asarray(labels)
  if out.ndim == 2:  # one-hot
    out = out.argmax(-1)
  if out.shape != (n,):
    raise ValueError(f"`labels` must be [N] = [{n}] (or one-hot [N, C]); got shape "
                     f"{np.shape(out)}.")
  return out


def _colours(mat: np.ndarray, percentile: float) -> tuple[str, Any]:
  """A colour map and a norm that fit the values of ``mat``.

  A few outlying examples (large inputs) would wash out the rest, so the range
  ends at the ``percentile`` of the values (larger entries saturate). A kernel
  without negative entries gets a sequential map from 0; one with both signs a
  diverging map centred at 0 whose two halves span exactly the negative and the
  positive range (no unused half of the colour bar).
  """
  from matplotlib import colors  # pylint: disable=g-import-not-at-top
  finite = mat[np.isfinite(mat)]
  if finite.size == 0:
    return "viridis", colors.Normalize(0.0, 1.0)
  hi = float(np.percentile(finite, percentile))
  lo = float(np.percentile(finite, 100.0 - percentile))
  if lo >= 0:
    return "viridis", colors.Normalize(0.0, hi if hi > 0 else float(finite.max()) or 1.0)
  if hi <= 0:
    return "viridis_r", colors.Normalize(lo, 0.0)
  return "RdBu_r", colors.TwoSlopeNorm(vcenter=0.0, vmin=lo, vmax=hi)


def _one_kernel(K: Any, fn: str) -> None:
  """A dict of kernels (``layerwise=True``) is not one kernel: say what to call."""
  if isinstance(K, Mapping):
    raise TypeError(f"`{fn}` draws one kernel; got a dict of {len(K)} kernels "
                    f"({sorted(K)[:4]}...) from layerwise=True: use "
                    f"ntklayers.plot.layerwise, or pass sum(K.values()).")


def _nonfinite_note(ax: Any, values: np.ndarray) -> bool:
  """Writes on the plot that the kernel is not finite; returns whether it is not."""
  bad = int(np.size(values) - np.count_nonzero(np.isfinite(values)))
  if bad:
    ax.text(0.5, 0.5, f"not finite: {bad} NaN/inf entries", transform=ax.transAxes,
            ha="center", va="center", color="red", fontsize=12,
            bbox={"facecolor": "white", "alpha": 0.8})
  return bool(bad)


def _draw_kernel(fig: Any, ax: Any, K: ArrayLike, labels: ArrayLike | None,
                 title: str | None, percentile: float = 99.0) -> None:
  _one_kernel(K, "heatmap")
  mat = np.asarray(_metrics.flatten(K))
  n = np.shape(K)[0]
  per = mat.shape[0] // n  # rows per example (O)
  lab = _labels(labels, n)
  if lab is not None:
    if mat.shape[0] != mat.shape[1]:
      raise ValueError(f"`labels` sort a square kernel K(x, x); got shape {np.shape(K)}.")
    order = np.argsort(lab, kind="stable")
    rows = (order[:, None] * per + np.arange(per)).ravel()
    mat, lab = mat[np.ix_(rows, rows)], lab[order]
  cmap, norm = _colours(mat, percentile)
  im = ax.imshow(mat, cmap=cmap, norm=norm, interpolation="nearest")
  fig.colorbar(im, ax=ax, shrink=0.8)
  _nonfinite_note(ax, mat)
  if lab is not None:
    cuts = np.flatnonzero(np.diff(lab)) + 1
    for c in cuts * per - 0.5:
      ax.axhline(c, color="k", lw=0.8)
      ax.axvline(c, color="k", lw=0.8)
    edges = np.concatenate([[0], cuts, [len(lab)]]) * per
    centers = (edges[:-1] + edges[1:]) / 2 - 0.5
    names = [str(v) for v in lab[np.concatenate([[0], cuts])]]
    ax.set_xticks(centers, names)
    ax.set_yticks(centers, names)
    ax.set_xlabel("samples sorted by label")
  else:
    ax.set_xlabel("example · output (n·O + o)")
  if title:
    ax.set_title(title)


def heatmap(K: ArrayLike, labels: ArrayLike | None = None, ax: Any = None,
            path: str | os.PathLike[str] | None = None, *, title: str | None = "NTK",
            percentile: float = 99.0) -> Any:
  """Heatmap of the flattened kernel, samples sorted by label, class boundaries marked.

  Args:
    K: kernel ``[N1, N2, O, O]`` or ``[N1, N2]`` (full layout, see
      :func:`ntklayers.metrics.flatten`).
    labels: optional ``[N]`` integer labels (or one-hot ``[N, C]``): rows and
      columns are sorted by label (stable) and lines drawn between classes.
    ax: optional matplotlib ``Axes`` to draw into (its figure is returned).
    path: save the figure as a PNG here.
    title: axes title.
    percentile: the colour range ends at this percentile of the entries (and
      starts at ``100 - percentile``; 100: the extremes); larger entries
      saturate, so outliers do not wash out the rest. Non-negative kernels get
      a sequential colour map from 0, kernels with both signs a diverging one
      centred at 0 whose halves fit the negative and positive ranges.

  Returns:
    The :class:`matplotlib.figure.Figure`.

  Example:
    >>> import jax.numpy as jnp, ntklayers.plot
    >>> fig = ntklayers.plot.heatmap(jnp.eye(6), labels=jnp.array([1, 0, 1, 0, 2, 2]))
    >>> type(fig).__name__
    'Figure'
  """
  fig = _figure(figsize=(5, 4.2)) if ax is None else ax.get_figure()
  _draw_kernel(fig, fig.add_subplot() if ax is None else ax, K, labels, title, percentile)
  return _finish(fig, path)


def spectrum(K_or_eigenvalues: ArrayLike, path: str | os.PathLike[str] | None = None, *,
             ax: Any = None, title: str | None = "NTK spectrum") -> Any:
  """Eigenvalues in decreasing order on a log scale, with ``κ`` in the legend.

  Args:
    K_or_eigenvalues: a kernel (full layout; eigenvalues via
      :func:`ntklayers.metrics.eigvalsh`) or a 1-D array of eigenvalues.
    path: save the figure as a PNG here.
    ax: optional matplotlib ``Axes`` to draw into.
    title: axes title.

  Returns:
    The figure. Eigenvalues ``<= 0`` cannot be shown on a log scale; their
    count is written on the plot. A kernel with NaN or inf values is marked as
    not finite, and its ``κ`` is NaN.

  Example:
    >>> import jax.numpy as jnp, ntklayers.plot
    >>> fig = ntklayers.plot.spectrum(jnp.array([4.0, 1.0, 0.5]))
  """
  _one_kernel(K_or_eigenvalues, "spectrum")
  ev = np.asarray(K_or_eigenvalues)
  if ev.ndim != 1:
    ev = np.asarray(_metrics.eigvalsh(K_or_eigenvalues))
  fig = _figure(figsize=(5, 3.5)) if ax is None else ax.get_figure()
  ax = fig.add_subplot() if ax is None else ax
  finite = not _nonfinite_note(ax, ev)  # a NaN kernel has no spectrum and no κ
  ev = np.sort(ev[np.isfinite(ev)])[::-1]
  pos = ev[ev > 0]
  kappa = math.nan if not finite else (
      ev[0] / ev[-1] if ev.size and ev[-1] > 0 else math.inf)
  ax.plot(np.arange(1, pos.size + 1), pos, "o-", ms=3, label=f"κ = λmax/λmin = {kappa:.3g}")
  if pos.size:
    ax.set_yscale("log")
  if pos.size < ev.size:
    ax.text(0.98, 0.02, f"{ev.size - pos.size} eigenvalue(s) <= 0 not shown",
            transform=ax.transAxes, ha="right", va="bottom")
  ax.set_xlabel("index i (decreasing)")
  ax.set_ylabel("λ_i")
  ax.legend(loc="upper right")
  if title:
    ax.set_title(title)
  return _finish(fig, path)


def history(metrics: Mapping[str, ArrayLike], path: str | os.PathLike[str] | None = None,
            *, steps: ArrayLike | None = None, log: bool | Sequence[str] | None = None,
            title: str | None = None) -> Any:
  """Metric histories over training steps, one panel per metric, shared step axis.

  Args:
    metrics: ``{name: [T] values}`` (e.g. a monitor's history); NaN entries
      (steps not yet recorded) are left as gaps.
    path: save the figure as a PNG here.
    steps: ``[T]`` step numbers (default ``0..T-1``).
    log: log y-scale: ``True``/``False`` for all panels, a list of names, or
      ``None`` (automatic: positive values spanning more than two decades).
    title: figure title.

  Returns:
    The figure.

  Example:
    >>> import numpy as np, ntklayers.plot
    >>> fig = ntklayers.plot.history({"kappa": np.array([1e3, 1e2, 50.]),
    ...                               "lambda_max": np.array([3., 2., 2.])})
  """
  if not metrics:
    raise ValueError("`metrics` is empty: nothing to plot.")
  fig = _figure(figsize=(6, 1.9 * len(metrics) + 0.6))
  axes = fig.subplots(len(metrics), 1, sharex=True, squeeze=False)[:, 0]
  for ax, (name, values) in zip(axes, metrics.items()):
    values = np.asarray(values, dtype=float).ravel()
    x = np.arange(values.size) if steps is None else np.asarray(steps).ravel()
    if x.shape != values.shape:
      raise ValueError(f"`steps` has shape {x.shape} but {name!r} has {values.shape}.")
    ax.plot(x, values, ".-")
    ax.set_ylabel(name)
    finite = values[np.isfinite(values)]
    if log is None:
      use_log = finite.size > 0 and finite.min() > 0 and finite.max() > 100 * finite.min()
    else:
      use_log = log if isinstance(log, bool) else name in log
    if use_log:
      ax.set_yscale("log")
  axes[-1].set_xlabel("step")
  if title:
    fig.suptitle(title)
  return _finish(fig, path)


def layerwise(kernels: Mapping[str, ArrayLike], labels: ArrayLike | None = None,
              path: str | os.PathLike[str] | None = None) -> Any:
  """Heatmaps of the layerwise components side by side, with their trace shares.

  Args:
    kernels: ``{name: kernel}`` from ``ntk_fn(..., layerwise=True)`` (full
      layout); the components sum to the full kernel.
    labels: optional ``[N]`` labels; every panel is sorted as in :func:`heatmap`.
    path: save the figure as a PNG here.

  Returns:
    The figure; each panel has its own color scale and shows the component's
    share of the total trace.

  Example:
    >>> import jax.numpy as jnp, ntklayers.plot
    >>> fig = ntklayers.plot.layerwise({"a": jnp.eye(4), "b": 2 * jnp.ones((4, 4))})
  """
  if not isinstance(kernels, Mapping):
    raise TypeError(f"`kernels` must be a dict {{name: kernel}} from "
                    f"ntk_fn(..., layerwise=True); got {type(kernels).__name__}: use "
                    f"ntklayers.plot.heatmap for one kernel.")
  if not kernels:
    raise ValueError("`kernels` is empty: nothing to plot.")
  traces = {k: float(_metrics.trace(v)) for k, v in kernels.items()}
  total = sum(t for t in traces.values() if math.isfinite(t)) or 1.0
  fig = _figure("compressed", figsize=(4.2 * len(kernels), 3.8))
  axes = fig.subplots(1, len(kernels), squeeze=False)[0]
  for ax, (name, K) in zip(axes, kernels.items()):
    _draw_kernel(fig, ax, K, labels, f"{name or '(root)'}: {traces[name] / total:.1%} of tr")
  return _finish(fig, path)


def spectral_density(density: Any, path: str | os.PathLike[str] | None = None, *,
                     eigenvalues: ArrayLike | None = None, ax: Any = None,
                     log: bool = True, bins: int = 60,
                     title: str | None = "NTK spectral density") -> Any:
  """A spectral density from stochastic Lanczos quadrature, beside the exact spectrum.

  Args:
    density: a :class:`ntklayers.metrics.SpectralDensity` (from
      ``ntklayers.metrics.spectral_density``): its ``density`` on its ``grid``,
      smoothed by a Gaussian of width ``sigma`` (stated in the legend).
    path: save the figure as a PNG here.
    eigenvalues: optional exact eigenvalues (1-D) or a kernel (full layout;
      eigenvalues via :func:`ntklayers.metrics.eigvalsh`), drawn as a histogram
      normalized like the density (fraction of eigenvalues per unit ``λ``).
    ax: optional matplotlib ``Axes`` to draw into.
    log: log-scale density axis (an outlying eigenvalue weighs ``1 / dim``), from
      ``1e-6`` of the peak.
    bins: histogram bins over the grid's range.
    title: axes title.

  Returns:
    The figure.

  Example:
    >>> import jax.numpy as jnp, ntklayers.metrics as nm, ntklayers.plot
    >>> A = jnp.diag(jnp.linspace(0., 1., 100))
    >>> sd = nm.operator_spectral_density(lambda v: A @ v, 100, num_probes=4)
    >>> fig = ntklayers.plot.spectral_density(sd, eigenvalues=jnp.linspace(0., 1., 100))
  """
  if not all(hasattr(density, a) for a in ("grid", "density", "sigma", "nodes")):
    raise TypeError(f"`density` must be a SpectralDensity from "
                    f"ntklayers.metrics.spectral_density, got {type(density).__name__}.")
  if isinstance(bins, bool) or not isinstance(bins, (int, np.integer)) or bins < 1:
    raise ValueError(f"`bins` must be a positive int, got {bins!r}.")
  grid, values = np.asarray(density.grid, float), np.asarray(density.density, float)
  fig = _figure(figsize=(5.5, 3.8)) if ax is None else ax.get_figure()
  ax = fig.add_subplot() if ax is None else ax
  probes, nodes = np.shape(density.nodes)
  ax.plot(grid, values, "-", lw=1.5,
          label=f"SLQ, {probes} probes × {nodes} nodes\n(Gaussian σ = {density.sigma:.3g})")
  peak = float(np.nanmax(values)) if np.isfinite(values).any() else 1.0
  if eigenvalues is not None:
    _one_kernel(eigenvalues, "spectral_density")
    ev = np.asarray(eigenvalues)
    if ev.ndim != 1:
      ev = np.asarray(_metrics.eigvalsh(eigenvalues))
    ev = ev[np.isfinite(ev)].astype(float)
    edges = np.linspace(grid[0], grid[-1], bins + 1)
    counts, _ = np.histogram(ev, edges)
    heights = counts / (max(ev.size, 1) * np.diff(edges))
    ax.stairs(heights, edges, fill=True, alpha=0.35, color="C1",
              label=f"exact eigenvalues ({ev.size})")
    peak = max(peak, float(heights.max(initial=0.0)))
  _nonfinite_note(ax, np.asarray(density.nodes))
  if log and peak > 0:
    ax.set_yscale("log")
    ax.set_ylim(peak * 1e-6, peak * 2)
  ax.set_xlabel("eigenvalue λ")
  ax.set_ylabel("fraction of eigenvalues per unit λ")
  ax.legend(loc="upper right", fontsize="small")
  if title:
    ax.set_title(title)
  return _finish(fig, path)
