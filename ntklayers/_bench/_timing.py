"""Steady-state timing and compiled memory of jitted calls, and plain tables.

Shared by ``ntklayers bench``, ``ntklayers demo`` and the scripts in
``benchmarks/``.
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp

def time_round_robin(fns: Mapping[str, Callable[..., Any]], *args: Any, repeats: int,
                     budget_s: float = float("inf"), min_repeats: int = 3
                     ) -> tuple[dict[str, list[float]], dict[str, float], dict[str, Any]]:
  """Steady-state timing of several functions of the same arguments.

  See :func:`time_interleaved` (every function gets ``args``).
  """
  return time_interleaved({k: (fn, args) for k, fn in fns.items()}, repeats=repeats,
                          budget_s=budget_s, min_repeats=min_repeats)


def time_interleaved(calls: Mapping[Any, tuple[Callable[..., Any], tuple]], *,
                     repeats: int, budget_s: float = float("inf"), min_repeats: int = 3
                     ) -> tuple[dict[Any, list[float]], dict[Any, float], dict[Any, Any]]:
  """Steady-state timing of several calls ``{key: (fn, args)}``.

  Each function is called once untimed (compilation plus a first run), then in
  every one of ``repeats`` rounds each function is called once, in the order of
  ``calls``, so that all of them see the same machine load (useful on shared
  machines). A function drops out once it has ``min_repeats`` timed calls and
  has spent ``budget_s``, so slow baselines get few repeats. Every call is
  blocked on all output leaves.

  Returns:
    (seconds per timed call, seconds of the first call, output), keyed like ``calls``.
  """
  firsts, outs = {}, {}
  for key, (fn, args) in calls.items():
    start = time.perf_counter()
    outs[key] = jax.block_until_ready(fn(*args))
    firsts[key] = time.perf_counter() - start
  times: dict[Any, list[float]] = {key: [] for key in calls}
  for _ in range(repeats):
    for key, (fn, args) in calls.items():
      ts = times[key]
      if len(ts) >= min_repeats and sum(ts) > budget_s:
        continue
      start = time.perf_counter()
      jax.block_until_ready(fn(*args))
      ts.append(time.perf_counter() - start)
  return times, firsts, outs


def median(xs: list[float]) -> float:
  return statistics.median(xs)


@dataclasses.dataclass(frozen=True)
class Memory:
  """XLA's compiled memory analysis of one jitted call, in bytes."""

  argument: int
  output: int
  temp: int
  alias: int

  @property
  def peak(self) -> int:
    """temp + output + argument bytes (minus donated/aliased bytes)."""
    return self.temp + self.output + self.argument - self.alias


def compiled_memory(fn: Callable[..., Any], *args: Any) -> Memory | None:
  """Memory analysis of ``jax.jit(fn)`` compiled for ``args`` (None if unavailable)."""
  try:
    analysis = jax.jit(fn).lower(*args).compile().memory_analysis()
  except Exception:  # pylint: disable=broad-except  (backend-dependent)
    return None
  if analysis is None:
    return None
  get = lambda k: int(getattr(analysis, k, 0) or 0)
  return Memory(get("argument_size_in_bytes"), get("output_size_in_bytes"),
                get("temp_size_in_bytes"), get("alias_size_in_bytes"))


def max_rel_diff(a: jax.Array, b: jax.Array) -> float:
  """``max |a - b| / max |b|`` over the whole kernel."""
  return float(jnp.max(jnp.abs(a - b)) / jnp.maximum(jnp.max(jnp.abs(b)), 1e-30))


def mib(nbytes: int | None) -> str:
  return "-" if nbytes is None else f"{nbytes / 2**20:.1f}"


def format_table(headers: list[str], rows: list[list[str]]) -> str:
  """A plain-text table with right-aligned columns (the first left-aligned)."""
  widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h)
            for i, h in enumerate(headers)]

  def line(cells):
    return "  ".join(c.ljust(w) if i == 0 else c.rjust(w)
                     for i, (c, w) in enumerate(zip(cells, widths)))

  return "\n".join([line(headers), line(["-" * w for w in widths])] +
                   [line(r) for r in rows])
