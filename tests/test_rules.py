"""The examples of every registered structure rule (after optax's
``contrib/_common_test.py``), and the guards of the rule registry.

``EXAMPLES`` maps every registered kind (``ntklayers._core._rule._REGISTRY``) to examples
of that layer kind: a rule config, a primal (the layer's input, or what the rule
caches instead, e.g. LayerNorm's normalized input), parameters keyed by the op's
roles, and an independent reference ``apply(params, primal) -> out`` written with
``jax.lax`` / ``jnp`` (no ntklayers code). ``OP_LAYOUTS`` documents the canonical
factor layout of every op. ``test_rules_conformance.py`` checks every rule against
its examples.

``test_every_kind_has_an_example`` fails for a registered kind without an
example, so a new rule comes with one (and, for a new op, with its layout).
``register_rule`` refuses an existing kind and anything that is not a rule.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

import ntklayers
import ntklayers.flax  # noqa: F401  (every adapter imported: every rule registered)
import ntklayers.haiku  # noqa: F401
from ntklayers._core import _rule
from ntklayers._core import _rules
from ntklayers._core._rules_embed import EmbedConfig

M1, M2 = 3, 2  # rows of the two batches


@dataclasses.dataclass(frozen=True)
class Example:
  """One layer of a kind.

  Attributes:
    name: test id.
    config: the rule's config record.
    primal: ``primal(m, rng) -> [m, ...]``, the rule's primal for ``m`` rows.
    params: ``params(rng) -> {role: array}`` (roles of the kind's op; a missing
      offset role means the layer has none).
    apply: ``apply(params, primal) -> [m, ...]``, the layer (independent code).
  """

  name: str
  config: Any
  primal: Callable[[int, np.random.Generator], jax.Array]
  params: Callable[[np.random.Generator], dict[str, jax.Array]]
  apply: Callable[[dict[str, jax.Array], jax.Array], jax.Array]


def _rows(*shape):
  """``primal(m, rng)``: ``[m, *shape]`` standard normal."""
  return lambda m, rng: jnp.asarray(rng.normal(size=(m, *shape)))


def _leaves(**shapes):
  """``params(rng)``: ``{role: N(0, 1) of shape}``."""
  return lambda rng: {k: jnp.asarray(rng.normal(size=s)) for k, s in shapes.items()}


def _ids(vocab: int, *shape, low: int = 0, high: int | None = None):
  """``primal(m, rng)``: integer ids in ``[low, high)`` (default ``[0, vocab)``)."""
  high = vocab if high is None else high
  return lambda m, rng: jnp.asarray(rng.integers(low, high, size=(m, *shape)), jnp.int32)


# ---------------------------------------------------------------- dense ---


def _dense(params, x, in_axes=1):
  y = jnp.tensordot(x, params["w"], axes=in_axes)
  b = params["b"]
  return y + b.reshape((1,) * (y.ndim - b.ndim) + b.shape)


# ----------------------------------------------------------------- conv ---


def _conv(cfg: _rules.ConvConfig, spatial: str, bias_axis: int):
  def apply(params, x):
    dn = (f"N{spatial}C", f"{spatial}IO", f"N{spatial}C") if cfg.channels_last else (
        f"NC{spatial}", f"{spatial}IO", f"NC{spatial}")
    y = lax.conv_general_dilated(
        x, params["w"], cfg.strides, cfg.padding, lhs_dilation=cfg.lhs_dilation,
        rhs_dilation=cfg.rhs_dilation, dimension_numbers=dn,
        feature_group_count=cfg.feature_group_count, precision=lax.Precision.HIGHEST)
    b = params["b"].reshape([-1 if a == bias_axis else 1 for a in range(y.ndim)])
    return y + b
  return apply


CONV_2D = _rules.ConvConfig(kernel_shape=(3, 3), strides=(2, 1), padding="SAME",
                            lhs_dilation=(1, 1), rhs_dilation=(1, 2),
                            feature_group_count=2, channels_last=True)
CONV_1D_NCW = _rules.ConvConfig(kernel_shape=(2,), strides=(1,), padding=((1, 2),),
                                lhs_dilation=(2,), rhs_dilation=(1,),
                                feature_group_count=1, channels_last=False)


# ---------------------------------------------------------------- scale ---


def _scale(param_axes):
  def apply(params, x):
    shape = [x.shape[a] if a in param_axes else 1 for a in range(x.ndim)]
    return x * params["scale"].reshape(shape) + params["offset"].reshape(shape)
  return apply


def _bias(param_axes):
  def apply(params, x):
    shape = [x.shape[a] if a in param_axes else 1 for a in range(x.ndim)]
    return x + params["offset"].reshape(shape)
  return apply


# ---------------------------------------------------------------- embed ---


def _take_wrap(params, ids):
  """``E[ids]``: ids in ``[-V, 0)`` wrap around (hk.Embed, flax Embed)."""
  return params["embeddings"][ids]


def _one_hot(vocab):
  def apply(params, ids):
    return jax.nn.one_hot(ids, vocab, dtype=params["embeddings"].dtype) @ params["embeddings"]
  return apply


def _take_clip(vocab):
  def apply(params, ids):
    rows = jnp.clip(jnp.where(ids < 0, ids + vocab, ids), 0, vocab - 1)
    return params["embeddings"][rows]
  return apply


# ---------------------------------------------------------------- table ---

EXAMPLES: dict[str, tuple[Example, ...]] = {
    "dense": (
        Example("dense", _rules.DenseConfig(), _rows(5), _leaves(w=(5, 4), b=(4,)),
                _dense),
        Example("dense_general_shared_positions", _rules.DenseConfig(in_axes=2, out_axes=2),
                _rows(2, 3, 4), _leaves(w=(3, 4, 2, 5), b=(2, 5)),
                lambda p, x: _dense(p, x, in_axes=2)),
    ),
    "conv": (
        Example("conv2d_strided_dilated_grouped", CONV_2D, _rows(5, 6, 4),
                _leaves(w=(3, 3, 2, 6), b=(6,)), _conv(CONV_2D, "HW", bias_axis=3)),
        Example("conv1d_ncw_padded_lhs_dilated", CONV_1D_NCW, _rows(3, 5),
                _leaves(w=(2, 3, 4), b=(4,)), _conv(CONV_1D_NCW, "W", bias_axis=1)),
    ),
    "scale": (
        Example("scale_last_axis", _rules.ScaleConfig(param_axes=(2,)), _rows(4, 6),
                _leaves(scale=(6,), offset=(6,)), _scale((2,))),
        Example("scale_two_axes", _rules.ScaleConfig(param_axes=(1, 3)), _rows(2, 3, 4),
                _leaves(scale=(2, 4), offset=(2, 4)), _scale((1, 3))),
    ),
    "bias": (  # recognized ``y + b``: only the cotangents are read
        Example("bias_last_axis", _rules.ScaleConfig(param_axes=(2,)), _rows(4, 6),
                _leaves(offset=(6,)), _bias((2,))),
        Example("bias_two_axes", _rules.ScaleConfig(param_axes=(1, 3)), _rows(2, 3, 4),
                _leaves(offset=(2, 4)), _bias((1, 3))),
    ),
    "embed": (
        Example("embed_wrap_out_of_range", EmbedConfig(11, "wrap"), _ids(11, 6, low=-11, high=14),
                _leaves(embeddings=(11, 3)), _take_wrap),
        Example("embed_one_hot_out_of_range", EmbedConfig(6, "one_hot"),
                _ids(6, 2, 3, low=-2, high=8), _leaves(embeddings=(6, 4)), _one_hot(6)),
        Example("embed_clip", EmbedConfig(5, "clip"), _ids(5, 4, low=-7, high=9),
                _leaves(embeddings=(5, 2)), _take_clip(5)),
    ),
}


# The canonical layout of each op (``_ops.py``, ``_rules.py``): axis letters of
# ``x_c`` and of ``g_c`` as ``canonicalize`` returns them (``B`` output slices,
# ``M`` layer rows; letters shared by ``x_c`` and ``g_c`` must have equal sizes),
# the dtype kind of ``x_c`` and a check of the parameter sizes.
def _affine_sizes(sizes, params):
  g, i, j = sizes["G"], sizes["I"], sizes["J"]
  assert params["w"].size == g * i * j, (params["w"].shape, sizes)
  if "b" in params:
    assert params["b"].size == g * j, (params["b"].shape, sizes)


def _scale_sizes(sizes, params):
  for k in ("scale", "offset"):
    if k in params:
      assert params[k].size == sizes["C"], (k, params[k].shape, sizes)


def _gather_sizes(sizes, params):
  v, d = params["embeddings"].shape
  assert d == sizes["D"], (params["embeddings"].shape, sizes)
  assert v <= 2 ** sizes["K"] < 2 * max(v, 1), (v, sizes)


OP_LAYOUTS = {
    "affine": ("MTGI", "BMTGJ", "f", _affine_sizes),
    "scale": ("MTC", "BMTC", "f", _scale_sizes),
    "gather": ("MTK", "BMTD", "b", _gather_sizes),
}


def _cases():
  return [pytest.param(kind, ex, id=ex.name) for kind, exs in EXAMPLES.items()
          for ex in exs]


# --------------------------------------------------------------- tests ---


def test_every_kind_has_an_example():
  missing = sorted(set(_rule._REGISTRY) - set(EXAMPLES))
  assert not missing, (f"registered rule kinds without an example in "
                       f"tests/test_rules.py EXAMPLES: {missing}")
  stale = sorted(set(EXAMPLES) - set(_rule._REGISTRY))
  assert not stale, f"EXAMPLES of kinds that are not registered: {stale}"


def test_every_op_has_a_layout():
  ops = {rule.op.name for rule in _rule._REGISTRY.values()}
  missing = sorted(ops - set(OP_LAYOUTS))
  assert not missing, f"ops without a documented layout in OP_LAYOUTS: {missing}"


# ------------------------------------------------------- registry guards ---


@pytest.fixture
def scratch_registry(monkeypatch):
  """A copy of the rule registry for the duration of one test."""
  monkeypatch.setattr(_rule, "_REGISTRY", dict(_rule._REGISTRY))
  return _rule._REGISTRY


def test_register_existing_kind_raises(scratch_registry):
  for kind, rule in list(scratch_registry.items()):
    with pytest.raises(ValueError, match="already registered"):
      ntklayers.register_rule(kind, rule)
    assert scratch_registry[kind] is rule


def test_register_non_rule_raises(scratch_registry):
  dense = _rule.get_rule("dense")
  with pytest.raises(TypeError, match="must be a Rule"):
    ntklayers.register_rule("not_a_rule", object())
  with pytest.raises(TypeError, match="must be a Rule"):
    ntklayers.register_rule("not_a_rule", dense.op)  # an Op is not a Rule
  with pytest.raises(TypeError, match="must be a Rule over an Op"):
    ntklayers.register_rule("not_an_op", dataclasses.replace(dense, op="affine"))
  assert "not_a_rule" not in scratch_registry and "not_an_op" not in scratch_registry


def test_register_new_kind(scratch_registry):
  """A new kind becomes visible to ``get_rule`` (in the scratch registry only)."""
  dense = _rule.get_rule("dense")
  ntklayers.register_rule("dense_copy", dense)
  assert _rule.get_rule("dense_copy") is dense
  assert _rule.get_rule("no_such_kind") is None
