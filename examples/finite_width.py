# ruff: noqa: E402  (the clock starts before the imports: they count in the run time)
"""Finite-width check: wide networks train like their kernel at initialization.

Full-batch gradient descent on the MSE loss ``0.5 · mean((f(x) − y)²)`` of tanh MLPs of
growing width ``n`` (NTK parametrization: weights ~ N(0, 1), each layer's input divided
by the square root of its size, no biases, so the infinite-width limit exists), on a
2-class subset of scikit-learn's digits (``ntklayers.datasets.load_digits``; targets
±1). At every recorded step ``s`` the network's actual train and test outputs are set
beside ``ntklayers.predict.gradient_descent_mse``'s predictions from the NTK at
initialization (the same learning rate ``η``, times ``t = s`` steps of ``η``: gradient
flow of the linearized network). Their RMS difference on the test set, the *gap*,
shrinks with the width (as ``1/n``: the kernel moves by ``O(1/n)`` during training).

Discrete steps leave a floor under the gap: even at infinite width, gradient descent with
step ``η`` is not gradient flow. It is measured exactly (the linearized network trained
by the same discrete steps, from the eigendecomposition of the kernel) and reported
beside the gap; the default ``η`` keeps it near 1e-3 of the outputs.

Finally, the NTK after training (the *after kernel*) and the NTK at init each predict the
test labels by kernel regression (``gradient_descent_mse`` at ``t = ∞`` from zero
outputs); their test accuracies are compared with the network's.

Writes ``docs/finite_width.png`` (``--png``) and ``examples/finite_width.md`` (``--md``).

Run::

  pip install -e '.[examples]'
  python examples/finite_width.py            # about 1-2 min on 2 CPU cores
  python examples/finite_width.py --quick    # smoke run (~15 s), writes to a temporary folder
"""

from __future__ import annotations

import time

_T0 = time.perf_counter()
import argparse
import os
import platform
import shlex
import sys
import tempfile

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np

import ntklayers
import ntklayers.datasets
import ntklayers.metrics as nm
import ntklayers.predict as npr

jax.config.update("jax_enable_x64", True)  # networks run in float32; predictions in float64

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COLUMNS = ("width", "parameters", "test gap, end", "test gap, max over t", "train gap, end",
           "floor (discrete steps), max", "test gap to discrete steps, max", "kernel change",
           "network", "init kernel, t = end", "init-kernel regression",
           "after-kernel regression", "seconds")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--widths", default="64,256,1024,4096", help="hidden widths")
  parser.add_argument("--depth", type=int, default=1, help="hidden layers (1)")
  parser.add_argument("--digits", default="3,8", help="the two classes (3,8)")
  parser.add_argument("--n-train", type=int, default=128, help="training examples (128)")
  parser.add_argument("--lr", type=float, default=0.05, help="learning rate η (0.05)")
  parser.add_argument("--steps", type=int, default=4000, help="gradient steps (4000)")
  parser.add_argument("--seed", type=int, default=0, help="split and init seed (0)")
  parser.add_argument("--png", default=os.path.join(ROOT, "docs", "finite_width.png"))
  parser.add_argument("--md", default=os.path.join(ROOT, "examples", "finite_width.md"))
  parser.add_argument("--quick", action="store_true",
                      help="smoke run: widths 16,64, 24 examples, 100 steps; writes to "
                      "a temporary folder unless --png/--md are given")
  args = parser.parse_args(argv)
  if args.quick:
    args.widths, args.n_train, args.steps = "16,64", 24, 100
    given = " ".join(argv if argv is not None else sys.argv[1:])
    if "--png" not in given or "--md" not in given:
      tmp = tempfile.mkdtemp(prefix="finite_width_")
      args.png = args.png if "--png" in given else os.path.join(tmp, "finite_width.png")
      args.md = args.md if "--md" in given else os.path.join(tmp, "finite_width.md")
  args.widths = [int(w) for w in args.widths.split(",")]
  args.digits = tuple(int(d) for d in args.digits.split(","))
  return args


