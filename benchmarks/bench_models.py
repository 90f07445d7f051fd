"""Benchmark models and measurement helpers shared by ``bench_ntk.py``.

They live in the package (``ntklayers/_zoo.py``, ``ntklayers/_timing.py``) so
that the ``ntklayers bench`` command line runs the same models; this module
re-exports them for the scripts in ``benchmarks/``.
"""

from ntklayers._bench._timing import Memory
from ntklayers._bench._timing import compiled_memory
from ntklayers._bench._timing import format_table
from ntklayers._bench._timing import max_rel_diff
from ntklayers._bench._timing import median
from ntklayers._bench._timing import mib
from ntklayers._bench._timing import time_interleaved
from ntklayers._bench._timing import time_round_robin
from ntklayers._bench.zoo import MODELS
from ntklayers._bench.zoo import Model
from ntklayers._bench.zoo import cnn
from ntklayers._bench.zoo import mlp
from ntklayers._bench.zoo import transformer

__all__ = ("MODELS", "Memory", "Model", "cnn", "compiled_memory", "format_table",
           "max_rel_diff", "median", "mib", "mlp", "time_interleaved",
           "time_round_robin", "transformer")
