"""Validation of NTK architecture scores on real data: scikit-learn's digits.

The same run as ``ntklayers nas`` (``ntklayers/_nas_search.py``), writing its
tables to ``benchmarks/nas_digits.md`` for the README: 36 architectures (24
MLPs, 12 small CNNs; depth, width, activation, LayerNorm), each scored at
initialization (TE-NAS κ, full-NTK κ, trace norm, centered label alignment;
``ntklayers.nas.Scorer`` with 3 init seeds on 64 training digits), trained with
Adam under one fixed recipe for 3 seeds, and evaluated on a stratified held-out
quarter. Kendall τ and Spearman ρ, with 95 % bootstrap intervals over the
architectures, against the mean held-out accuracy, beside the parameter-count
and FLOP baselines.

Usage::

  python benchmarks/nas_digits.py            # about 10-15 min on 2 CPU cores
  python benchmarks/nas_digits.py --quick    # 12 architectures, 2 seeds
"""

from __future__ import annotations

import os
import sys

from ntklayers.cli import _main as _cli

if __name__ == "__main__":
  here = os.path.dirname(os.path.abspath(__file__))
  argv = sys.argv[1:]
  if "--markdown" not in argv:
    name = "nas_digits_quick.md" if "--quick" in argv else "nas_digits.md"
    argv += ["--markdown", os.path.join(here, name)]
  sys.exit(_cli.main(["nas", *argv]))