def load(args: argparse.Namespace):
  """Train and test inputs ``[N, 64]`` (float32) and ±1 targets ``[N, 1]`` (float64)."""
  x, labels = ntklayers.datasets.load_digits(dtype=np.float32)
  keep = np.isin(labels, args.digits)
  xtr, ltr, xte, lte = ntklayers.datasets.split(x[keep], labels[keep], test_fraction=0.5,
                                                seed=args.seed)
  xtr, ltr = xtr[:args.n_train], ltr[:args.n_train]
  if args.quick:
    xte, lte = xte[:24], lte[:24]
  target = lambda lab: np.where(lab == args.digits[0], 1.0, -1.0)[:, None]
  return xtr, target(ltr), xte, target(lte)


def mlp(width: int, depth: int) -> hk.Transformed:
  normal = hk.initializers.RandomNormal(1.0)

  def fn(x):
    for _ in range(depth):
      x = jnp.tanh(ntklayers.Linear(width, with_bias=False, w_init=normal)(
          x / np.sqrt(x.shape[-1])))
    return ntklayers.Linear(1, with_bias=False, w_init=normal)(x / np.sqrt(x.shape[-1]))

  return hk.without_apply_rng(hk.transform(fn))


def discrete_linear(k_all: np.ndarray, ntr: int, f0: np.ndarray, y: np.ndarray, lr: float,
                    steps: np.ndarray) -> np.ndarray:
  """Outputs ``[S, N_all, 1]`` of the linearized network after ``steps`` of discrete GD."""
  lam, u = np.linalg.eigh(k_all[:ntr, :ntr])
  a = lr * lam / ntr
  r0 = u.T @ (y - f0[:ntr])  # [N_train, 1]
  s = steps[:, None].astype(float)
  decay = np.exp(s * np.log1p(-a))  # (1 - a)^s, [S, N_train]
  # (1 - (1 - a)^s) / λ, continuous at λ = 0 (s·lr/N).
  small = np.abs(lam) < 1e-12 * np.abs(lam).max()
  gain = np.where(small, s * lr / ntr, -np.expm1(s * np.log1p(-a)) / np.where(small, 1, lam))
  train = f0[None, :ntr] + np.einsum("ij,sj,jo->sio", u, 1 - decay, r0)
  test = f0[None, ntr:] + np.einsum("ti,ij,sj,jo->sto", k_all[ntr:, :ntr], u, gain, r0)
  return np.concatenate([train, test], axis=1)


def kernel_regression(k_all: np.ndarray, ntr: int, y: np.ndarray) -> np.ndarray:
  """Test predictions ``K_te,tr (K_tr,tr + 1e-6 mean(diag) I)⁻¹ y``."""
  predict_fn = npr.gradient_descent_mse(k_all[:ntr, :ntr], y, diag_reg=1e-6)
  return np.asarray(predict_fn(None, 0.0, 0.0, k_all[ntr:, :ntr])[1])


