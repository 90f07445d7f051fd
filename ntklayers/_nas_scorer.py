"""Candidates of every framework, and :class:`Scorer`, the callback of a search loop.

An adapter initializes a candidate into ``(static, dynamic)`` (hashable NNX graph
definitions, a pytree of arrays) and builds its kernels on its framework's entry
point: one compiled program per candidate and kernel serves every repeat.
"""

from __future__ import annotations

import functools
import inspect
import math
import sys
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from ntklayers import _api
from ntklayers import _metrics
from ntklayers._capture import prepare
from ntklayers._nas import (KERNEL_OF, SCORES, FallbackWarning, Ranked, ScoreResult,
                            alignment_of, kernel_options, label_num_classes, nnx_summed,
                            require, summary, summed, summed_method, trace_norm_of,
                            traced_from_full, weights_only)

KINDS = ("haiku", "linen", "nnx")
SLOWER = "about 50x slower kernels (MLP 64-256-256-10, N=64, CPU)"
_HINT = ("a Haiku function fn(x) -> [N, O], an hk.Transformed, a flax.linen Module "
         "instance, or an NNX constructor callable(rngs: nnx.Rngs) -> nnx.Module")


class HaikuAdapter:
  """``hk.Transformed`` / ``hk.TransformedWithState`` (apply's ``rng``, if it takes
  one, is a fixed key: one fixed dropout mask)."""

  framework = "haiku"

  def __init__(self, transformed: Any, with_state: bool):
    self.t, self.with_state = transformed, with_state
    takes_rng = "rng" in inspect.signature(transformed.apply).parameters
    key = (jax.random.key(0),) if takes_rng else ()
    if with_state:
      def f(ps, x):
        return transformed.apply(ps["params"], ps["state"], *key, x)[0]
      self.trainable: dict[str, bool] | None = {"params": True, "state": False}
      self.weights = lambda ps: {"params": weights_only(ps["params"]), "state": False}
    else:
      f = (lambda p, x: transformed.apply(p, *key, x)) if key else transformed.apply
      self.trainable, self.weights = None, weights_only
    self.f = f

  def init(self, key: jax.Array, x: jax.Array) -> tuple[Any, Any]:
    if self.with_state:
      params, state = self.t.init(key, x)
      return None, {"params": params, "state": state}
    return None, self.t.init(key, x)

  def kernel(self, kind: str, out_ndim: int) -> Callable:
    f = summed(self.f) if kind == "te_nas" else self.f
    fn = _api.ntk_fn(f, **kernel_options(kind, out_ndim, self.trainable, self.weights))
    return lambda static, dynamic, x: fn(dynamic, x)

  def plain(self, static: Any, dynamic: Any) -> tuple[Callable, Any, Any]:
    return self.f, dynamic, self.trainable


class LinenAdapter:
  """A ``flax.linen`` module instance, called as ``module.apply(variables, x)``."""

  framework = "linen"

  def __init__(self, module: Any):
    self.module = module
    self.flax = require("ntklayers.flax", "flax")

  def init(self, key: jax.Array, x: jax.Array) -> tuple[Any, Any]:
    return None, self.module.init(key, x)

  def kernel(self, kind: str, out_ndim: int) -> Callable:
    fn = self.flax.ntk_fn(self.module, method=summed_method if kind == "te_nas" else None,
                          **kernel_options(kind, out_ndim))
    return lambda static, dynamic, x: fn(dynamic, x)

  def plain(self, static: Any, dynamic: Any) -> tuple[Callable, Any, Any]:
    rest = {k: v for k, v in dynamic.items() if k != "params"}
    f: Any = lambda p, x: self.module.apply({"params": p, **rest}, x)
    f.__ntk_owner__ = self.module
    return f, dynamic["params"], None


