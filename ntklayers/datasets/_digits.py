"""Bundled real data for the command line and examples: scikit-learn's digits.

The 1,797 8x8 handwritten digits ship with scikit-learn (no download), so the
demo, the NAS search and the examples run offline on a fresh machine.
"""

from __future__ import annotations

import numpy as np

_INSTALL = ("the digits data ship with scikit-learn: pip install scikit-learn "
            "(or pip install 'ntklayers[examples]')")


def load_digits(n: int | None = None, *, dtype: type = np.float32
                ) -> tuple[np.ndarray, np.ndarray]:
  """The first ``n`` digits, standardized per feature over all 1,797.

  Args:
    n: number of examples (default all 1,797).
    dtype: float dtype of the features.

  Returns:
    ``(x [n, 64], labels [n])``: pixels standardized to zero mean and unit
    variance per feature (constant pixels stay 0), integer labels 0-9.

  Raises:
    ImportError: without scikit-learn.
    ValueError: if ``n`` is not in ``[1, 1797]``.

  Example:
    >>> from ntklayers.datasets._digits import load_digits
    >>> x, labels = load_digits(100)
    >>> x.shape, labels.shape
    ((100, 64), (100,))
  """
  try:
    from sklearn.datasets import load_digits as sk_load  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError(_INSTALL) from e
  digits = sk_load()
  x = digits.data.astype(np.float64)
  std = x.std(axis=0)
  x = (x - x.mean(axis=0)) / np.where(std > 0, std, 1.0)
  total = len(x)
  n = total if n is None else n
  if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or not 0 < n <= total:
    raise ValueError(f"`n` must be an int in [1, {total}], got {n!r}.")
  return x[:n].astype(dtype), digits.target[:n].astype(np.int32)


def split(x: np.ndarray, labels: np.ndarray, *, test_fraction: float, seed: int
          ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
  """A stratified random split: ``(x_train, y_train, x_test, y_test)``.

  Each class keeps ``round(test_fraction · count)`` examples for the test set.

  Example:
    >>> from ntklayers.datasets._digits import load_digits, split
    >>> x, y = load_digits()
    >>> xtr, ytr, xte, yte = split(x, y, test_fraction=0.25, seed=0)
    >>> len(xtr) + len(xte) == len(x)
    True
  """
  if not 0 < test_fraction < 1:
    raise ValueError(f"`test_fraction` must be in (0, 1), got {test_fraction!r}.")
  rng = np.random.default_rng(seed)
  test = np.zeros(len(labels), bool)
  for c in np.unique(labels):
    idx = rng.permutation(np.flatnonzero(labels == c))
    test[idx[:int(round(test_fraction * len(idx)))]] = True
  train_idx, test_idx = rng.permutation(np.flatnonzero(~test)), np.flatnonzero(test)
  return x[train_idx], labels[train_idx], x[test_idx], labels[test_idx]
