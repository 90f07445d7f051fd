"""The shared registry of test models (after Haiku's ``integration/descriptors.py``).

Every model is a :class:`ModelDescriptor`; ``descriptor.build(dtype)`` returns
``Built(f, params, x1, x2)`` with ``f(params, x) -> [N, ...]`` a plain function
(Haiku ``apply`` or a closure over Haiku state), ``x1`` a batch of ``N1 = 3`` and
``x2`` a batch of ``N2 = 2`` examples. Sizes are tiny (widths <= 16) so that every
JAX compilation stays cheap. ``MODELS`` are the Haiku models of ``models_haiku``,
``CLASS_MODELS`` the Haiku models of the classes of issue #6 (``models_classes``);
``BY_NAME`` and ``build`` cover both, :func:`registry` adds the Flax ones.

Parameters have the structure Haiku's ``init`` creates but random values (see
:func:`init_params`): Haiku's zero biases and unit scales would let some terms
of the kernel vanish by accident.

This module is the registry's public entry: the descriptor format and its helpers
(``models_base``) and the Haiku model functions (``models_haiku``) are re-exported
here, so importers keep writing ``models.Built``, ``models.init_params``, ...
"""

from __future__ import annotations

import contextlib
import functools
from typing import Any

import jax.numpy as jnp

from models_base import (  # noqa: F401  (re-exported)
    N1, N2, Built, ModelDescriptor, _key, _stateless, _w_init, descriptor, init_params,
    make_inputs)
from models_haiku import (  # noqa: F401  (re-exported)
    _batchnorm_build, _bn_dropin_build, _bn_dropin_net, _bn_net, _haiku_strict_exception,
    cnn2d, cnn2d_nchw_nobias, conv1d_seq, conv3d, cross_attention, embed_shared_ids,
    embed_tokens, layer_stack_model, layernorm_variants, mlp_deep_narrow, mlp_mixed,
    mlp_relu, mlp_tanh_nobias, remat_model, rmsnorm_groupnorm, scan_rnn, scanned_blocks,
    transformer, weight_shared)


# -------------------------------------------------------------- registry ---

MODELS: tuple[ModelDescriptor, ...] = (
    descriptor("mlp_relu", mlp_relu, (5,)),
    descriptor("mlp_tanh_nobias", mlp_tanh_nobias, (5,)),
    descriptor("mlp_deep_narrow", mlp_deep_narrow, (3,)),
    descriptor("mlp_mixed_hk_linear", mlp_mixed, (5,)),
    descriptor("cnn2d", cnn2d, (9, 9, 2)),
    descriptor("cnn2d_nchw_nobias", cnn2d_nchw_nobias, (2, 6, 6)),
    descriptor("conv1d_seq", conv1d_seq, (6, 3), out_rank=3),
    descriptor("conv3d", conv3d, (4, 4, 4, 2)),
    descriptor("transformer", transformer, (4, 8), out_rank=3, slow=True),
    descriptor("cross_attention_mask", cross_attention, {"q": (3, 8), "kv": (5, 6)}),
    descriptor("embed_tokens", embed_tokens, (5,), vocab=11),
    ModelDescriptor("batchnorm_eval", _batchnorm_build(False), (5,)),
    ModelDescriptor("batchnorm_train", _batchnorm_build(True), (5,), coupled=True),
    descriptor("weight_shared", weight_shared, (5,)),
    descriptor("layernorm_variants", layernorm_variants, (4, 6), out_rank=3),
    descriptor("remat", remat_model, (5,)),
    descriptor("layer_stack", layer_stack_model, (5,)),
    descriptor("scan_rnn", scan_rnn, (4, 3)),
    descriptor("scanned_blocks", scanned_blocks, (3, 8)),
    descriptor("embed_shared_ids", embed_shared_ids, (6,), vocab=5),
    descriptor("rmsnorm_groupnorm", rmsnorm_groupnorm, (4, 6)),
    ModelDescriptor("batchnorm_infer_dropin", _bn_dropin_build(False), (5,)),
    ModelDescriptor("batchnorm_train_dropin", _bn_dropin_build(True), (5,), coupled=True),
)

# The classes of models of issue #6 (tests/models_classes.py; that module imports
# this one lazily, so it is imported here, after everything it needs is defined).
import models_classes  # pylint: disable=g-import-not-at-top,wrong-import-position

CLASS_MODELS: tuple[ModelDescriptor, ...] = models_classes.haiku_models()

BY_NAME = {m.name: m for m in MODELS + CLASS_MODELS}
assert len(BY_NAME) == len(MODELS) + len(CLASS_MODELS), "model names must be unique"


@functools.lru_cache(maxsize=None)
def build(name: str, dtype: Any = jnp.float64) -> Built:
  """Cached ``BY_NAME[name].build(dtype)`` (params and inputs are immutable)."""
  return BY_NAME[name].build(jnp.dtype(dtype))


def model_params(models=MODELS, slow: bool = False):
  """``pytest.param``s over descriptors, slow ones (or all, with ``slow``) marked."""
  import pytest  # pylint: disable=g-import-not-at-top
  return [pytest.param(m, id=m.name, marks=[pytest.mark.slow] if m.slow or slow else [])
          for m in models]


@contextlib.contextmanager
def expect_fallback_warning(model: ModelDescriptor):
  """Tolerates the ntklayers warnings that ``model`` may legitimately emit.

  The fallback warning is emitted once, so whether a given call warns depends on
  test order; ``test_api`` and ``test_required_warnings`` check the
  warning itself. ``warning="tolerate"``: any ``ntklayers:`` ``UserWarning``.
  """
  import warnings  # pylint: disable=g-import-not-at-top
  with warnings.catch_warnings():
    if model.fallback_warning or model.warning == "require":
      warnings.filterwarnings("ignore", message=r".*handled by the exact generic fallback",
                              category=UserWarning)
    if model.warning == "tolerate":
      warnings.filterwarnings("ignore", message=NTKLAYERS_WARNING, category=UserWarning)
    yield


NTKLAYERS_WARNING = r"ntklayers\b"  # every ntklayers warning starts "ntklayers: "


def registry(*, stock: bool = False) -> tuple[ModelDescriptor, ...]:
  """The whole shared registry: the Haiku models above, the linen/NNX models of
  ``models_flax`` (which extends :class:`ModelDescriptor` with Flax entry points)
  and the models of the classes of issue #6 (``models_classes``) of both.

  ``stock=True`` adds the stock-layer models of ``models_stock`` (Haiku, plain JAX,
  linen, NNX, Equinox; built with ``models_stock.build``), which ``test_registry``
  checks; tests that dispatch on ``framework`` to ``build`` / ``models_flax.build``
  leave them out.
  """
  import models_flax  # pylint: disable=g-import-not-at-top  (it imports this module)
  out = (MODELS + tuple(models_flax.FLAX_MODELS) + CLASS_MODELS
         + tuple(models_flax.CLASS_MODELS))
  if stock:
    import models_stock  # pylint: disable=g-import-not-at-top  (it imports this module)
    out += models_stock.stock_models()
  return out
