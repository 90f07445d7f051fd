"""Rank correlations with bootstrap confidence intervals (for NAS validation)."""

from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass(frozen=True)
class Correlation:
  """A rank correlation and its percentile-bootstrap 95 % interval."""
  value: float
  low: float
  high: float

  def __str__(self) -> str:
    return f"{self.value:+.2f} [{self.low:+.2f}, {self.high:+.2f}]"


def _ranks(a: np.ndarray) -> np.ndarray:
  from scipy import stats  # pylint: disable=g-import-not-at-top
  return stats.rankdata(a)


def kendall_tau(a: np.ndarray, b: np.ndarray) -> float:
  """Kendall's τ-b (ties counted as in ``scipy.stats.kendalltau``)."""
  from scipy import stats  # pylint: disable=g-import-not-at-top
  return float(stats.kendalltau(a, b).statistic)


def spearman_rho(a: np.ndarray, b: np.ndarray) -> float:
  """Spearman's ρ: the Pearson correlation of the (average) ranks."""
  ra, rb = _ranks(a), _ranks(b)
  if ra.std() == 0 or rb.std() == 0:
    return float("nan")
  return float(np.corrcoef(ra, rb)[0, 1])


def bootstrap(stat, a: np.ndarray, b: np.ndarray, *, samples: int = 1000,
              seed: int = 0) -> Correlation:
  """``stat(a, b)`` with a 95 % percentile interval over resampled pairs.

  Args:
    stat: :func:`kendall_tau` or :func:`spearman_rho`.
    a, b: ``[M]`` paired values (one per architecture).
    samples: bootstrap resamples of the ``M`` pairs (with replacement).
    seed: NumPy seed of the resampling.

  Example:
    >>> import numpy as np
    >>> from ntklayers.cli._stats import bootstrap, kendall_tau
    >>> c = bootstrap(kendall_tau, np.arange(10.), np.arange(10.) ** 2)
    >>> round(c.value, 6), round(c.low, 6), round(c.high, 6)
    (1.0, 1.0, 1.0)
  """
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  ok = ~(np.isnan(a) | np.isnan(b))  # ±inf ranks last/first (e.g. κ of a singular NTK)
  a, b = a[ok], b[ok]
  if a.size < 3:
    return Correlation(float("nan"), float("nan"), float("nan"))
  rng = np.random.default_rng(seed)
  draws = []
  for _ in range(samples):
    idx = rng.integers(0, a.size, a.size)
    v = stat(a[idx], b[idx])
    if np.isfinite(v):
      draws.append(v)
  low, high = np.percentile(draws, [2.5, 97.5]) if draws else (np.nan, np.nan)
  return Correlation(stat(a, b), float(low), float(high))