def run_width(width: int, args: argparse.Namespace, data) -> dict:
  start = time.perf_counter()
  xtr, ytr, xte, yte = data
  ntr = len(xtr)
  x_all = np.concatenate([xtr, xte])
  net = mlp(width, args.depth)
  params = net.init(jax.random.key(args.seed), xtr)
  # Data are arguments, not constants of the programs (XLA would fold them).
  kernel = jax.jit(lambda p, x: ntklayers.ntk(net.apply, p, x)[:, :, 0, 0])
  loss = lambda p, x, y: 0.5 * jnp.mean((net.apply(p, x) - y) ** 2)

  @jax.jit
  def train_steps(p, n, x, y):
    step = lambda _, p: jax.tree.map(lambda w, g: w - args.lr * g, p, jax.grad(loss)(p, x, y))
    return jax.lax.fori_loop(0, n, step, p)

  train = lambda p, n: train_steps(p, n, xtr, ytr.astype(np.float32))
  outputs = jax.jit(net.apply)
  steps = np.unique(np.r_[0, np.geomspace(1, args.steps, 40).astype(int)])
  k0 = np.asarray(kernel(params, x_all), np.float64)
  f0 = np.asarray(outputs(params, x_all), np.float64)
  predict_fn = npr.gradient_descent_mse(k0[:ntr, :ntr], ytr, learning_rate=args.lr)
  lin_tr, lin_te = predict_fn(steps.astype(float), f0[:ntr], f0[ntr:], k0[ntr:, :ntr])
  lin = np.concatenate([np.asarray(lin_tr), np.asarray(lin_te)], axis=1)  # [S, N_all, 1]
  net_out, done, p = [], 0, params
  for s in steps:
    p = train(p, int(s - done))
    done = s
    net_out.append(np.asarray(outputs(p, x_all), np.float64))
  net_out = np.stack(net_out)
  disc = discrete_linear(k0, ntr, f0, ytr, args.lr, steps)
  k_end = np.asarray(kernel(p, x_all), np.float64)
  rms = lambda d: np.sqrt(np.mean(d ** 2, axis=(1, 2)))
  acc = lambda f: 100 * float(np.mean(np.sign(f) == yte))
  gap_te, gap_tr = rms(net_out[:, ntr:] - lin[:, ntr:]), rms(net_out[:, :ntr] - lin[:, :ntr])
  floor_te = rms(disc[:, ntr:] - lin[:, ntr:])
  params_count = sum(a.size for a in jax.tree.leaves(params))
  row = (width, params_count, gap_te[-1], gap_te.max(), gap_tr[-1], floor_te.max(),
         rms(net_out[:, ntr:] - disc[:, ntr:]).max(),
         float(nm.relative_change(k0[:ntr, :ntr], k_end[:ntr, :ntr])),
         acc(net_out[-1, ntr:]), acc(lin[-1, ntr:]), acc(kernel_regression(k0, ntr, ytr)),
         acc(kernel_regression(k_end, ntr, ytr)), time.perf_counter() - start)
  return dict(width=width, steps=steps, net=net_out, lin=lin, gap_te=gap_te,
              floor_te=floor_te, row=row)


def fmt(value) -> str:
  if isinstance(value, (int, np.integer)):
    return f"{value:,}"
  return f"{value:.2e}" if abs(value) < 0.1 else f"{value:.1f}"


def table(results: list[dict]) -> list[str]:
  lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
  for r in results:
    lines.append("| " + " | ".join(fmt(v) for v in r["row"]) + " |")
  return lines


def slope(results: list[dict], column: int) -> float:
  widths = np.log([r["width"] for r in results])
  return float(np.polyfit(widths, np.log([r["row"][column] for r in results]), 1)[0])


