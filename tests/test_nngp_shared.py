"""``kernel_fn(get=("nngp", "ntk"))`` evaluates the model's forward pass once.

The NNGP reads the outputs of the program the NTK capture replays; XLA's
common-subexpression elimination merges that evaluation with the capture's. We
count operations in the optimized HLO of one jitted program: an activation the
NTK needs (``tanh``: its value enters the derivative) appears as often with the
NNGP as without it, and one it does not need (the last ``sin``: only its
derivative ``cos`` enters the NTK) appears exactly as often as in the forward
pass alone, i.e. once per batch.
"""

from __future__ import annotations

import collections
import re

import haiku as hk
import jax
import jax.numpy as jnp
import pytest

import models
import ntklayers

OPS = ("tanh", "sine", "cosine")


def _mlp(x):
  h = jnp.tanh(hk.Linear(5)(x))
  h = jnp.tanh(ntklayers.Linear(7)(h))
  return jnp.sin(ntklayers.Linear(3)(h))


NET = hk.without_apply_rng(hk.transform(_mlp))


def count_ops(fn, *args) -> collections.Counter:
  hlo = jax.jit(fn).lower(*args).compile().as_text()
  return collections.Counter(re.findall(r"= \S+ (%s)\(" % "|".join(OPS), hlo))


@pytest.mark.parametrize("implementation", [
    "auto", pytest.param("jacobian", marks=pytest.mark.slow),
    pytest.param("ntk_vp", marks=pytest.mark.slow)])
def test_forward_pass_once(implementation):
  x1 = jnp.linspace(-1., 1., 12).reshape(4, 3)
  x2 = jnp.linspace(-2., 1., 15).reshape(5, 3)
  params = models.init_params(NET.init, jnp.float64, x1)
  opts = dict(implementation=implementation)
  ntk_fn = ntklayers.kernel_fn(NET.apply, get="ntk", **opts)
  both_fn = ntklayers.kernel_fn(NET.apply, get=("nngp", "ntk"), **opts)
  fwd = count_ops(lambda p, a, b: (NET.apply(p, a), NET.apply(p, b)), params, x1, x2)
  ntk = count_ops(lambda p, a, b: ntk_fn(p, a, b), params, x1, x2)
  both = count_ops(lambda p, a, b: both_fn(p, a, b), params, x1, x2)
  assert fwd == {"tanh": 4, "sine": 2}, fwd
  assert ntk["sine"] == 0 and ntk["tanh"] >= 4, ntk
  assert both["tanh"] == ntk["tanh"], (both, ntk)  # no forward pass of its own
  assert both["sine"] == fwd["sine"], (both, fwd)  # the last activation, once per batch
  assert both["cosine"] == ntk["cosine"], (both, ntk)
