"""NTK scores at initialization (``ntklayers.nas``) and their result types.

Scores are functions of ``f(params, x) -> [N, ...]`` and of kernels from
:func:`ntklayers.ntk_fn`; :func:`kernel_options` gives the options shared by the
Haiku, linen and NNX adapters of the scorer. Glossary: ``N`` examples, ``O``
outputs per example, ``P`` parameters, ``Θ`` the NTK.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import weakref
from collections.abc import Callable, Iterable
from typing import Any, NamedTuple, cast

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

from ntklayers import _core
from ntklayers import metrics as _metrics
from ntklayers import metrics as _similarity
from ntklayers._core import prepare, resolve_trainable, restrict

SCORES = ("te_nas_kappa", "kappa", "trace_norm", "alignment", "centered_alignment")
# Direction of each score: True if a higher value ranks an architecture higher.
HIGHER_IS_BETTER = {"te_nas_kappa": False, "kappa": False, "trace_norm": True,
                    "alignment": True, "centered_alignment": True}
# Leaf names of weight matrices / kernels: Haiku ("w") and Flax linen/NNX ("kernel").
WEIGHT_NAMES = ("w", "kernel")
# The kernel each score is read from (see `kernel_options`).
KERNEL_OF = {"te_nas_kappa": "te_nas", "kappa": "full", "trace_norm": "diag",
             "alignment": "traced", "centered_alignment": "traced"}


def _leaf_name(path: tuple) -> str | None:
  """The key naming a leaf: the last dict key or attribute, skipping NNX's ``.value``."""
  keys = [k for k in path if getattr(k, "name", None) not in ("value", "raw_value")]
  if keys and isinstance(keys[-1], (jax.tree_util.DictKey, jax.tree_util.GetAttrKey)):
    return str(getattr(keys[-1], "key", getattr(keys[-1], "name", None)))
  return None


def weights_only(params: Any, names: Iterable[str] = WEIGHT_NAMES) -> Any:
  """The mask of weight matrices and convolution kernels, as TE-NAS selects them.

  A leaf is kept iff its own name is in ``names``: Haiku ``w`` (``hk.Linear``,
  ``hk.Conv*``, the projections of ``hk.MultiHeadAttention``, their
  ``ntklayers`` drop-ins) and Flax ``kernel`` (linen ``Dense``/``Conv``/
  ``DenseGeneral``/attention projections, NNX ``Linear``/``Conv``/...). Biases
  (``b``, ``bias``), normalization parameters (``scale``, ``offset``,
  ``bias``) and embeddings (``embeddings``, ``embedding``) are left out.
  Pass it as ``trainable=weights_only`` to any ``ntk_fn``.

  Args:
    params: a Haiku params dict, a linen ``variables`` or ``variables["params"]``
      dict, or an NNX ``nnx.State`` of ``nnx.Param`` (its Variables flatten to
      ``.value``, which is skipped when reading names).
    names: leaf names to keep.

  Returns:
    A pytree of Python bools with the structure of ``params``.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> params = {"linear": {"w": jnp.ones((3, 2)), "b": jnp.zeros(2)},
    ...           "layer_norm": {"scale": jnp.ones(2), "offset": jnp.zeros(2)}}
    >>> weights_only(params)
    {'layer_norm': {'offset': False, 'scale': False}, 'linear': {'b': False, 'w': True}}
  """
  keep = frozenset(names)
  return jax.tree_util.tree_map_with_path(lambda path, _: _leaf_name(path) in keep,
                                          params)


def kernel_options(kind: str, out_ndim: int, trainable: Any = None,
                   weights: Any = weights_only) -> dict[str, Any]:
  """``ntk_fn`` options of the kernels: ``"te_nas"`` (of the summed logits,
  ``trainable=weights``: ``[N, N]``), ``"full"`` (``[N, N, O, O]``), ``"traced"``
  (all output axes averaged: ``[N, N]``). ``trace_norm`` is :func:`trace_norm_of`."""
  if kind not in ("te_nas", "full", "traced"):
    raise ValueError(f"unknown kernel kind {kind!r}")
  if kind == "te_nas":
    return dict(trainable=weights)
  return dict(trace_axes=tuple(range(1, out_ndim)) if kind == "traced" else (),
              trainable=trainable)


