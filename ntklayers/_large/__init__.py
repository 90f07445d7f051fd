"""Large kernels: blocked, out of core, multi-device, and matrix-free products.

The door of this package (the rest of ntklayers imports from here only):
:func:`ntk_blocked` and :func:`ntk_trace` (kernels in tiles within a memory
budget, resumable ``.npy`` output), :func:`ntk_matvec` (``v -> J (J^T v)``,
whole-batch or tile by tile), and their errors.
"""

from ntklayers._large._blocked import ntk_blocked
from ntklayers._large._blocked import ntk_trace
from ntklayers._large._budget import MemoryBudgetError
from ntklayers._large._independence import InteractingExamplesError
from ntklayers._large._matvec import make_matvec
from ntklayers._large._matvec import ntk_matvec
from ntklayers._large._store import StoreError
from ntklayers._large._store import progress as kernel_file_progress

__all__ = ("InteractingExamplesError", "MemoryBudgetError", "StoreError", "kernel_file_progress",
           "make_matvec", "ntk_blocked", "ntk_matvec", "ntk_trace")