class NnxAdapter:
  """An NNX constructor ``ctor(rngs) -> nnx.Module``, built with ``nnx.Rngs(key)``."""

  framework = "nnx"

  def __init__(self, ctor: Callable):
    self.ctor = ctor
    self.nnx_kernel = require("ntklayers.flax.nnx", "flax")
    self.nnx = require("flax.nnx", "flax")

  def init(self, key: jax.Array, x: jax.Array) -> tuple[Any, Any]:
    nnx = self.nnx
    model = self.ctor(nnx.Rngs(key))
    if not isinstance(model, nnx.Module):
      raise TypeError(f"`candidate` (an NNX constructor) returned a "
                      f"{type(model).__name__}, not an nnx.Module.")
    g, p, *rest = nnx.split(model, nnx.Param, ...)
    gs, ps, *rest_s = nnx.split(nnx_summed()(model), nnx.Param, ...)
    return (g, gs), (p, tuple(rest), ps, tuple(rest_s))

  def kernel(self, kind: str, out_ndim: int) -> Callable:
    fn = self.nnx_kernel.ntk_fn(**kernel_options(kind, out_ndim))
    k = 1 if kind == "te_nas" else 0
    return lambda static, dynamic, x: fn((static[k], dynamic[2 * k],
                                          *dynamic[2 * k + 1]), x)

  def plain(self, static: Any, dynamic: Any) -> tuple[Callable, Any, Any]:
    graphdef, (p, rest) = static[0], dynamic[:2]
    f: Any = lambda q, x: self.nnx.merge(graphdef, *jax.tree.map(lambda a: a, (q, *rest)))(x)
    f.__ntk_owner__ = graphdef
    return f, p, None


def detect(candidate: Any) -> str:
  """``"haiku"``, ``"linen"`` or ``"nnx"`` (else a ``TypeError``). Flax and Haiku objects
  are looked for only if their framework is imported; another callable is an NNX
  constructor if it takes ``rngs`` (or is an ``nnx.Module`` class), else Haiku."""
  hk, linen, nnx = (sys.modules.get(m) for m in ("haiku", "flax.linen", "flax.nnx"))
  if hk is not None and isinstance(candidate, (hk.Transformed, hk.TransformedWithState)):
    return "haiku"
  if linen is not None and isinstance(candidate, linen.Module):
    return "linen"
  if nnx is not None and isinstance(candidate, nnx.Module):
    raise TypeError(
        f"`candidate` is an already built nnx.Module ({type(candidate).__name__}); "
        f"pass its constructor, e.g. `lambda rngs: {type(candidate).__name__}(..., "
        f"rngs=rngs)`, so that each repeat builds it from its own seed.")
  base = candidate
  while isinstance(base, functools.partial):
    base = base.func
  if nnx is not None and isinstance(base, type) and issubclass(base, nnx.Module):
    return "nnx"
  if isinstance(candidate, type):
    if linen is not None and issubclass(candidate, linen.Module):
      raise TypeError(f"`candidate` is the linen Module class {candidate.__name__}; "
                      f"pass an instance, e.g. {candidate.__name__}().")
    if hk is not None and issubclass(candidate, hk.Module):
      raise TypeError(f"`candidate` is the Haiku Module class {candidate.__name__}; "
                      f"pass a function, e.g. `lambda x: {candidate.__name__}()(x)`.")
    raise TypeError(f"`candidate` must be {_HINT}; got the class {candidate.__name__}.")
  if callable(candidate):
    try:
      return "nnx" if "rngs" in inspect.signature(candidate).parameters else "haiku"
    except (TypeError, ValueError):  # no signature (a builtin): a Haiku function
      return "haiku"
  raise TypeError(f"`candidate` must be {_HINT}; got {type(candidate).__name__}.")


def adapt(candidate: Any, kind: str | None = None) -> Any:
  """The adapter of ``candidate`` (``kind`` overrides the detection)."""
  if kind is not None and kind not in KINDS:
    raise ValueError(f"`kind` must be None or one of {KINDS}, got {kind!r}.")
  kind = kind or detect(candidate)
  if kind == "haiku":
    hk = require("haiku", "haiku")
    if isinstance(candidate, (hk.Transformed, hk.TransformedWithState)):
      return HaikuAdapter(candidate, isinstance(candidate, hk.TransformedWithState))
  if kind == "linen":
    if not isinstance(candidate, require("flax.linen", "flax").Module):
      raise TypeError(f"`candidate` of kind 'linen' must be a flax.linen Module instance; "
                      f"got {type(candidate).__name__}.")
    return LinenAdapter(candidate)
  if not callable(candidate):
    raise TypeError(f"`candidate` must be {_HINT}; got {type(candidate).__name__}.")
  if kind == "nnx":
    return NnxAdapter(candidate)
  return HaikuAdapter(hk.without_apply_rng(hk.transform(candidate)), False)