def require(module: str, extra: str):
  try:
    return __import__(module, fromlist=["_"])
  except ImportError as e:
    raise ImportError(
        f"ntklayers.nas needs {module.split('.')[0]} for this candidate: install it "
        f"with `pip install 'ntklayers[{extra}]'`.") from e


def summed_method(module, x):
  """linen ``method=``: the module's summed logits (TE-NAS's kernel)."""
  out = module(x)
  return jnp.sum(out, axis=tuple(range(1, out.ndim)))


@functools.cache
def nnx_summed():
  from flax import nnx  # pylint: disable=g-import-not-at-top

  class SummedLogits(nnx.Module):
    """``model``'s outputs summed over the non-batch axes (TE-NAS's kernel)."""

    def __init__(self, model):
      self.model = model

    def __call__(self, x):
      return summed_method(self.model, x)

  return SummedLogits


_SUMMED: "weakref.WeakKeyDictionary[Callable, Callable]" = weakref.WeakKeyDictionary()


def summed(f: Callable) -> Callable:
  """``ntklayers.summed_logits(f)``, one object per ``f`` (so it compiles once)."""
  try:
    return _SUMMED.setdefault(f, _core.summed_logits(f))
  except TypeError:  # not weakly referenceable
    return _core.summed_logits(f)


def te_nas_kernel(f: Callable[[Any, Any], jax.Array], params: Any,
                  x: ArrayLike) -> jax.Array:
  """TE-NAS's NTK: the summed logits' kernel over the weight matrices, ``[N, N]``.

  ``K[n, m] = ⟨∂(Σ_o f_o(x_n))/∂W, ∂(Σ_o f_o(x_m))/∂W⟩`` with ``W`` the leaves
  kept by :func:`weights_only`.

  Example:
    >>> import haiku as hk, jax, jax.numpy as jnp, ntklayers
    >>> net = hk.without_apply_rng(hk.transform(lambda x: ntklayers.Linear(3)(x)))
    >>> x = jnp.arange(8.).reshape(4, 2)
    >>> params = net.init(jax.random.key(0), x)
    >>> bool(jnp.allclose(te_nas_kernel(net.apply, params, x), 3 * x @ x.T))
    True
  """
  return cast(jax.Array, _core.ntk_fn(summed(f), trainable=weights_only)(params, x))


def te_nas_kappa(f: Callable[[Any, Any], jax.Array], params: Any,
                 x: ArrayLike) -> jax.Array:
  """TE-NAS's condition number ``κ = λmax / λmin`` of :func:`te_nas_kernel`.

  As in TE-NAS (Chen, Gong, Wang, ICLR 2021; lower is better): the gradients of
  each example's summed logits with respect to the parameters whose name
  contains ``weight``, i.e. the weight matrices and convolution kernels.
  PyTorch also names affine normalization scales ``weight``, which TE-NAS's
  name filter keeps; here they are left out with every other non-kernel
  parameter (:func:`weights_only`). ``λmin <= 0`` (a singular kernel, e.g.
  more examples than weights) gives ``inf`` and a NaN kernel gives NaN, as in
  :func:`ntklayers.metrics.condition_number`; TE-NAS's code replaces NaN by
  ``1e5``, which is not done here.

  Returns:
    Scalar ``κ >= 1`` or ``inf``.

  Example:
    >>> import haiku as hk, jax, jax.numpy as jnp, ntklayers
    >>> net = hk.without_apply_rng(hk.transform(lambda x: ntklayers.Linear(3)(x)))
    >>> x = jnp.array([[1., 0.], [0., 2.]])
    >>> params = net.init(jax.random.key(0), x)
    >>> round(float(te_nas_kappa(net.apply, params, x)), 4)
    4.0
  """
  return _metrics.condition_number(te_nas_kernel(f, params, x))


