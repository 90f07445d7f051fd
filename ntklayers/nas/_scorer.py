"""The :class:`Scorer`, the callback of an architecture-search loop."""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from ntklayers import _core
from ntklayers import metrics as _metrics
from ntklayers.nas._candidates import adapt
from ntklayers.nas._scores import (KERNEL_OF, SCORES, FallbackWarning, Ranked, ScoreResult,
                                   alignment_of, label_num_classes, summary, trace_norm_of,
                                   traced_from_full, weights_only)

SLOWER = "about 50x slower kernels (MLP 64-256-256-10, N=64, CPU)"


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

  def _program(self, adapter: Any, kind: str, out_shape: tuple[int, ...]
               ) -> tuple[Callable, Any]:
    """One jitted program: a kernel and its scores, ``(all finite, {score: value})``;
    and its kernel function (``None`` for the trace norm)."""
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

    return jax.jit(run, static_argnums=0), kernel

  def _check_fallback(self, adapter: Any, static: Any, dynamic: Any, x: jax.Array,
                      kernels: list) -> None:
    """One :class:`FallbackWarning` per scorer, naming the parameters outside
    structured layers (read off the kernel functions that ran; planned here only
    when no kernel but the trace norm's was asked for)."""
    if self._warned:
      return
    names = list(dict.fromkeys(n for k in kernels for n in k.fallback))
    if not kernels:  # only the trace norm was asked for
      f, params, trainable = adapter.plain(static, dynamic)
      options = _core.Options.create(trainable=trainable)
      names = [g.name for g in _core.prepare(f, params, (x,), options).plan.fallback]
    if names:
      self._warned = True
      warnings.warn(FallbackWarning(
          f"ntklayers.nas: the parameters of {names} are not in annotated layers; the "
          f"exact generic fallback counts them, {SLOWER}. Swap in the drop-ins "
          f"(ntklayers.Linear, ntklayers.flax.linen.Dense, ntklayers.flax.nnx.Linear, "
          f"...). Shown once per Scorer."), stacklevel=3)

  def __call__(self, candidate: Any, *, kind: str | None = None) -> ScoreResult:
    """Scores one candidate; see the class docstring."""
    with warnings.catch_warnings():
      # The scorer's own FallbackWarning says it, once per scorer, not per candidate.
      warnings.filterwarnings("ignore", category=_core.SlowRouteWarning)
      return self._score(candidate, kind)

  def _score(self, candidate: Any, kind: str | None) -> ScoreResult:
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
    programs: dict[str, tuple[Callable, Any]] = {}
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
      for k in kinds:
        if k not in programs:
          programs[k] = self._program(adapter, k, tuple(out.shape))
        ok, vals = programs[k][0](static, dynamic, x, y)
        if r == 0 and (k != "diag" or kinds == ("diag",)):
          self._check_fallback(adapter, static, dynamic, x,
                               [p[1] for p in programs.values() if p[1] is not None])
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
      by: the score to sort by (in ``self.scores``): lowest first for the ``κ`` scores,
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
