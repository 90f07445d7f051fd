"""The ``ntklayers`` command line (``ntklayers --help``, ``python -m ntklayers``).

Sub-commands: ``demo`` (the main job on bundled data), ``bench`` (the kernel
implementations timed on a built-in model) and ``nas`` (NTK scores against
trained accuracy on digits). :func:`main` returns the exit code.
"""

from ntklayers.cli._main import main

__all__ = ("main",)
