"""Measuring kernel functions the same way on both sides (see ``nt_side.py``).

Every row (one form of a model, one route) is compiled ahead of time,
``jax.jit(fn).lower(params, x).compile()``, then called once: ``first`` is the
whole (trace with ntklayers' discovery, XLA compile, first call), also split into
``lower_s`` and ``compile_s``; ``memory`` is XLA's compiled memory analysis of that
executable (argument + output + temp - alias bytes). Then all rows of a model are
called in interleaved rounds (every row once per round, each call blocked), so
that they see the same machine load, until ``repeats`` or, once 3 calls are timed,
``budget_s`` per row. Steady-state calls go to the compiled executable (no Python
dispatch of the kernel function: neither side pays it).
"""

from __future__ import annotations

import dataclasses
import statistics
import time
import traceback
import warnings
from collections.abc import Callable
from typing import Any

import jax
import numpy as np

import ntklayers

from .registry import ZooModel

ROUTES = ("auto", "structured", "ntk_vp", "jacobian")


@dataclasses.dataclass
class Row:
  """One measured row; ``key`` is ``(framework, form, route)``."""

  key: tuple[str, str, str]
  times: list[float] = dataclasses.field(default_factory=list)
  first: float = float("nan")
  lower_s: float = float("nan")
  compile_s: float = float("nan")
  memory: dict[str, int] | None = None
  error: str | None = None
  kernel: np.ndarray | None = dataclasses.field(default=None, repr=False)

  @property
  def median(self) -> float:
    return statistics.median(self.times) if self.times else float("nan")

  @property
  def peak(self) -> int | None:
    m = self.memory
    return None if m is None else m["argument"] + m["output"] + m["temp"] - m["alias"]

  def to_json(self) -> dict[str, Any]:
    d = dataclasses.asdict(self)
    d.pop("kernel")
    d["key"] = list(self.key)
    return d

  @staticmethod
  def from_json(d: dict[str, Any]) -> "Row":
    d = dict(d)
    d["key"] = tuple(d["key"])
    return Row(**d)


def pair_median(a: Row, b: Row, offset_b: float = 0.0) -> float:
  """Median over interleaved rounds ``k`` of ``a.times[k] / (b.times[k] + offset_b)``."""
  n = min(len(a.times), len(b.times))
  if n == 0:
    return float("nan")
  return statistics.median(ta / (tb + offset_b) for ta, tb in zip(a.times[:n], b.times[:n]))


def callable_of(model: ZooModel, route: str) -> Callable[[Any, Any], Any]:
  """``(params, x) -> result`` of a route; ``factors`` is the floor's capture."""
  if route == "factors":
    return lambda p, x: ntklayers.capture(model.apply, p, x, implementation="structured")
  return model.kernel_fn(route)


def _memory(compiled) -> dict[str, int] | None:
  try:
    m = compiled.memory_analysis()
  except Exception:  # pylint: disable=broad-except  (backend-dependent)
    return None
  if m is None:
    return None
  get = lambda k: int(getattr(m, k, 0) or 0)
  return dict(argument=get("argument_size_in_bytes"), output=get("output_size_in_bytes"),
              temp=get("temp_size_in_bytes"), alias=get("alias_size_in_bytes"))


def compile_row(model: ZooModel, route: str, log: Callable[[str], None] = print
                ) -> tuple[Row, Callable | None]:
  """Ahead-of-time compile and first call of one row."""
  row = Row((model.framework, model.form, route))
  fn = callable_of(model, route)
  try:
    with warnings.catch_warnings():
      warnings.filterwarnings("ignore", message="ntklayers")
      t0 = time.perf_counter()
      lowered = jax.jit(lambda p, x: fn(p, x)).lower(model.params, model.x)
      t1 = time.perf_counter()
      compiled = lowered.compile()
      t2 = time.perf_counter()
      out = jax.block_until_ready(compiled(model.params, model.x))
      t3 = time.perf_counter()
  except Exception as e:  # pylint: disable=broad-except  (recorded; the other rows go on)
    row.error = f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"
    log(f"  {model.name} {route}: FAILED {row.error}")
    traceback.print_exc()
    return row, None
  row.first, row.lower_s, row.compile_s = t3 - t0, t1 - t0, t2 - t1
  row.memory = _memory(compiled)
  if route != "factors":
    row.kernel = np.asarray(out)
  log(f"  {model.name} {route}: first call {row.first:.1f} s (trace {row.lower_s:.1f} s, "
      f"compile {row.compile_s:.1f} s)")
  return row, compiled


def measure(models: list[ZooModel], routes: Callable[[ZooModel], list[str]], repeats: int,
            budget_s: float, log: Callable[[str], None] = print
            ) -> dict[tuple[str, str, str], Row]:
  """``routes(model)`` (and ``factors``) of every model: compiled, then timed interleaved."""
  rows: dict[tuple[str, str, str], Row] = {}
  calls: list[tuple[Row, Callable, ZooModel]] = []
  for model in models:
    for route in [*routes(model), "factors"]:
      row, compiled = compile_row(model, route, log)
      rows[row.key] = row
      if compiled is not None:
        jax.block_until_ready(compiled(model.params, model.x))  # warm-up
        calls.append((row, compiled, model))
  for _ in range(repeats):
    for row, compiled, model in calls:
      if len(row.times) >= 3 and sum(row.times) > budget_s:
        continue
      t0 = time.perf_counter()
      jax.block_until_ready(compiled(model.params, model.x))
      row.times.append(time.perf_counter() - t0)
  return rows


def memory_of_stablehlo(path: str) -> dict[str, int] | None:
  """XLA's memory analysis of a program given as StableHLO text (NT's lowered
  kernel, from jax 0.4.23), compiled by this jax's XLA for the default device."""
  try:
    from jax._src.lib import xla_client  # pylint: disable=g-import-not-at-top
    with open(path, encoding="utf-8") as fh:
      text = fh.read()
    client = jax.devices()[0].client
    exe = client.compile_and_load(text.encode(), jax.devices()[:1], xla_client.CompileOptions())
    m = exe.get_compiled_memory_stats()
  except Exception:  # pylint: disable=broad-except  (private API; version-dependent)
    traceback.print_exc()
    return None
  get = lambda k: int(getattr(m, k, 0) or 0)
  return dict(argument=get("argument_size_in_bytes"), output=get("output_size_in_bytes"),
              temp=get("temp_size_in_bytes"), alias=get("alias_size_in_bytes"))


def rel_err(a: np.ndarray | None, b: np.ndarray | None) -> float:
  """``max |a - b| / max |b|``."""
  if a is None or b is None or a.shape != b.shape:
    return float("nan")
  return float(np.max(np.abs(a - b)) / max(float(np.max(np.abs(b))), 1e-30))