def kappa(f: Callable[[Any, Any], jax.Array], params: Any, x: ArrayLike) -> jax.Array:
  """Condition number of the full NTK ``[N, N, O, O]`` read as ``[N·O, N·O]``.

  Over all parameters; lower is better; ``inf`` if ``λmin <= 0`` (see
  :func:`ntklayers.metrics.condition_number`).

  Example:
    >>> import haiku as hk, jax, jax.numpy as jnp, ntklayers
    >>> net = hk.without_apply_rng(hk.transform(
    ...     lambda x: ntklayers.Linear(2, with_bias=False)(x)))
    >>> x = jnp.array([[1., 0.], [0., 2.]])
    >>> round(float(kappa(net.apply, net.init(jax.random.key(0), x), x)), 4)
    4.0
  """
  return _metrics.condition_number(cast(jax.Array, _core.ntk_fn(f)(params, x)))


def trace_norm(f: Callable[[Any, Any], jax.Array], params: Any, x: ArrayLike) -> jax.Array:
  """NTK trace norm ``tr Θ = Σ_n Σ_o ‖∂f_o(x_n)/∂θ‖²`` in memory linear in ``N``.

  No ``N × N`` array, nor all per-example Jacobians at once (:func:`trace_norm_of`).
  Higher is better in NASI (Shu et al., ICLR 2022). Compiled once per ``f``.

  Returns:
    Scalar ``tr Θ`` (the trace of the full kernel, not averaged over outputs).

  Example:
    >>> import haiku as hk, jax, jax.numpy as jnp, ntklayers
    >>> net = hk.without_apply_rng(hk.transform(
    ...     lambda x: ntklayers.Linear(3, with_bias=False)(x)))
    >>> x = jnp.arange(8.).reshape(4, 2)
    >>> float(trace_norm(net.apply, net.init(jax.random.key(0), x), x))  # 3 Σ‖x_n‖²
    420.0
  """
  return _trace_norm_jit(f, params, x)


