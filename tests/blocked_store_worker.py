"""A light subprocess of ``tests/test_blocked_kill.py``: ntklayers' ``.npy`` store
(``ntklayers/_store.py``) driven directly with precomputed blocks, without JAX.

``ntklayers/__init__.py`` imports JAX and Haiku (seconds); here ``ntklayers`` is
registered as a bare package, so that only ``_store`` and ``_store_files``
(standard library and NumPy) are imported: a run takes a fraction of a second,
and many runs can be killed at random points.

Run as ``python tests/blocked_store_worker.py '<json arguments>'``:

* ``out``: the ``.npy`` path; ``n``, ``b``: the kernel ``[n, n, 2, 2]`` in tiles
  of ``b`` (the symmetric schedule: blocks ``(i, j), j >= i``, each with its
  mirror image, in rounds of :data:`ROUND` blocks, diagonal ones first);
* ``pause``: seconds; a random pause up to ``pause`` before every block and
  before every commit (so that a kill lands anywhere in a round);
* ``die``: ``[point, k]``: SIGKILL itself at the ``k``-th time it reaches
  ``point``: ``"create"`` (the sidecar written, the ``.npy`` not yet),
  ``"write"`` (a region written: between a block and its mirror image, or after
  both), ``"commit"`` (a round's
  bytes written, not yet durable nor logged), ``"line"`` (a round's log lines
  written but their last 10 bytes: a torn line).

Prints ``READY`` once imported (before any file is touched) and ``DONE`` at the end;
asserts that JAX was never imported.
"""

from __future__ import annotations

import json
import os
import random
import signal
import sys
import time
import types

import numpy as np

ROUND = 2
INNER = (2, 2)


def load_store() -> types.ModuleType:
  """``ntklayers._large._store`` without running the packages' ``__init__.py``."""
  if "ntklayers" not in sys.modules:
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    pkg = types.ModuleType("ntklayers")
    pkg.__path__ = [os.path.join(root, "ntklayers")]
    sys.modules["ntklayers"] = pkg
  if "ntklayers._large" not in sys.modules:  # its __init__ imports the JAX side too
    large = types.ModuleType("ntklayers._large")
    large.__path__ = [os.path.join(sys.modules["ntklayers"].__path__[0], "_large")]
    sys.modules["ntklayers._large"] = large
  from ntklayers._large import _store  # pylint: disable=g-import-not-at-top
  return _store


def tiles(n: int, b: int) -> int:
  return -(-n // b)


def schedule(n: int, b: int) -> list[tuple[int, int]]:
  t = tiles(n, b)
  return [(i, i) for i in range(t)] + [(i, j) for i in range(t) for j in range(i + 1, t)]


def span(n: int, b: int, i: int) -> slice:
  return slice(i * b, min(i * b + b, n))


def regions(n: int, b: int):
  """Where block ``(i, j)`` goes: the block, then its mirror image."""
  def where(pair):
    i, j = pair
    out = [(span(n, b, i), span(n, b, j))]
    return out + ([(span(n, b, j), span(n, b, i))] if i != j else [])
  return where


def block(n: int, b: int, pair: tuple[int, int]) -> np.ndarray:
  """The (deterministic) block ``pair``: ``[rows, cols, 2, 2]``."""
  i, j = pair
  rows, cols = span(n, b, i), span(n, b, j)
  shape = (rows.stop - rows.start, cols.stop - cols.start, *INNER)
  return np.random.default_rng([i, j]).standard_normal(shape)


def expected(n: int, b: int) -> np.ndarray:
  """The whole kernel the store must hold at the end."""
  k = np.zeros((n, n, *INNER))
  where = regions(n, b)
  for pair in schedule(n, b):
    places = where(pair)
    k[places[0]] = block(n, b, pair)
    if len(places) > 1:
      k[places[1]] = np.transpose(block(n, b, pair), (1, 0, 3, 2))
  return k


def request(n: int, b: int) -> dict:
  return {"block_size": b, "params": "p", "inputs": f"n={n}", "model": "m"}


def make_store(out: str, n: int, b: int, hooks: dict | None = None):
  """An ``NpyStore`` of the kernel (``hooks``: point -> callable, see ``die``)."""
  store_mod = load_store()
  hooks = hooks or {}

  class Store(store_mod.NpyStore):
    def _create_npy(self):
      hooks.get("create", lambda: None)()
      super()._create_npy()

    def write(self, index, data, crc=0):
      crc = super().write(index, data, crc)
      hooks.get("write", lambda: None)()
      return crc

    def _append(self, lines):
      if "line" in hooks:
        hooks["line"](self, lines)
      super()._append(lines)

  return Store(out, (n, n, *INNER), np.float64, request(n, b), regions(n, b),
               schedule(n, b))


def write(out: str, n: int, b: int, pause: float = 0.0, hooks: dict | None = None,
          seed: int = 0) -> None:
  """Creates or resumes the kernel at ``out`` and finishes it."""
  hooks = hooks or {}
  rng = random.Random(seed)
  store = make_store(out, n, b, hooks)
  store.create_or_check()
  store.open()
  todo = [p for p in schedule(n, b) if p not in store.done]
  try:
    for k in range(0, len(todo), ROUND):
      for pair in todo[k:k + ROUND]:
        time.sleep(rng.uniform(0, pause))
        places = regions(n, b)(pair)
        items = [(places[0], block(n, b, pair))]
        if len(places) > 1:
          items.append((places[1], np.transpose(block(n, b, pair), (1, 0, 3, 2))))
        store.put(pair, items)
      time.sleep(rng.uniform(0, pause))
      hooks.get("commit", lambda: None)()
      store.commit()
  finally:
    store.close()


def _die_at(point: str, k: int) -> dict:
  """Hooks that SIGKILL this process the ``k``-th time it reaches ``point``."""
  count = [0]

  def reached(*args):
    count[0] += 1
    if count[0] < k:
      return
    if point == "line":  # the lines but the last 10 bytes, then killed: a torn line
      store, lines = args
      os.write(store._log_fd, lines[:-10])  # pylint: disable=protected-access
    os.kill(os.getpid(), signal.SIGKILL)

  return {point: reached}


def main() -> None:
  args = json.loads(sys.argv[1])
  hooks = _die_at(*args["die"]) if args.get("die") else None
  print("READY", flush=True)
  start = time.monotonic()
  write(args["out"], args["n"], args["b"], args.get("pause", 0.0), hooks,
        args.get("seed", 0))
  assert "jax" not in sys.modules, "the store worker imported JAX"
  print(f"DONE {time.monotonic() - start:.3f}", flush=True)


if __name__ == "__main__":
  main()
