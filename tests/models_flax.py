"""Flax (linen and NNX) test models, in the format of the registry in ``models.py``.

Every entry of :data:`FLAX_MODELS` is a :class:`models.ModelDescriptor` (same
fields, same meaning; the subclass :class:`FlaxModelDescriptor` adds
``framework``) whose ``build(dtype)`` returns a :class:`FlaxBuilt`: a
``models.Built(f, params, x1, x2)`` (a 4-tuple, so code written for the Haiku
registry works unchanged: ``f(params, x)`` is a plain function and ``params`` the
tree the kernel differentiates) that additionally carries what is needed to call
the Flax entry points:

* ``framework``: ``"linen"`` or ``"nnx"``;
* ``ntk_fn(**options) -> kernel_fn(x1, x2=None)``: the kernel through
  ``ntklayers.flax.ntk_fn`` (linen: ``(variables, x1, x2, **apply_kwargs)``) or
  ``ntklayers.flax.nnx.ntk_fn`` (NNX: ``(model_or_split, x1, x2)``);
* ``layer_names``: the expected ``layerwise=True`` keys (linen module paths, NNX
  attribute paths), written out by hand.

``f`` and ``params``:

* linen: ``params = variables["params"]`` and ``f(p, x) = module.apply({"params":
  p, **other_collections}, x, **apply_kwargs)`` (``mutable=["batch_stats"]`` in
  BatchNorm training mode, the updates dropped);
* NNX: ``graphdef, params, *rest = nnx.split(model, nnx.Param, ...)`` and
  ``f(p, x) = nnx.merge(graphdef, p, *rest)(x)`` (``rest`` re-created inside the
  trace, see ``_nnx_build``); ``params`` is an ``nnx.State``.

Models with Flax ``LayerNorm``/``BatchNorm`` run under a local
``jax.numpy_dtype_promotion("standard")`` (see :func:`flax_promotion`), both in
``f`` and around the entry point.

Parameters are created with ``param_dtype=dtype`` (linen/NNX default to float32
even with x64) and, as in ``models.py``, filled with NumPy random values of the
shapes the initializers would create (only ``jax.eval_shape`` / ``nnx.eval_shape``
of the initialization runs): weights ``N(0, 1/fan_in)``, scales around 1,
biases/offsets around 0, embeddings ``N(0, 1)``, moving variances positive.

This module is the registry's public entry: the builders are in
``models_flax_build``, the model classes in ``models_flax_linen`` and
``models_flax_nnx``, and all of them are re-exported here (``models_flax.build``,
``models_flax.linen_variables``, ``models_flax.LinenMLP``, ...).
"""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp

import models
from models import ModelDescriptor, make_inputs  # noqa: F401  (re-exported)
from models_flax_build import (  # noqa: F401  (re-exported)
    FlaxBuilt, FlaxModelDescriptor, _leaf_name, _linen, _linen_build, _nnx, _nnx_build,
    _promoting, fill_value, flax_promotion, linen_variables, nnx_model)
from models_flax_linen import (  # noqa: F401  (re-exported)
    LinenBatchNorm, LinenBlock, LinenCNN, LinenEmbed, LinenEmbedDropIn, LinenGeneral,
    LinenMixed, LinenMLP, LinenNormsDropIn, LinenScannedBlocks, LinenTransformer,
    causal_mask)
from models_flax_nnx import (  # noqa: F401  (re-exported)
    NnxBatchNorm, NnxCNN, NnxEmbed, NnxEmbedDropIn, NnxGeneral, NnxMixed, NnxMLP,
    NnxNormsDropIn, NnxTransformer, exact_attention)

__all__ = ("FLAX_MODELS", "CLASS_MODELS", "BY_NAME", "FlaxBuilt", "FlaxModelDescriptor",
           "build", "exact_attention", "fill_value", "flax_promotion", "linen_variables",
           "nnx_model")


_NORMS = ("RMSNorm_0", "Dense_0", "GroupNorm_0", "GroupNorm_1", "BatchNorm_0", "Dense_1")
_NNX_NORMS = ("rms", "proj", "gn", "gn_size", "bn", "head")


# --------------------------------------------------------------- registry ---

_ATT = "MultiHeadDotProductAttention_0"