def trace_norm_of(f: Callable, params: Any, x: Any, trainable: Any = None,
                  chunk: int = 16) -> jax.Array:
  """``tr Θ`` (traceable): structured layers per example, the rest by gradient norms.

  * Annotated layers whose rows are proven to be the examples (the plan of
    ``ntk_fn``, mode ``independent``): ``ntk_fn(f, diagonal_axes=(0,),
    trace_axes=<all output axes>, implementation="structured")`` restricted to
    them, from per-example factors, ``O(N)``.
  * Every other trainable parameter: ``Σ_n ‖J_n‖²`` with ``J_n [O, P]`` the
    Jacobian of example ``n`` alone, ``chunk`` examples at a time
    (``lax.map``), after checking ``Σ_n J_nᵀ r_n`` against one VJP of the whole
    batch with a random cotangent ``r``; if the examples interact, ``Σ_i
    ‖vjp(e_i)‖²`` over the ``N·O`` outputs of the whole batch, ``chunk`` at a time.

  Memory: ``O(N·F + chunk·O·P)`` (``F`` activations per example); no branch
  holds an ``N × N`` array.
  """
  mask = resolve_trainable(trainable, params)
  out = jax.eval_shape(f, params, x)
  n, m = out.shape[0], math.prod(out.shape[1:])
  setup = prepare(f, params, (x,), _core.Options.create(implementation="structured",
                                                        trainable=trainable))
  total = jnp.zeros((), out.dtype)
  rows: list[int] = []
  if setup.plan.groups and (setup.mode == _core.INDEPENDENT or setup.rows_proven):
    # The structured groups alone, from per-example factors: O(N).
    rows = sorted(i for g in setup.plan.groups for i in g.leaves)
    alone = dataclasses.replace(setup, plan=dataclasses.replace(setup.plan, fallback=()),
                                mode=_core.INDEPENDENT)
    cache = _core.capture_with(alone, params, x)
    spec = _core.OutputSpec.create(cache.out_shape, cache.out_shape, tuple(range(1, out.ndim)),
                                   (0,))
    total = total + jnp.sum(_core.contract_with_spec(spec, cache, cache, True, False)) * m
  rest = [i for i, t in enumerate(mask) if t and i not in rows]
  if not rest:
    return total
  f_sub, sub = restrict(f, params, rest)
  y, vjp = jax.vjp(lambda s: f_sub(s, x), sub)
  r = _core.check_cotangent(y.shape, y.dtype)
  jac = jax.jacfwd if sum(a.size for a in sub) < m else jax.jacrev

  def one(xn):
    js = jac(lambda s: f_sub(s, jax.tree.map(lambda a: a[None], xn))[0])(sub)
    return sum(jnp.sum(jnp.square(j)) for j in js)

  def one_of_batch(s, xn, rn):
    return jnp.vdot(rn, f_sub(s, jax.tree.map(lambda a: a[None], xn))[0])

  per_example = jax.grad(lambda s: jnp.sum(jax.vmap(one_of_batch, (None, 0, 0))(s, x, r)))
  tol = _core.check_tolerance(y.dtype)
  ok = functools.reduce(jnp.logical_and, [
      _core.agree(a.reshape(-1), b.reshape(-1), tol)
      for a, b in zip(vjp(r)[0], per_example(sub))], jnp.asarray(True))

  def coupled():
    def col(i):
      g = vjp(jax.nn.one_hot(i, y.size, dtype=y.dtype).reshape(y.shape))[0]
      return sum(jnp.sum(jnp.square(a)) for a in g)
    return jnp.sum(jax.lax.map(col, jnp.arange(y.size), batch_size=min(chunk, y.size)))

  independent = lambda: jnp.sum(jax.lax.map(one, x, batch_size=min(chunk, n)))
  return total + jax.lax.cond(ok, independent, coupled)


_trace_norm_jit = jax.jit(trace_norm_of, static_argnums=(0,))


def traced_from_full(K: jax.Array) -> jax.Array:
  """The ``[N, N]`` kernel averaged over outputs from a full ``[N, N, O, O]`` one."""
  mat = _metrics.flatten(K)
  n1, n2 = K.shape[:2]
  m = mat.shape[0] // n1
  return jnp.einsum("aobo->ab", mat.reshape(n1, m, n2, m)) / m


def label_num_classes(y: Any, num_classes: int | None) -> int | None:
  """``num_classes`` of integer labels ``[N]``: ``max + 1`` by default (the ``[N, N]``
  alignment, ``T[n, m] = 1[y_n = y_m]``, does not depend on it)."""
  y = jnp.asarray(y)
  if num_classes is not None or y.ndim != 1 or not (
      jnp.issubdtype(y.dtype, jnp.integer) or y.dtype == bool):
    return num_classes
  return int(jnp.max(y)) + 1


def alignment_of(K_nn: jax.Array, y: Any, centered: bool,
                 num_classes: int | None) -> jax.Array:
  """Kernel-label alignment of an ``[N, N]`` kernel (``metrics.alignment``)."""
  y = jnp.asarray(y)
  y = y.astype(jnp.int32) if y.dtype == bool else y
  return _similarity.alignment(K_nn, y, centered, num_classes=num_classes)