class Scorer:
  """NTK scores of candidate architectures at initialization: a search callback.

  ``scorer(candidate)`` initializes the candidate from ``repeats`` seeds and
  returns a :class:`ScoreResult` (means, sample standard deviations and
  per-repeat values of each score on the probe batch). Scores and directions
  (:data:`HIGHER_IS_BETTER`, the table of :mod:`ntklayers.nas`): lower is better
  for ``"te_nas_kappa"`` (TE-NAS's ``κ``, :func:`te_nas_kappa`) and ``"kappa"``
  (``κ`` of the full NTK); higher is better for ``"trace_norm"`` (``tr Θ``, in
  memory linear in ``N``) and the labels' ``"alignment"`` and
  ``"centered_alignment"`` with the logit-averaged ``[N, N]`` NTK.

  Early rejection: non-finite outputs or kernels, or a TE-NAS ``κ`` above
  ``max_kappa`` (``inf`` included: a singular kernel), stop the remaining scores
  and repeats; the result has ``rejected=True``, a ``reason`` and the values
  computed so far. Each candidate compiles one program per kernel (reused by
  its repeats), so a search pays a few compilations per candidate.

  Candidates: a Haiku function ``fn(x) -> [N, O]`` (transformed with
  ``hk.without_apply_rng(hk.transform(fn))``), an ``hk.Transformed`` or
  ``hk.TransformedWithState`` (its state held fixed), a ``flax.linen`` Module
  instance (``module.init(key, x)``, called as ``module(x)``), or an NNX
  constructor ``ctor(rngs) -> nnx.Module`` (a callable with a parameter named
  ``rngs``, or an ``nnx.Module`` subclass; built with ``nnx.Rngs(key)``). Pass
  ``kind="haiku" | "linen" | "nnx"`` to skip the detection. Repeat ``r`` uses
  the keys ``split(fold_in(key(seed), r))`` for the initialization and the
  probe batch: the same ``seed`` gives identical numbers.

  Parameters outside annotated layers (plain ``hk.Linear``, ``nn.Dense``,
  ``nnx.Linear``) are counted exactly by the generic fallback, with a
  :class:`FallbackWarning` (once per scorer), and cost more: for an MLP
  64-256-256-10 on N=64 digits (float32, 2 shared CPU cores), plain ``hk.Linear``
  makes the full and TE-NAS kernels 40-75x slower (about 10 ms vs 0.5 s, and 1.5
  vs 80 ms), ``κ`` with its eigenvalues 15-25x, TE-NAS ``κ`` 15-35x, and a
  scorer call (3 repeats, compilation included) 1.7x (3.5 s vs 6 s).

  Args:
    x_probe: probe inputs ``[N, ...]``, or the pool batches are drawn from.
    y_probe: labels for the alignments: integer ``[N]`` or targets ``[N, C]``.
    scores: names from :data:`SCORES`; default: the label-free ones, plus both
      alignments when ``y_probe`` is given. Computed in the order of
      :data:`SCORES` (TE-NAS ``κ`` first, for early rejection).
    repeats: initializations (and probe batches) per candidate, ``>= 1``.
    seed: base seed.
    batch_size: if given, each repeat draws this many examples of ``x_probe``
      without replacement; ``None`` uses all of ``x_probe`` every repeat.
    max_kappa: reject above this TE-NAS ``κ``; ``None`` never rejects on ``κ``.
    num_classes: classes of integer labels (default ``max(y_probe) + 1``).

  Example:
    >>> import haiku as hk, jax, ntklayers, ntklayers.nas
    >>> x = jax.random.normal(jax.random.key(0), (16, 8))
    >>> def mlp(width):
    ...   return lambda x: ntklayers.Linear(4)(jax.nn.relu(ntklayers.Linear(width)(x)))
    >>> scorer = ntklayers.nas.Scorer(x, repeats=2, scores=("te_nas_kappa", "trace_norm"))
    >>> best = scorer.rank({"w32": mlp(32), "w64": mlp(64)}, by="te_nas_kappa")
    >>> kappas = [r.result.means["te_nas_kappa"] for r in best]  # best (lowest) first
    >>> kappas[0] <= kappas[1], best[0].result.rejected
    (True, False)
  """

  def __init__(self, x_probe: ArrayLike, y_probe: ArrayLike | None = None, *,
               scores: Sequence[str] | None = None, repeats: int = 3, seed: int = 0,
               batch_size: int | None = None, max_kappa: float | None = 1e8,
               num_classes: int | None = None):
    self.x = jnp.asarray(x_probe)
    n = self.x.shape[0] if self.x.ndim else 0
    if n < 1:
      raise ValueError(f"`x_probe` must be a batch [N, ...], N >= 1; got {self.x.shape}.")
    self.y = None if y_probe is None else jnp.asarray(y_probe)
    if self.y is not None and (self.y.ndim == 0 or self.y.shape[0] != n):
      raise ValueError(f"`y_probe` must have x_probe's {n} examples on axis 0; got "
                       f"shape {self.y.shape}.")
    if scores is None:
      scores = SCORES if self.y is not None else SCORES[:3]
    unknown = [scores] if isinstance(scores, str) else [s for s in scores if s not in SCORES]
    if unknown or not scores:
      raise ValueError(f"unknown score(s) {unknown} in `scores`; choose from {SCORES}.")
    if self.y is None and any(KERNEL_OF[s] == "traced" for s in scores):
      raise ValueError("the alignment scores need labels: pass `y_probe`.")
    self.scores = tuple(s for s in SCORES if s in scores)
    if not isinstance(repeats, int) or isinstance(repeats, bool) or repeats < 1:
      raise ValueError(f"`repeats` must be an int >= 1, got {repeats!r}.")
    if not isinstance(seed, int) or isinstance(seed, bool):
      raise TypeError(f"`seed` must be an int, got {seed!r}.")
    if batch_size is not None and not (isinstance(batch_size, int) and 1 <= batch_size <= n):
      raise ValueError(f"`batch_size` must be None or an int in [1, {n}], got {batch_size!r}.")
    if max_kappa is not None and not max_kappa > 0:
      raise ValueError(f"`max_kappa` must be None or positive, got {max_kappa!r}.")
    self.repeats, self.seed, self.batch_size = repeats, seed, batch_size
    self.max_kappa = max_kappa
    self.num_classes = None if self.y is None else label_num_classes(self.y, num_classes)
    self._key = jax.random.key(seed)
    self._warned = False

  def _draw(self, r: int) -> tuple[jax.Array, jax.Array, jax.Array | None]:
    init_key, batch_key = jax.random.split(jax.random.fold_in(self._key, r))
    if self.batch_size is None:
      return init_key, self.x, self.y
    idx = jax.random.choice(batch_key, self.x.shape[0], (self.batch_size,), replace=False)
    return init_key, self.x[idx], None if self.y is None else self.y[idx]

  def _program(self, adapter: Any, kind: str, out_shape: tuple[int, ...]) -> Callable:
    """One jitted program: a kernel and its scores, ``(all finite, {score: value})``."""
    want = [s for s in self.scores if KERNEL_OF[s] == kind
            or (kind == "full" and KERNEL_OF[s] == "traced")]
    kernel = None if kind == "diag" else adapter.kernel(kind, len(out_shape))

    def run(static, dynamic, x, y):
      if kind == "diag":
        f, params, trainable = adapter.plain(static, dynamic)
        t = trace_norm_of(f, params, x, trainable)
        return jnp.isfinite(t), {"trace_norm": t}
      K = kernel(static, dynamic, x)
      vals = {}
      if want[0] in ("te_nas_kappa", "kappa"):
        vals[want[0]] = _metrics.condition_number(K)
      K_nn = traced_from_full(K) if kind == "full" else K
      for s in want:
        if s.endswith("alignment"):
          vals[s] = alignment_of(K_nn, y, s == "centered_alignment", self.num_classes)
      return jnp.all(jnp.isfinite(K)), vals

    return jax.jit(run, static_argnums=0)

  def _check_fallback(self, adapter: Any, static: Any, dynamic: Any, x: jax.Array):
    if self._warned:
      return
    f, params, trainable = adapter.plain(static, dynamic)
    names = [g.name for g in prepare(f, params, (x,), implementation="auto", trainable=trainable,
                                     independent_samples=None).plan.fallback]
    if names:
      self._warned = True
      warnings.warn(FallbackWarning(
          f"ntklayers.nas: the parameters of {names} are not in annotated layers; the "
          f"exact generic fallback counts them, {SLOWER}. Swap in the drop-ins "
          f"(ntklayers.Linear, ntklayers.flax.linen.Dense, ntklayers.flax.nnx.Linear, "
          f"...). Shown once per Scorer."), stacklevel=3)

  def __call__(self, candidate: Any, *, kind: str | None = None) -> ScoreResult:
    """Scores one candidate; see the class docstring."""
    adapter = adapt(candidate, kind)
    start = time.perf_counter()
    values: dict[str, list[float]] = {s: [] for s in self.scores}
    kinds = tuple(dict.fromkeys(
        "full" if KERNEL_OF[s] == "traced" and "kappa" in self.scores else KERNEL_OF[s]
        for s in self.scores))

    def result(reason: str = "") -> ScoreResult:
      means, stds = summary(values)
      return ScoreResult(means, stds, {k: tuple(v) for k, v in values.items()},
                         bool(reason), reason, adapter.framework,
                         time.perf_counter() - start)

    def forward(static, dynamic, x):
      f, params, _ = adapter.plain(static, dynamic)
      return f(params, x)

    forward = jax.jit(forward, static_argnums=0)
    programs: dict[str, Callable] = {}
    for r in range(self.repeats):
      init_key, x, y = self._draw(r)
      static, dynamic = adapter.init(init_key, x)
      out = forward(static, dynamic, x)
      if not (isinstance(out, jax.Array) and out.ndim >= 1 and out.shape[0] == x.shape[0]):
        raise ValueError(f"`candidate` must return one array [N, ...] with N = "
                         f"{x.shape[0]}; got {jax.tree.map(jnp.shape, out)}.")
      if not bool(jnp.all(jnp.isfinite(out))):
        return result(f"non-finite outputs (repeat {r})")
      if r == 0:
        if "te_nas_kappa" in self.scores and not any(
            jax.tree.leaves(weights_only(adapter.plain(static, dynamic)[1]))):
          return result("no weight matrices or kernels for the TE-NAS kernel "
                        "(weights_only selected no parameter)")
        self._check_fallback(adapter, static, dynamic, x)
      for k in kinds:
        if k not in programs:
          programs[k] = self._program(adapter, k, tuple(out.shape))
        ok, vals = programs[k](static, dynamic, x, y)
        if not bool(ok):
          return result(f"non-finite {k} kernel (repeat {r})")
        for s, v in vals.items():
          values[s].append(float(v))
        kappa = values["te_nas_kappa"][-1] if k == "te_nas" else -math.inf
        if self.max_kappa is not None and not kappa <= self.max_kappa:
          return result(f"TE-NAS kappa {kappa:.4g} > max_kappa {self.max_kappa:.4g} "
                        f"(repeat {r})")
    return result()

  def rank(self, candidates: Sequence[Any] | Mapping[Any, Any], *,
           by: str = "te_nas_kappa", progress: bool = False,
           kind: str | None = None) -> list[Ranked]:
    """Scores every candidate; returns them best first, rejected ones last.

    Args:
      candidates: a sequence (keys are indices) or a mapping ``{key: candidate}``.
      by: the score to sort by (in ``self.scores``): lowest first for the ``κ``s,
        highest first for the others (:data:`HIGHER_IS_BETTER`); ties keep order.
      progress: show a ``tqdm`` progress bar.
      kind: the kind of every candidate (default: detected per candidate).

    Returns:
      A list of :class:`Ranked` ``(key, candidate, result)``.
    """
    if by not in self.scores:
      raise ValueError(f"`by` must be one of the computed scores {self.scores}, got {by!r}.")
    items = list(candidates.items() if isinstance(candidates, Mapping)
                 else enumerate(candidates))
    if progress:
      try:
        from tqdm.auto import tqdm  # pylint: disable=g-import-not-at-top
      except ImportError as e:
        raise ImportError("`progress=True` needs tqdm: `pip install tqdm`.") from e
      items = tqdm(items, desc="ntklayers.nas", unit="candidate")
    ranked = [Ranked(key, c, self(c, kind=kind)) for key, c in items]
    return sorted(ranked, key=lambda e: e.result.sort_key(by))
