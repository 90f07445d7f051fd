"""Benchmark: MSE predictions at ``t = inf`` for large N, out of core, within a memory budget.

torchNTK's setting (as in ``benchmarks/scale.py``): an MLP 784 -> 100 x4 -> 1,
tanh, NTK parameterization (standard-normal weights, each layer's input divided
by sqrt(fan-in)), float32, Gaussian inputs ``x ~ N(0, I)``; targets
``y = sin(2 x·w)`` for a fixed unit ``w``. The pipeline, in one fresh process per
row (so ``peak RSS`` is the whole process's ``ru_maxrss``):

1. ``ntklayers.ntk_blocked(f, params, x_train, out=path, max_memory=budget)``:
   the ``[N, N, 1, 1]`` train kernel written to a ``.npy`` file block by block;
2. ``ntklayers.ntk_blocked(f, params, x_test, x_train, max_memory=budget)``: the
   ``[N_test, N, 1, 1]`` test-train kernel, in memory;
3. ``ntklayers.predict.gradient_descent_mse_matrix_free(path, y_train,
   trace_axes=())(None, f(x_train), f(x_test), k_test_train)``: conjugate
   gradients on the kernel read from disk in row blocks (float64 arithmetic) to
   relative residual ``tol``, then ``f_test(0) + K_td α``.

Step 3 preconditions CG with a rank-``--rank`` randomized Nyström approximation
of the kernel (one pass over the file with ``rank`` columns): the torchNTK
kernel's spectrum decays slowly (condition number ~1e5 at N = 2,000), and plain
CG needs several times more passes.

``--source matvec`` replaces steps 1-2 by the matrix-free
``ntklayers.metrics.ntk_matvec`` (no kernel at all; every CG iteration re-runs the
model over the training set in tiles of ``--block`` examples).

The ``check`` row runs the same pipeline at ``--check-n`` (default 2,000) and
compares its test predictions with the dense answer: the in-memory kernel
``ntklayers.ntk`` and a float64 Cholesky solve (``numpy.linalg``) of
``(K + diag_reg I) α = y - f(0)``.

Measured (2 shared CPU cores under a load average of ~8-10, float32 kernel,
``tol=1e-6``, ``diag_reg=0``): N = 20,000 in 862 s (kernel file 122 s, Nyström
rank 400 111 s, 180 CG iterations), peak RSS 1.08 GiB; the N = 2,000 check
agrees with the dense float64 Cholesky answer to 8.3e-7 (max relative error).

Usage::

  python benchmarks/predict_scale.py                  # N = 20,000 and the check at 2,000
  python benchmarks/predict_scale.py --n 5000 --no-check
  python benchmarks/predict_scale.py --source matvec  # CG on ntk_matvec instead of a file
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

import numpy as np

DIM = 784


def model():
  import haiku as hk  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import ntklayers  # pylint: disable=g-import-not-at-top

  def fn(x):
    w = hk.initializers.RandomNormal(1.0)
    h = ntklayers.Linear(100, w_init=w)(x / np.sqrt(DIM))
    for _ in range(3):
      h = ntklayers.Linear(100, w_init=w)(jnp.tanh(h) / np.sqrt(100))
    return ntklayers.Linear(1, w_init=w)(jnp.tanh(h) / np.sqrt(100))

  net = hk.without_apply_rng(hk.transform(fn))
  params = net.init(jax.random.key(0), np.zeros((1, DIM), np.float32))
  return net.apply, params


def data(n: int, n_test: int):
  rng = np.random.default_rng(0)
  x = rng.standard_normal((n + n_test, DIM)).astype(np.float32)
  w = rng.standard_normal(DIM)
  w /= np.linalg.norm(w)
  y = np.sin(2 * x @ w)[:, None].astype(np.float32)
  return x[:n], y[:n], x[n:], y[n:]


def outputs(f, params, x: np.ndarray, chunk: int = 4096) -> np.ndarray:
  import jax  # pylint: disable=g-import-not-at-top
  apply = jax.jit(f)
  return np.concatenate([np.asarray(apply(params, x[i:i + chunk]))
                         for i in range(0, len(x), chunk)])


def run_one(n: int, n_test: int, source: str, budget: str, tol: float, diag_reg: float,
            block: int, rank: int, check: bool) -> dict:
  """One row, in this (fresh) process."""
  import ntklayers  # pylint: disable=g-import-not-at-top
  import ntklayers.metrics as nm  # pylint: disable=g-import-not-at-top
  import ntklayers.predict as npr  # pylint: disable=g-import-not-at-top

  f, params = model()
  x, y, x_test, y_test = data(n, n_test)
  row: dict = {"n": n, "n_test": n_test, "source": source, "budget": budget, "tol": tol,
               "diag_reg": diag_reg, "rank": rank}
  start = time.perf_counter()
  f0, ft0 = outputs(f, params, x), outputs(f, params, x_test)
  with tempfile.TemporaryDirectory() as tmp:
    t0 = time.perf_counter()
    if source == "disk":
      path = os.path.join(tmp, "k_train_train.npy")
      ntklayers.ntk_blocked(f, params, x, out=path, max_memory=budget, progress=False)
      row["kernel_file_gib"] = os.path.getsize(path) / 2**30
      k_test = ntklayers.ntk_blocked(f, params, x_test, x, max_memory=budget, progress=False)
      train_op = path  # a train-train kernel file: read by its upper triangle (symmetric)
      test_op = k_test
    else:
      train_op = npr.KernelOperator.from_matvec(*nm.ntk_matvec(f, params, x, block_size=block))
      test_op = npr.KernelOperator.test_train(f, params, x_test, x, block_size=block)
    row["kernel_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    predict_fn = npr.gradient_descent_mse_matrix_free(
        train_op, y, diag_reg=diag_reg, diag_reg_absolute_scale=True, trace_axes=(), tol=tol,
        preconditioner_rank=rank, maxiter=5000)
    fx_train, fx_test = predict_fn(None, f0, ft0, test_op)
    row["solve_s"] = time.perf_counter() - t0
    if predict_fn.preconditioner is not None:
      row["nystrom_s"] = predict_fn.preconditioner.seconds
    info = predict_fn.info[0]
    row.update(cg_iterations=info.iterations, matvecs=info.matvecs, residual=info.residual,
               converged=info.converged)
    row["time_s"] = time.perf_counter() - start
    row["train_mse"] = float(np.mean((fx_train - y) ** 2))
    row["test_mse"] = float(np.mean((fx_test - y_test) ** 2))
    row["test_mse_init"] = float(np.mean((ft0 - y_test) ** 2))
    if check:
      k = np.asarray(ntklayers.ntk(f, params, x), np.float64).reshape(n, n)
      k_td = np.asarray(ntklayers.ntk(f, params, x_test, x), np.float64).reshape(n_test, n)
      chol = np.linalg.cholesky(k + diag_reg * np.eye(n))
      alpha = np.linalg.solve(chol.T, np.linalg.solve(chol, (y - f0).astype(np.float64)))
      dense = ft0 + k_td @ alpha
      row["check_rel_err"] = float(np.max(np.abs(fx_test - dense)) / np.max(np.abs(dense)))
      row["check_cond"] = float(np.linalg.cond(k + diag_reg * np.eye(n)))
      del k, k_td, chol
  row["rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 2**30
  return row


def table(rows: list[dict]) -> str:
  lines = ["| N | N_test | source | kernel (s) | CG (s) | total (s) | CG iters | residual | "
           "peak RSS (GiB) | test MSE (init -> t=inf) | check vs dense |",
           "|---:|---:|---|---:|---:|---:|---:|---:|---:|---|---|"]
  # CG (s) includes building the Nystrom preconditioner (its own time in brackets).
  for r in rows:
    if "error" in r:
      lines.append(f"| {r['n']:,} | | {r['source']} | | | | | | | | {r['error']} |")
      continue
    check = (f"max rel. err {r['check_rel_err']:.1e} (cond {r['check_cond']:.1e})"
             if "check_rel_err" in r else "")
    lines.append(
        f"| {r['n']:,} | {r['n_test']:,} | {r['source']} | {r['kernel_s']:.1f} | "
        f"{r['solve_s']:.1f}"
        f"{' (%.0f, rank %d)' % (r['nystrom_s'], r['rank']) if 'nystrom_s' in r else ''} | "
        f"{r['time_s']:.1f} | {r['cg_iterations']} | "
        f"{r['residual']:.1e} | {r['rss_gib']:.2f} | {r['test_mse_init']:.3f} -> "
        f"{r['test_mse']:.3f} | {check} |")
  return "\n".join(lines)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--n", type=int, default=20_000, help="training examples")
  parser.add_argument("--n-test", type=int, default=1_000, help="test examples")
  parser.add_argument("--source", choices=("disk", "matvec"), default="disk")
  parser.add_argument("--budget", default="2GiB", help="ntk_blocked's max_memory")
  parser.add_argument("--tol", type=float, default=1e-6, help="CG relative residual")
  parser.add_argument("--diag-reg", type=float, default=0.0, help="absolute ridge")
  parser.add_argument("--block", type=int, default=2048, help="ntk_matvec tile (matvec)")
  parser.add_argument("--rank", type=int, default=None,
                      help="Nystrom preconditioner rank (0: plain CG; default 400 for disk, "
                           "0 for matvec, where building it costs `rank` model products)")
  parser.add_argument("--check-n", type=int, default=2_000, help="N of the dense check")
  parser.add_argument("--no-check", action="store_true")
  parser.add_argument("--markdown", default=None,
                      help="also write the table as a Markdown page "
                      "(docs/benchmarks/predict_scale.md)")
  parser.add_argument("--one", help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.one:
    print(json.dumps(run_one(*json.loads(args.one))))
    return
  from ntklayers._bench import markdown_report  # pylint: disable=g-import-not-at-top
  with markdown_report(args.markdown, "MSE predictions at t = inf for N = 20,000", PAGE_INTRO):
    _rows(args)


PAGE_INTRO = """
`ntklayers.predict.gradient_descent_mse_matrix_free` at `t = inf` on the
torchNTK setting (784 -> 100 x4 -> 1, tanh, NTK parameterization, Gaussian
inputs): the train-train kernel written out of core by
`ntk_blocked(..., out=path, max_memory=budget)`, then conjugate gradients with a
Nystrom preconditioner reading the file in row blocks; checked against a dense
float64 solve at a smaller N. Each row is a fresh process (peak RSS of the
whole process; time including compilation).
"""


def _rows(args: argparse.Namespace) -> None:
  plan = [(args.n, False)] + ([] if args.no_check else [(args.check_n, True)])
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  rows = []
  rank = args.rank if args.rank is not None else (400 if args.source == "disk" else 0)
  for n, check in plan:
    spec = [n, args.n_test, args.source, args.budget, args.tol, args.diag_reg, args.block,
            min(rank, n // 4), check]
    proc = subprocess.run([sys.executable, __file__, "--one", json.dumps(spec)],
                          capture_output=True, text=True, env=env, check=False)
    if proc.returncode:
      err = (proc.stderr.strip().splitlines() or ["?"])[-1]
      rows.append({"n": n, "source": args.source, "error": err[:160]})
    else:
      rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    print(f"  N={n}: {json.dumps(rows[-1])}", file=sys.stderr, flush=True)
  print(table(rows))


if __name__ == "__main__":
  main()
