"""Benchmark helpers, out of the kernel's way: timing, compiled memory, tables,
and the Markdown pages the benchmark scripts write for the documentation.

Used by the command line (``ntklayers demo``, ``bench``, ``nas``) and the scripts
in ``benchmarks/``. ``ntklayers._bench.zoo`` (imported on its own: it needs
Haiku) holds the built-in Haiku models of ``ntklayers bench``.
"""

from ntklayers._bench._report import markdown_report
from ntklayers._bench._timing import Memory
from ntklayers._bench._timing import compiled_memory
from ntklayers._bench._timing import format_table
from ntklayers._bench._timing import max_rel_diff
from ntklayers._bench._timing import median
from ntklayers._bench._timing import mib
from ntklayers._bench._timing import time_interleaved
from ntklayers._bench._timing import time_round_robin

__all__ = ("Memory", "compiled_memory", "format_table", "markdown_report", "max_rel_diff",
           "median", "mib", "time_interleaved", "time_round_robin")