def plot(results: list[dict], args: argparse.Namespace, ntr: int) -> None:
  from matplotlib.figure import Figure  # pylint: disable=g-import-not-at-top
  fig = Figure(figsize=(3.2 * len(results), 6.6), layout="constrained")
  grid = fig.add_gridspec(2, len(results))
  show = [ntr + i for i in range(3)]  # three test examples
  for i, r in enumerate(results):
    ax = fig.add_subplot(grid[0, i])
    t = np.maximum(r["steps"], 0.5)
    for c, j in enumerate(show):
      ax.plot(t, r["net"][:, j, 0], "-", color=f"C{c}", lw=1.5)
      ax.plot(t, r["lin"][:, j, 0], "--", color="k", lw=0.8)
    ax.set_xscale("log")
    ax.set_title(f"width {r['width']}: 3 test outputs")
    ax.set_xlabel("gradient steps s")
    if i == 0:
      ax.set_ylabel("f(x_test)")
      ax.plot([], [], "-", color="C0", label="network")
      ax.plot([], [], "--", color="k", label="NTK at init")
      ax.legend(loc="best", fontsize="small")
  ax = fig.add_subplot(grid[1, : max(1, len(results) // 2)])
  for i, r in enumerate(results):
    t = np.maximum(r["steps"], 0.5)
    ax.plot(t[1:], r["gap_te"][1:], "-", color=f"C{i}", label=f"width {r['width']}")
  ax.plot(t[1:], results[-1]["floor_te"][1:], ":", color="gray",
          label="floor: discrete steps")
  ax.set(xscale="log", yscale="log", xlabel="gradient steps s",
         ylabel="RMS test gap, network − kernel")
  ax.legend(fontsize="small")
  ax = fig.add_subplot(grid[1, max(1, len(results) // 2):])
  widths = np.array([r["width"] for r in results])
  for col, name, style in ((2, "at the end", "o-"), (3, "max over t", "s-"),
                           (6, "max, to discrete steps", "^-")):
    ax.plot(widths, [r["row"][col] for r in results], style, label=name)
  ref = results[0]["row"][2] * widths[0] / widths
  ax.plot(widths, ref, "k--", lw=0.8, label="∝ 1/n")
  ax.set(xscale="log", yscale="log", xlabel="width n", ylabel="RMS test gap")
  ax.legend(fontsize="small")
  fig.suptitle(f"Digits {args.digits[0]} vs {args.digits[1]}: gradient descent (η = "
               f"{args.lr}) vs the NTK at init, {ntr} training examples")
  os.makedirs(os.path.dirname(os.path.abspath(args.png)), exist_ok=True)
  fig.savefig(args.png, dpi=90)


def main(argv: list[str] | None = None) -> list[dict]:
  args = parse_args(argv)
  data = load(args)
  results = []
  for width in args.widths:
    results.append(run_width(width, args, data))
    print(" | ".join(f"{c}: {fmt(v)}" for c, v in zip(COLUMNS, results[-1]["row"])),
          flush=True)
  plot(results, args, len(data[0]))
  runtime, cpu = time.perf_counter() - _T0, time.process_time()
  command = "python examples/finite_width.py " + " ".join(
      shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
  lines = [
      "# Finite-width check: gradient descent vs the NTK at init",
      "",
      f"Written by `{command.strip()}` in {runtime:.0f} s of wall time ({cpu:.0f} s of "
      f"CPU time, imports included) on {os.cpu_count()} CPU cores ({platform.machine()}, "
      f"jax {jax.__version__}).",
      "",
      f"Digits {args.digits[0]} vs {args.digits[1]} (targets ±1): {len(data[0])} training "
      f"and {len(data[2])} test examples; tanh MLP, {args.depth} hidden layer(s), NTK "
      f"parametrization, no biases; full-batch gradient descent, η = {args.lr}, "
      f"{args.steps} steps, seed {args.seed}. *Gap*: RMS over examples of the network's "
      f"output minus `gradient_descent_mse`'s prediction from the NTK at init (t = steps, "
      f"learning rate η). *Floor*: the same RMS for the linearized network trained by the "
      f"same discrete steps (what remains at infinite width); *gap to discrete steps*: "
      f"the network minus that linearized network (the finite-width part alone). "
      f"*Kernel change*: "
      f"‖Θ_end − Θ_0‖_F / ‖Θ_0‖_F on the training set. Accuracies (%) on the test set: "
      f"the network at the end, the init kernel's gradient-flow prediction at the same "
      f"time, and kernel regression (t = ∞) with the NTK at init and after training.",
      "",
      *table(results),
      "",
      f"Log-log slope of the test gap at the end against the width: "
      f"{slope(results, 2):.2f}; of its maximum over time: {slope(results, 3):.2f}; of "
      f"the gap to discrete steps: {slope(results, 6):.2f}; of the kernel change: "
      f"{slope(results, 7):.2f}.",
      "",
      f"![finite-width check]({os.path.relpath(args.png, os.path.dirname(args.md))})",
      ""]
  with open(args.md, "w", encoding="utf-8") as f:
    f.write("\n".join(lines))
  print("\n".join(lines))
  return results


if __name__ == "__main__":
  main()
