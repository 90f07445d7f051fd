"""The format of the shared registry of test models (``models.py``) and its helpers.

Every model is a :class:`ModelDescriptor`; ``descriptor.build(dtype)`` returns
``Built(f, params, x1, x2)`` with ``f(params, x) -> [N, ...]`` a plain function
(Haiku ``apply`` or a closure over Haiku state), ``x1`` a batch of ``N1 = 3`` and
``x2`` a batch of ``N2 = 2`` examples (:func:`make_inputs`); :func:`descriptor`
makes the descriptor of a stateless Haiku function.

Parameters have the structure Haiku's ``init`` creates but random values (see
:func:`init_params`): Haiku's zero biases and unit scales would let some terms
of the kernel vanish by accident.

Importers use these names through ``models`` (``models.Built``,
``models.init_params``, ...), which re-exports them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, NamedTuple

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np

N1, N2 = 3, 2


class Built(NamedTuple):
  f: Callable[[Any, Any], jax.Array]
  params: Any
  x1: Any
  x2: Any


@dataclasses.dataclass(frozen=True)
class ModelDescriptor:
  """How to build one test model.

  Attributes:
    name: test id.
    build: ``build(dtype) -> Built(f, params, x1, x2)``; params and float inputs
      in ``dtype``.
    x_shape: shape of one example (a dict of shapes for pytree inputs).
    out_rank: rank of ``f``'s output, batch axis included.
    fallback_warning: annotated layers run under an inner transform (``hk.remat``,
      ``hk.scan``, ``hk.layer_stack``), so ntklayers warns that they go to the
      exact fallback (tolerated, like ``warning="require"``).
    warning: ntklayers warnings the model may emit: ``None`` (none: warnings are
      errors), ``"tolerate"`` (any ``ntklayers:`` ``UserWarning`` may or may not
      appear) or ``"require"`` (the one-time fallback warning must appear on the
      model's first kernel, checked by ``test_required_warnings``;
      elsewhere tolerated, since it is emitted once).
    coupled: samples interact inside the model (BatchNorm in training mode, batch
      centering, ...): the reference differentiates each batch whole.
    int_inputs: inputs are integer token ids.
    slow: heavier model (``pytest.mark.slow``).
    expect_structured: with ``implementation="auto"``, no trainable parameter is
      left on the generic fallback (``kernel_fn.fallback == ()``, checked by
      ``test_registry``): how the model is handled, not only that it is exact.
  """

  name: str
  build: Callable[[Any], Built]
  x_shape: Any
  out_rank: int = 2
  fallback_warning: bool = False
  warning: str | None = None
  coupled: bool = False
  int_inputs: bool = False
  slow: bool = False
  expect_structured: bool = False

  def __post_init__(self):
    assert self.warning in (None, "tolerate", "require"), self.warning

  def __str__(self) -> str:
    return self.name


# --------------------------------------------------------------- helpers ---


def _key(seed: int) -> jax.Array:
  return jax.random.key(seed)


def make_inputs(x_shape: Any, dtype: Any, *, vocab: int | None = None,
                seed: int = 1) -> tuple[Any, Any]:
  """Batches ``x1 [N1, *x_shape]`` and ``x2 [N2, *x_shape]`` (pytrees allowed).

  Drawn with NumPy: op-by-op JAX random calls would each cost a compilation.
  """
  leaves, treedef = jax.tree.flatten(x_shape, is_leaf=lambda s: isinstance(s, tuple))
  rng = np.random.default_rng(seed)
  out = []
  for n in (N1, N2):
    if vocab is not None:
      arrs = [jnp.asarray(rng.integers(0, vocab, (n, *s)), jnp.int32) for s in leaves]
    else:
      arrs = [jnp.asarray(rng.normal(size=(n, *s)), dtype) for s in leaves]
    out.append(jax.tree.unflatten(treedef, arrs))
  return out[0], out[1]


def init_params(init_fn: Callable, dtype: Any, *args, seed: int = 2) -> Any:
  """Parameters with the shapes ``init_fn(key, *args)`` would create, drawn with NumPy.

  Only ``jax.eval_shape`` of Haiku's ``init`` runs: compiling Haiku's truncated
  normal initializers in float64 costs seconds per model on CPU. Weights ``w`` are
  ``N(0, 1 / fan_in)``; everything else (biases, offsets, embeddings) is drawn
  around Haiku's initial value (``scale`` around 1, others around 0), so that no
  term of the kernel vanishes by accident. Returns ``(params, state)`` when
  ``init_fn`` does.
  """
  rng = np.random.default_rng(seed)
  shapes = jax.eval_shape(init_fn, _key(0), *args)

  def fill(path, leaf):
    name = str(getattr(path[-1], "key", path[-1]))
    shape = leaf.shape
    if not jnp.issubdtype(leaf.dtype, jnp.floating):
      return jnp.asarray(np.ones(shape), leaf.dtype)  # e.g. a moving average counter
    noise = rng.normal(size=shape)
    if name == "w":
      value = noise / np.sqrt(max(1, int(np.prod(shape[:-1]))))
    elif name == "scale":
      value = 1.0 + 0.3 * noise
    elif name in ("average", "hidden") and "var_ema" in jax.tree_util.keystr(path):
      value = 1.0 + 0.3 * np.abs(noise)  # a positive moving variance
    else:
      value = 0.3 * noise
    return jnp.asarray(value, dtype)

  return jax.tree_util.tree_map_with_path(fill, shapes)


def _stateless(fn: Callable, x_shape: Any, *, vocab: int | None = None):
  """``build`` for a stateless Haiku function ``fn(x)``."""

  def build(dtype) -> Built:
    net = hk.without_apply_rng(hk.transform(fn))
    x1, x2 = make_inputs(x_shape, dtype, vocab=vocab)
    params = init_params(net.init, dtype, x1)
    return Built(net.apply, params, x1, x2)

  return build


def descriptor(name: str, fn: Callable, x_shape: Any, **kw) -> ModelDescriptor:
  vocab = kw.pop("vocab", None)
  return ModelDescriptor(name, _stateless(fn, x_shape, vocab=vocab), x_shape,
                         int_inputs=vocab is not None, **kw)


def _w_init():
  return hk.initializers.VarianceScaling(1.0)