def label_alignment(f: Callable[[Any, Any], jax.Array], params: Any, x: ArrayLike,
                    y: ArrayLike, *, centered: bool = False,
                    num_classes: int | None = None) -> jax.Array:
  """Alignment ``⟨K, Y Yᵀ⟩_F / (‖K‖_F ‖Y Yᵀ‖_F)`` of the logit-averaged NTK.

  ``K`` is the ``[N, N]`` kernel ``ntk_fn(f, trace_axes=<all output axes>)``
  (the mean over logits) and ``Y`` the one-hot labels ``[N, C]`` (integer
  labels ``[N]``; ``num_classes`` defaults to ``max(y) + 1``), soft labels or
  regression targets ``[N, C]`` / ``[N]``. ``centered=True`` centers both
  (Cortes et al. 2012). Higher is better.

  Example:
    >>> import haiku as hk, jax, jax.numpy as jnp, ntklayers
    >>> net = hk.without_apply_rng(hk.transform(
    ...     lambda x: ntklayers.Linear(2, with_bias=False)(x)))
    >>> x, y = jnp.array([[1., 0.], [0., 1.], [1., 0.]]), jnp.array([0, 1, 0])
    >>> round(float(label_alignment(net.apply, net.init(jax.random.key(0), x), x, y)), 6)
    1.0
  """
  K = cast(jax.Array, _core.ntk_fn(
      f, **kernel_options("traced", jax.eval_shape(f, params, x).ndim))(params, x))
  return alignment_of(K, y, centered, label_num_classes(y, num_classes))


class FallbackWarning(UserWarning):
  """A candidate has parameters outside ``ntklayers``' annotated layers (plain
  ``hk.Linear``, ``nn.Dense``, ``nnx.Linear``, ...): exact, but slower."""


@dataclasses.dataclass(frozen=True)
class ScoreResult:
  """Scores of one candidate (Python floats).

  Attributes:
    means: ``{score: mean over repeats}`` (NaN if no repeat completed it).
    stds: ``{score: sample standard deviation (ddof=1)}``; 0 for one repeat.
    values: ``{score: per-repeat values}``, in repeat order.
    rejected: whether scoring stopped early (see :class:`Scorer`).
    reason: why it was rejected (``""`` if not).
    framework: ``"haiku"``, ``"linen"`` or ``"nnx"``.
    seconds: wall time spent on the candidate (compilation included).
  """
  means: dict[str, float]
  stds: dict[str, float]
  values: dict[str, tuple[float, ...]]
  rejected: bool
  reason: str
  framework: str
  seconds: float

  def sort_key(self, by: str) -> tuple[int, float]:
    """Ascending key, best first: valid values, then NaN, then rejected ones.

    Example:
      >>> ok = ScoreResult({"kappa": 5.0}, {}, {}, False, "", "haiku", 0.0)
      >>> bad = ScoreResult({"kappa": 2.0}, {}, {}, True, "NaN", "haiku", 0.0)
      >>> ok.sort_key("kappa") < bad.sort_key("kappa")
      True
    """
    if by not in HIGHER_IS_BETTER:
      raise ValueError(f"`by` must be one of {SCORES}, got {by!r}.")
    if self.rejected:
      return (2, 0.0)
    if by not in self.means:
      raise ValueError(f"score {by!r} was not computed (scores: {sorted(self.means)}).")
    v = self.means[by]
    if math.isnan(v):
      return (1, 0.0)
    return (0, -v if HIGHER_IS_BETTER[by] else v)


class Ranked(NamedTuple):
  """One entry of :meth:`Scorer.rank`: the candidate's key (its index, or its key
  in a mapping), the candidate and its :class:`ScoreResult`."""
  key: Any
  candidate: Any
  result: ScoreResult


def summary(values: dict[str, list[float]]) -> tuple[dict, dict]:
  means, stds = {}, {}
  with np.errstate(invalid="ignore", over="ignore"):
    for name, v in values.items():
      a = np.asarray(v, dtype=np.float64)
      means[name] = float(a.mean()) if a.size else math.nan
      stds[name] = (float(a.std(ddof=1)) if a.size > 1 else 0.0) if a.size else math.nan
  return means, stds
