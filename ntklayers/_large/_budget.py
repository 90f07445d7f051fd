"""Memory budget of a blocked kernel: parse ``max_memory``, the default budget,
and the peak-memory estimate that picks the block size or refuses the request.

The estimate is made before anything large runs. Its parts are known from
shapes: the stacked inputs, the cached factors of every tile (their exact sizes
come from ``jax.eval_shape`` of one tile's capture), the kernel held in memory
(or one round of blocks when it is written out of core), and the temporaries of
one capture and one round of block contractions, read from XLA's compiled
memory analysis of the programs that will run.
"""

from __future__ import annotations

import dataclasses
import os
import re

import jax

_UNITS = {"": 1, "b": 1, "k": 1e3, "kb": 1e3, "m": 1e6, "mb": 1e6, "g": 1e9, "gb": 1e9,
          "t": 1e12, "tb": 1e12, "kib": 2 ** 10, "mib": 2 ** 20, "gib": 2 ** 30,
          "tib": 2 ** 40}

#: Fraction of the available memory a blocked kernel plans to use by default.
DEFAULT_FRACTION = 0.5


class MemoryBudgetError(ValueError):
  """Raised before running when a blocked kernel cannot fit its memory budget."""


def parse_memory(value: int | float | str, name: str = "max_memory") -> int:
  """Bytes from an int, a float or a string such as ``"2GiB"``, ``"500 MB"``."""
  if isinstance(value, bool):
    raise TypeError(f"`{name}` must be a number of bytes or a string like '2GiB', "
                    f"got {value!r}.")
  if isinstance(value, (int, float)):
    nbytes = float(value)
  elif isinstance(value, str):
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", value)
    unit = m.group(2).lower() if m else None
    if m is None or unit not in _UNITS:
      raise ValueError(f"`{name}` must look like '2GiB', '1.5 GB' or '800MB' (units "
                       f"B, KB, MB, GB, TB, KiB, MiB, GiB, TiB), got {value!r}.")
    nbytes = float(m.group(1)) * _UNITS[unit]
  else:
    raise TypeError(f"`{name}` must be a number of bytes or a string like '2GiB', "
                    f"got {type(value).__name__}.")
  if not nbytes > 0:
    raise ValueError(f"`{name}` must be positive, got {value!r}.")
  return int(min(nbytes, 2.0 ** 62))  # inf: no limit


def host_available() -> int | None:
  """Available host memory in bytes (Linux ``MemAvailable``), else ``None``."""
  try:
    with open("/proc/meminfo", encoding="ascii") as fh:
      for line in fh:
        if line.startswith("MemAvailable:"):
          return int(line.split()[1]) * 1024
  except OSError:
    pass
  try:
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
  except (ValueError, OSError, AttributeError):  # pragma: no cover - not POSIX
    return None


def device_available(device: jax.Device) -> int | None:
  """Free memory of an accelerator (``memory_stats``), ``None`` if it does not say."""
  stats = device.memory_stats() if hasattr(device, "memory_stats") else None
  if not stats or "bytes_limit" not in stats:
    return None
  return int(stats["bytes_limit"]) - int(stats.get("bytes_in_use", 0))


def default_budget(device: jax.Device) -> int:
  """A safe fraction of the memory the kernel's arrays live in: host memory on
  CPU, the device's free memory on accelerators."""
  free = host_available() if device.platform == "cpu" else device_available(device)
  if free is None:
    free = host_available() or 4 * 2 ** 30
  return int(DEFAULT_FRACTION * free)


def fmt(nbytes: float) -> str:
  """``1.50 GiB`` style sizes for messages and tables."""
  for unit, scale in (("GiB", 2 ** 30), ("MiB", 2 ** 20), ("KiB", 2 ** 10)):
    if abs(nbytes) >= scale:
      return f"{nbytes / scale:.2f} {unit}"
  return f"{int(nbytes)} B"


@dataclasses.dataclass(frozen=True)
class Estimate:
  """Peak-memory estimate of a blocked kernel, in bytes, by part."""

  block_size: int
  inputs: int
  factors: int
  output: int
  capture_temp: int
  round_temp: int
  cached: bool

  @property
  def total(self) -> int:
    return (self.inputs + self.factors + self.output
            + max(self.capture_temp, self.round_temp))

  def describe(self) -> str:
    factors = (f"cached factors {fmt(self.factors)}" if self.cached else
               "factors recomputed per block")
    where = "kernel in memory" if self.output else "kernel written out of core"
    return (f"block_size={self.block_size}: {fmt(self.total)} (inputs {fmt(self.inputs)}, "
            f"{factors}, {where} {fmt(self.output)}, capture temporaries "
            f"{fmt(self.capture_temp)}, one round of blocks {fmt(self.round_temp)})")


def refuse(estimate: Estimate, budget: int, out_given: bool) -> MemoryBudgetError:
  hint = ("" if out_given or not estimate.output else
          " Write the kernel out of core with `out='kernel.npy'`, or")
  return MemoryBudgetError(
      f"ntk_blocked: the smallest plan does not fit the memory budget max_memory="
      f"{fmt(budget)}; estimated peak for {estimate.describe()}.{hint or ''} "
      f"{'raise' if hint else 'Raise'} `max_memory`, request less (`trace_axes`, "
      f"`diagonal_axes=(0,)`) or use fewer examples.")
