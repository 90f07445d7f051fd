"""Subprocess helper of ``tests/test_blocked.py``: ``ntk_blocked`` in a fresh process.

Run as ``python tests/blocked_worker.py MODE '<json arguments>'`` (cwd: the repo
root, ``JAX_PLATFORMS=cpu``). JAX is configured in :func:`main` only, before any
array exists, so the device count and ``jax.distributed`` can be chosen per
process; importing this module (as the tests do, for :func:`problem`) touches
no JAX configuration.

Modes:

* ``write``: ``ntk_blocked(f, params, x, out=..., block_size=...)`` on ``devices``
  CPU devices; with ``slow`` (seconds) every block write first sleeps, so that
  the parent can kill the process mid-run.
* ``devices``: ``devices`` CPU devices set by ``how`` (``"config"``:
  ``jax_num_cpu_devices``; ``"xla_flags"``: the parent set
  ``--xla_force_host_platform_device_count``); writes the symmetric, asymmetric
  and out-of-core kernels to ``save`` (``.npz``).
* ``distributed``: process ``process`` of 2 under ``jax.distributed`` (gloo
  collectives, one CPU device each); the same out-of-core kernel at ``out`` and an
  in-memory one, saved by process 0 to ``save``.

Each mode prints ``DONE`` on success.
"""

from __future__ import annotations

import functools
import json
import os
import sys
import time

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np

import ntklayers


def _mlp(x):
  """An annotated ``ntklayers.Linear`` and a plain ``hk.Linear`` (fallback leaves)."""
  x = jnp.tanh(ntklayers.Linear(6)(x))
  x = jax.nn.relu(hk.Linear(5)(x))
  return ntklayers.Linear(3)(x)


#: The model every subprocess (and the in-process tests) uses: one function object,
#: so that in-process calls share JAX's compilation caches.
NET = hk.without_apply_rng(hk.transform(_mlp))
F = NET.apply
FEATURES = 4


@functools.lru_cache(maxsize=None)
def params(dtype: str = "float64"):
  """Random NumPy parameters of :data:`NET` (``eval_shape`` of ``init`` only: it
  compiles nothing; Haiku's zero biases would hide terms of the kernel)."""
  shapes = jax.eval_shape(NET.init, jax.random.key(0), np.zeros((1, FEATURES), dtype))
  rng = np.random.default_rng(7)
  scale = lambda s: 1 / np.sqrt(s.shape[0]) if len(s.shape) == 2 else 0.3  # w, b
  return jax.tree.map(lambda s: (scale(s) * rng.normal(size=s.shape)).astype(dtype),
                      shapes)


def inputs(n: int, dtype: str = "float64", seed: int = 0) -> np.ndarray:
  return np.random.default_rng(seed).normal(size=(n, FEATURES)).astype(dtype)


def problem(n1: int, n2: int | None = None, dtype: str = "float64"):
  """``(f, params, x1, x2)`` with ``x1 [n1, 4]`` and ``x2 [n2, 4]`` (or ``None``)."""
  x2 = None if n2 is None else inputs(n2, dtype, seed=1)
  return F, params(dtype), inputs(n1, dtype), x2


def _configure(devices: int | None) -> None:
  jax.config.update("jax_enable_x64", True)
  if devices is not None:
    jax.config.update("jax_num_cpu_devices", devices)


def _slow_writes(seconds: float) -> None:
  """Every block write of the out-of-core store sleeps first (kills land mid-run,
  between a block's bytes and its mirror's, or before its log line)."""
  from ntklayers._large import _store  # pylint: disable=g-import-not-at-top
  write = _store.NpyStore.write

  def slow(self, index, block, crc=0):
    time.sleep(seconds)
    return write(self, index, block, crc)

  _store.NpyStore.write = slow


def write(args: dict) -> None:
  _configure(args.get("devices", 1))
  if args.get("slow"):
    _slow_writes(args["slow"])
  f, p, x, _ = problem(args["n"])
  ntklayers.ntk_blocked(f, p, x, out=args["out"], block_size=args["block_size"],
                        progress=False)


def devices(args: dict) -> None:
  if args["how"] == "config":
    _configure(args["devices"])
  else:
    assert "xla_force_host_platform_device_count" in os.environ.get("XLA_FLAGS", "")
    _configure(None)
  assert len(jax.devices()) == args["devices"], jax.devices()
  f, p, x1, x2 = problem(args["n1"], args["n2"])
  b = args["block_size"]
  sym = ntklayers.ntk_blocked(f, p, x1, block_size=b)
  asym = ntklayers.ntk_blocked(f, p, x1, x2, block_size=b)
  ooc = ntklayers.ntk_blocked(f, p, x1, block_size=b, out=args["out"])
  np.savez(args["save"], sym=sym, asym=asym, ooc=np.asarray(ooc),
           devices=len(jax.devices()))


def distributed(args: dict) -> None:
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  _configure(1)
  jax.distributed.initialize(f"localhost:{args['port']}", num_processes=2,
                             process_id=args["process"])
  assert jax.process_count() == 2 and len(jax.devices()) == 2, jax.devices()
  f, p, x1, _ = problem(args["n1"])
  b = args["block_size"]
  ntklayers.ntk_blocked(f, p, x1, block_size=b, out=args["out"], progress=False)
  mem = ntklayers.ntk_blocked(f, p, x1, block_size=b, progress=False)
  if jax.process_index() == 0:
    np.save(args["save"], mem)
  jax.distributed.shutdown()


def main() -> None:
  mode, args = sys.argv[1], json.loads(sys.argv[2])
  {"write": write, "devices": devices, "distributed": distributed}[mode](args)
  print("DONE", flush=True)


if __name__ == "__main__":
  main()
