"""A zoo of real architectures for benchmarks and tests (not part of ``ntklayers``).

Each model exists in several frameworks (Haiku, flax.linen, NNX, Equinox, plain
JAX) and forms (ntklayers drop-in layers, stock layers), all on the same
deterministic weights, so their kernels can be compared:

* ``plain.py``: the architectures in plain JAX on canonical weights, and their
  sizes (``SIZES``); also what ``nt_side.py`` runs in neural-tangents' environment;
* ``weights.py``: canonical weights, their mapping onto each framework, ``.npz`` files;
* ``hk_models.py``, ``linen_models.py``, ``nnx_models.py``, ``eqx_models.py``: the forms;
* ``registry.py``: ``build(arch, framework, form, size)`` -> :class:`ZooModel`;
* ``floor.py``: the floor (factor time + cheapest contraction FLOPs at the
  measured matmul rate) and the per-phase profile;
* ``nt_side.py``: neural-tangents 0.6.5's timings on the same weights (run with
  ``/work/nt-env/bin/python``).

Usage: ``sys.path.insert(0, "benchmarks"); import zoo; m = zoo.build("vit", "haiku",
"dropin")``.
"""

from .plain import SIZES
from .registry import FRAMEWORKS, ZooModel, build, canonical, forms, reference_output, trainable

ARCHS = tuple(SIZES)

__all__ = ("ARCHS", "FRAMEWORKS", "SIZES", "ZooModel", "build", "canonical", "forms",
           "reference_output", "trainable")