FLAX_MODELS: tuple[FlaxModelDescriptor, ...] = (
    # ----------------------------------------------------------- linen
    _linen("linen_mlp", LinenMLP, (5,), ("Dense_0", "Dense_1", "Dense_2")),
    _linen("linen_dense_general", LinenGeneral, (5,), ("DenseGeneral_0", "DenseGeneral_1")),
    _linen("linen_cnn", LinenCNN, (9, 9, 2),
           ("Conv_0", "Conv_1", "Conv_2", "Conv_3", "Dense_0")),
    _linen("linen_transformer", LinenTransformer, (4, 8),
           ("LayerNorm_0", f"{_ATT}/query", f"{_ATT}/key", f"{_ATT}/value",
            f"{_ATT}/out", "LayerNorm_1", "Dense_0", "Dense_1"),
           out_rank=3, apply_kwargs=lambda dtype: {"mask": causal_mask(4)},
           standard=True),
    _linen("linen_scanned_blocks", LinenScannedBlocks, (3, 8),
           ("Dense_0", "ScanCheckpointLinenBlock_0/LayerNorm_0",
            f"ScanCheckpointLinenBlock_0/{_ATT}/query",
            f"ScanCheckpointLinenBlock_0/{_ATT}/key",
            f"ScanCheckpointLinenBlock_0/{_ATT}/value",
            f"ScanCheckpointLinenBlock_0/{_ATT}/out",
            "ScanCheckpointLinenBlock_0/LayerNorm_1", "ScanCheckpointLinenBlock_0/Dense_0",
            "ScanCheckpointLinenBlock_0/Dense_1", "Dense_1"), standard=True),
    _linen("linen_mixed_plain", LinenMixed, (5,),
           ("Dense_0", "Dense_1", "LayerNorm_0", "Dense_2"), standard=True),
    _linen("linen_batchnorm_eval", LinenBatchNorm, (5,),
           ("Dense_0", "BatchNorm_0", "Dense_1"),
           apply_kwargs=lambda dtype: {"train": False}, standard=True),
    _linen("linen_batchnorm_train", LinenBatchNorm, (5,),
           ("Dense_0", "BatchNorm_0", "Dense_1"), coupled=True,
           apply_kwargs=lambda dtype: {"train": True}, mutable=["batch_stats"],
           standard=True),
    _linen("linen_embed", LinenEmbed, (5,), ("Embed_0", "Dense_0", "Dense_1"), vocab=11),
    # ------------------------------------------------------------- NNX
    _nnx("nnx_mlp", NnxMLP, (5,), ("layers/0", "layers/1", "layers/2")),
    _nnx("nnx_linear_general", NnxGeneral, (5,), ("split", "merge")),
    _nnx("nnx_cnn", NnxCNN, (9, 9, 2), ("conv1", "conv2", "conv3", "conv4", "head")),
    _nnx("nnx_transformer", NnxTransformer, (4, 8),
         ("ln1", "att/query", "att/key", "att/value", "att/out", "ln2", "mlp_in",
          "mlp_out"), out_rank=3, standard=True),
    _nnx("nnx_mixed_plain", NnxMixed, (5,), ("inp", "plain", "plain_ln", "head"),
         standard=True),
    _nnx("nnx_batchnorm_eval", NnxBatchNorm, (5,), ("inp", "bn", "head"), mode="eval",
         pass_split=True, standard=True),
    _nnx("nnx_batchnorm_train", NnxBatchNorm, (5,), ("inp", "bn", "head"), coupled=True,
         mode="train", pass_split=True, standard=True),
    _nnx("nnx_embed", NnxEmbed, (5,), ("embed", "proj", "head"), vocab=11),
    # ------------------ Embed, RMSNorm, GroupNorm, BatchNorm drop-ins (both)
    _linen("linen_embed_dropin", LinenEmbedDropIn, (6,), ("Embed_0", "Dense_0", "Dense_1"),
           vocab=5),
    _linen("linen_norms_dropin", LinenNormsDropIn, (4, 6), _NORMS,
           apply_kwargs=lambda dtype: {"train": False}, standard=True),
    _linen("linen_norms_dropin_train", LinenNormsDropIn, (4, 6), _NORMS, coupled=True,
           apply_kwargs=lambda dtype: {"train": True}, mutable=["batch_stats"],
           standard=True),
    _nnx("nnx_embed_dropin", NnxEmbedDropIn, (6,), ("embed", "proj", "head"), vocab=5),
    _nnx("nnx_norms_dropin", NnxNormsDropIn, (4, 6), _NNX_NORMS, mode="eval",
         standard=True),
    _nnx("nnx_norms_dropin_train", NnxNormsDropIn, (4, 6), _NNX_NORMS, coupled=True,
         mode="train", pass_split=True, standard=True),
)

# The linen/NNX models of the classes of issue #6 (tests/models_classes_flax.py). Kept
# out of FLAX_MODELS, whose tests of the structured/fallback split (test_flax_api)
# do not apply to them; test_flax_exactness runs both.
import models_classes_flax  # pylint: disable=g-import-not-at-top,wrong-import-position

CLASS_MODELS: tuple[FlaxModelDescriptor, ...] = models_classes_flax.flax_models()

BY_NAME = {m.name: m for m in FLAX_MODELS + CLASS_MODELS}
assert len(BY_NAME) == len(FLAX_MODELS) + len(CLASS_MODELS), "names must be unique"
assert not set(BY_NAME) & set(models.BY_NAME), "Flax model names must be new"


_CACHE: dict = {}


def build(name: str, dtype: Any = jnp.float64) -> FlaxBuilt:
  """Cached ``BY_NAME[name].build(dtype)`` (params and inputs are immutable;
  callers must not mutate the NNX model in ``extra``)."""
  key = (name, jnp.dtype(dtype))
  if key not in _CACHE:
    _CACHE[key] = BY_NAME[name].build(jnp.dtype(dtype))
  return _CACHE[key]


def model_params(descriptors=FLAX_MODELS):
  """``pytest.param``s over descriptors, slow ones marked."""
  return models.model_params(descriptors)
