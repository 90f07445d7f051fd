"""Bundled real data: scikit-learn's digits, for the command line and examples.

Example:
  >>> import ntklayers.datasets
  >>> x, labels = ntklayers.datasets.load_digits(64)
  >>> x.shape
  (64, 64)
"""

from ntklayers.datasets._digits import load_digits
from ntklayers.datasets._digits import split

__all__ = ("load_digits", "split")
