"""Shared parts of the quickstarts: digits data, timing, and the printed report.

Each quickstart builds the same MLP in its framework and hands this module a
``make_kernel_fn(**options)`` returning ``kernel_fn(state, x)``.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

import ntklayers.datasets


def parse_args(description: str) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=description)
  parser.add_argument("--n", type=int, default=256, help="examples in the kernel (default 256)")
  parser.add_argument("--n-compare", type=int, default=64,
                      help="examples for the jacobian comparison (default 64; the "
                      "whole-model jacobian is much slower and needs N*O*P floats)")
  parser.add_argument("--width", type=int, default=256, help="hidden width (default 256)")
  parser.add_argument("--repeats", type=int, default=5, help="timed calls (default 5)")
  return parser.parse_args()


def load_data(n: int) -> tuple[np.ndarray, np.ndarray]:
  """The first ``n`` digits, standardized per feature: ``x [n, 64]``, labels ``[n]``."""
  try:
    return ntklayers.datasets.load_digits(n)
  except ValueError:
    raise SystemExit(f"--n must be in [1, 1797], got {n}") from None


def steady_time(fn, *args, repeats: int) -> tuple[float, float, jax.Array]:
  """(compile + first call seconds, median seconds of later calls, output)."""
  start = time.perf_counter()
  out = jax.block_until_ready(fn(*args))
  first = time.perf_counter() - start
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return first, float(np.median(times)), out


def report(make_kernel_fn: Callable[..., Callable], state: Any, x: jax.Array,
           args: argparse.Namespace, call: str) -> None:
  """Prints the kernel's shape, spectrum, per-layer shares and auto-vs-jacobian timing."""
  # The NTK: trace_axes=() keeps both output axes -> [N, N, 10, 10].
  kernel_fn = make_kernel_fn()
  first, t_auto, k = steady_time(kernel_fn, state, x, repeats=args.repeats)
  k = np.asarray(k)
  n, o = k.shape[0], k.shape[-1]
  print(f"\nNTK shape {k.shape} ({call}; x2=None means x2 = x)")
  print(f"time (auto, N={n}): {t_auto * 1e3:.1f} ms per call "
        f"(first call incl. compile: {first:.2f} s)")

  # Flatten [N, N, O, O] -> [N*O, N*O] with (example, output) rows.
  mat = k.transpose(0, 2, 1, 3).reshape(n * o, n * o).astype(np.float64)
  asym = np.abs(mat - mat.T).max() / np.abs(mat).max()
  eig = np.linalg.eigvalsh((mat + mat.T) / 2)
  lo, hi = eig[0], eig[-1]
  cond = hi / lo if lo > 0 else float("inf")
  print(f"flattened ({n * o}, {n * o}): trace {np.trace(mat):.6g}, "
        f"eigenvalues min {lo:.6g} / max {hi:.6g}, condition number {cond:.4g} "
        f"(relative asymmetry {asym:.1e})")

  # Which layers contribute: layerwise=True returns {module path: kernel}.
  parts = make_kernel_fn(layerwise=True)(state, x)
  total = np.trace(mat)
  shares = ", ".join(
      f"{name} {np.einsum('nnoo->', np.asarray(v)) / total:.1%}" for name, v in parts.items())
  print(f"share of the trace per layer: {shares}")

  # Against the generic whole-model Jacobian contraction, on the same examples.
  m = min(args.n_compare, args.n)
  xc = x[:m]
  jac_fn = make_kernel_fn(implementation="jacobian")
  _, t_a, k_a = steady_time(kernel_fn, state, xc, repeats=args.repeats)
  first_j, t_j, k_j = steady_time(jac_fn, state, xc, repeats=max(1, args.repeats // 2))
  k_a, k_j = np.asarray(k_a), np.asarray(k_j)
  rel = np.abs(k_a - k_j).max() / np.abs(k_j).max()
  note = "" if m == args.n else (
      f" (N={m}, the first {m} of the {args.n} examples: the jacobian baseline "
      f"stores an [N, O, P] Jacobian and costs N^2 O^2 P to contract)")
  print(f"\nauto vs implementation='jacobian' on the same data{note}:")
  print(f"  auto      {t_a * 1e3:9.1f} ms per call")
  print(f"  jacobian  {t_j * 1e3:9.1f} ms per call (first call incl. compile: {first_j:.2f} s)")
  print(f"  speed-up  {t_j / t_a:9.1f}x")
  print(f"  max relative difference |K_auto - K_jacobian|.max() / |K_jacobian|.max() = "
        f"{rel:.2e}")


def header(args: argparse.Namespace, labels: np.ndarray, d_in: int, layer: str,
           n_params: int, extra: str = "") -> None:
  print(f"digits: {args.n} examples x {d_in} standardized features, "
        f"{len(set(labels.tolist()))} classes | MLP 64-{args.width}-{args.width}-10 "
        f"({layer}), {n_params:,} params, float32 | jax {jax.__version__} "
        f"on {jax.default_backend()}{extra}")


def data(args: argparse.Namespace) -> tuple[jax.Array, np.ndarray]:
  x_np, labels = load_data(args.n)
  return jnp.asarray(x_np), labels
