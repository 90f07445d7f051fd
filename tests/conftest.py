"""Test-wide JAX settings.

* ``jax_enable_x64``: the exactness tests compare against the reference in
  float64 (rel. err. <= 1e-10); float32 tests pass explicit float32 inputs, and
  Haiku creates parameters in the input dtype.
* ``jax_numpy_dtype_promotion="strict"`` and ``jax_numpy_rank_promotion="raise"``
  (as in equinox's test suite): neither ntklayers nor the Haiku layers used here
  may rely on implicit dtype or rank promotion. The one known exception is in
  Haiku itself: ``hk.BatchNorm(is_training=True)`` updates its moving averages
  with ``jnp.power(float_decay, int32_counter)``, so the BatchNorm descriptors in
  ``tests/models.py`` trace that model under a local
  ``jax.numpy_dtype_promotion("standard")``.

``pyproject.toml`` turns every warning into an error; tests that expect one of
ntklayers' own warnings use ``pytest.warns``.

Compilation dominates the suite's run time on CPU (hundreds of tiny programs), so
XLA's backend (LLVM) optimization level is lowered to 0 unless ``XLA_FLAGS``
already chooses one: this cuts compile time about 4x and does not change the
floating-point semantics that the exactness tests check.

``jax_num_cpu_devices=2``: the CPU backend exposes two devices (so that sharded
inputs and parameters can be tested); it must be set before the backend
initializes, i.e. before any array is created, which is why it is set here, at
import time of the first conftest. Computations still run on the default
(first) device unless a test places them elsewhere.
"""

import os

if "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (
      os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0").strip()

import jax  # pylint: disable=g-import-not-at-top,wrong-import-position

jax.config.update("jax_num_cpu_devices", 2)
jax.config.update("jax_enable_x64", True)
jax.config.update("jax_numpy_dtype_promotion", "strict")
jax.config.update("jax_numpy_rank_promotion", "raise")
