"""The benchmark zoo (``benchmarks/zoo/``): every form of every model computes the
same function on the same weights, and the same kernel.

At the ``tiny`` sizes in float64, for each zoo model and each of its frameworks
(Haiku, flax.linen, NNX, Equinox, plain JAX) and forms (ntklayers drop-ins,
stock layers; Equinox also through ``ntklayers.equinox`` when it exists):

* the outputs equal the Haiku stock form's (the weights map correctly);
* ``auto``'s kernel equals the ``jax.jacrev`` reference of the plain-JAX form
  (``tests/reference.py``) at ``TOL64``, so stock and drop-in kernels are equal.

Default: the MLP in every framework and form, and the drop-in and stock Haiku
forms of a WideResNet (BatchNorm) and of the GPT (embeddings, causal attention, a
tied decoder), under a minute on one core; the rest is marked ``slow`` (and, but
for the stock Haiku forms, ``bench``: CI's slow tier leaves those out).
ntklayers' notes about parameters that go to the exact fallback (a tied decoder
with drop-ins, stock layers before they are recognized) are expected here.
"""

from __future__ import annotations

import functools
import os
import sys

import jax
import numpy as np
import pytest

from reference import TOL64, assert_rel_close, reference_ntk

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "benchmarks"))
import zoo  # noqa: E402  pylint: disable=wrong-import-position

# Models checked in every framework by default; the stock Haiku form of every
# model in the slow tier (CI); every other form with the ``bench`` mark too
# (``python -m pytest -m bench tests/test_zoo.py``: about 30 minutes on 2 cores).
_FAST = {("mlp", fw) for fw in ("haiku", "linen", "nnx", "eqx", "plain")} | {
    ("wrn", "haiku"), ("gpt", "haiku")}


def _cases() -> list:
  cases = []
  for arch in zoo.ARCHS:
    for framework in zoo.FRAMEWORKS[arch]:
      for form in zoo.forms(arch, framework):
        if (arch, framework) in _FAST:
          marks: tuple = ()
        elif framework == "haiku" and form == "stock":
          marks = (pytest.mark.slow,)
        else:
          marks = (pytest.mark.slow, pytest.mark.bench)
        cases.append(pytest.param(arch, framework, form, marks=marks,
                                  id=f"{arch}-{framework}-{form}"))
  return cases


def _promotion(framework: str):
  """Flax and Equinox layers rely on standard dtype promotion internally."""
  strict = framework in ("haiku", "plain")
  return jax.numpy_dtype_promotion("strict" if strict else "standard")


@functools.lru_cache(maxsize=None)
def _reference(arch: str) -> tuple[np.ndarray, np.ndarray]:
  """``(outputs, kernel)`` of the plain-JAX form (the stock Haiku form of a model
  that has none: Haiku's own ResNet-18), the kernel by ``jax.jacrev``."""
  framework = "plain" if "plain" in zoo.FRAMEWORKS[arch] else "haiku"
  m = zoo.build(arch, framework, "stock", "tiny", "float64")
  out = np.asarray(jax.jit(m.apply)(m.params, m.x))
  return out, reference_ntk(m.apply, m.params, m.x)


@pytest.mark.filterwarnings("ignore:ntklayers:UserWarning")
@pytest.mark.parametrize("arch,framework,form", _cases())
def test_zoo_kernel(arch, framework, form):
  ref_out, ref_kernel = _reference(arch)
  with _promotion(framework):
    m = zoo.build(arch, framework, form, "tiny", "float64")
    out = np.asarray(jax.jit(m.apply)(m.params, m.x))
    np.testing.assert_allclose(out, ref_out, rtol=1e-12, atol=1e-12)
    kernel = np.asarray(m.kernel_fn("auto")(m.params, m.x))
  assert kernel.shape == ref_kernel.shape
  assert_rel_close(kernel, ref_kernel, TOL64)


def test_zoo_weights_are_shared():
  """Every canonical weight is used by every framework's tree, once (the maps
  raise otherwise), and the trainable sizes agree (nothing is run)."""
  sizes = {}
  for framework in zoo.FRAMEWORKS["mixer"]:
    with _promotion(framework):
      m = zoo.build("mixer", framework, "stock", "tiny", "float64")
    sizes[framework] = m.num_params
  assert len(set(sizes.values())) == 1, sizes
