"""Default Haiku init vs LSUV vs NTK-calibrated init on scikit-learn's digits.

Models: deep MLPs ``64 -> [width] * depth -> 10`` of ``ntklayers.Linear`` with tanh
or ReLU (default depth 8, width 64). Data: digits standardized with the training
statistics, a fixed split (1297 train / 500 test, permutation seed 0). Each
(model, optimizer, init, seed) trains full-batch on softmax cross-entropy with a
fixed learning rate (Adam 1e-3, SGD 0.1, chosen once, not tuned per init) and
reports the training loss and the test accuracy after fixed step counts, plus the
NTK at init on a probe batch (the first 128 training examples, ``trace_axes=(-1,)``
``[N, N]`` kernel in float64): ``κ = λmax / λmin`` and ``tr K / N``.

Inits (all start from the same ``net.init(key(seed))``):

* ``default``: Haiku's (truncated normal, stddev ``1/sqrt(fan_in)``, zero biases).
* ``LSUV``: ``ntklayers.init.lsuv`` (orthonormal, unit output variance, tol 0.1).
* ``NTK-cal``: ``ntklayers.init.calibrate`` with its defaults (target ``tr K/N = 1``,
  ``cond_weight=1``, ``scale_reg=1``).
* ``NTK-cal κ``: ``calibrate(target_trace=None, scale_reg=0)``: conditioning only.

Run::

  python benchmarks/init_compare.py --out init_table.md   # ~6-10 min on 2 cores
  python benchmarks/init_compare.py --quick                # smoke run, < 1 min
"""

from __future__ import annotations

import argparse
import time

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import optax
from sklearn.datasets import load_digits
from tqdm import tqdm

import ntklayers
import ntklayers.init as ni

jax.config.update("jax_enable_x64", True)  # for κ at init; training stays float32

OPTIMIZERS = {"Adam": (optax.adam, 1e-3), "SGD": (optax.sgd, 0.1)}
CALIBRATIONS = {"NTK-cal": {}, "NTK-cal κ": {"target_trace": None, "scale_reg": 0.0}}
INITS = ("default", "LSUV", *CALIBRATIONS)


def load_data(n_test: int = 500):
  """Digits, fixed split, standardized with training statistics (float32)."""
  digits = load_digits()
  perm = np.random.default_rng(0).permutation(len(digits.target))
  x, y = digits.data[perm].astype(np.float64), digits.target[perm]
  x_tr, x_te = x[n_test:], x[:n_test]
  mean, std = x_tr.mean(0), x_tr.std(0)
  std = np.where(std > 0, std, 1.0)
  f32 = lambda a: jnp.asarray(((a - mean) / std).astype(np.float32))
  return f32(x_tr), jnp.asarray(y[n_test:]), f32(x_te), jnp.asarray(y[:n_test])


def make_net(act, width: int, depth: int) -> hk.Transformed:
  def mlp(x):
    for _ in range(depth):
      x = act(ntklayers.Linear(width)(x))
    return ntklayers.Linear(10)(x)
  return hk.without_apply_rng(hk.transform(mlp))


def make_trainer(net, opt, chunk: int, x, y):
  """``run(params, state) -> (params, state, loss before each step [chunk])``, jitted once."""
  def loss_fn(p):
    logits = net.apply(p, x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

  @jax.jit
  def run(params, state):
    def step(carry, _):
      p, s = carry
      loss, g = jax.value_and_grad(loss_fn)(p)
      updates, s = opt.update(g, s, p)
      return (optax.apply_updates(p, updates), s), loss
    (params, state), losses = jax.lax.scan(step, (params, state), None, length=chunk)
    return params, state, losses

  return run


def make_recorder(net, x_tr, y_tr, x_te, y_te):
  """``record(row, at, params)`` appends the train loss and test accuracy (jitted)."""
  train_loss = jax.jit(lambda p: optax.softmax_cross_entropy_with_integer_labels(
      net.apply(p, x_tr), y_tr).mean())
  test_acc = jax.jit(lambda p: (jnp.argmax(net.apply(p, x_te), -1) == y_te).mean())

  def record(row: dict, at: str, params) -> None:
    loss = float(train_loss(params))  # a diverged run's accuracy is reported as such
    row["loss" + at].append(loss)
    row["acc" + at].append(float(test_acc(params)) if np.isfinite(loss) else float("nan"))

  return record


def kernel_stats(kernel_fn, params, xp) -> tuple[float, float]:
  """(κ, tr K / N) of the float64 ``[N, N]`` kernel; κ = inf if λmin <= 0."""
  p64 = jax.tree.map(lambda a: a.astype(jnp.float64), params)
  ev = np.linalg.eigvalsh(np.asarray(kernel_fn(p64, xp.astype(jnp.float64)), np.float64))
  return (ev[-1] / ev[0] if ev[0] > 0 else float("inf")), float(ev.mean())


def fmt(values, digits: int = 3, sci: bool = False) -> str:
  v = np.asarray(values, np.float64)
  bad = int((~np.isfinite(v)).sum())
  v = v[np.isfinite(v)]
  if not len(v):
    return f"diverged ({bad}/{bad})"
  s = (f"{np.mean(v):.2e} ± {np.std(v):.1e}" if sci
       else f"{np.mean(v):.{digits}f} ± {np.std(v):.{digits}f}")
  return s + (f" ({bad} non-finite)" if bad else "")


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--seeds", type=int, default=5)
  parser.add_argument("--width", type=int, default=64)
  parser.add_argument("--depth", type=int, default=8)
  parser.add_argument("--probe", type=int, default=128, help="probe examples for κ and fits")
  parser.add_argument("--steps", type=int, nargs=2, default=(100, 500),
                      help="report after these full-batch steps (the first divides the second)")
  parser.add_argument("--calib-steps", type=int, default=200)
  parser.add_argument("--out", type=str, default=None, help="write the Markdown table here")
  parser.add_argument("--quick", action="store_true", help="small smoke run")
  args = parser.parse_args()
  if args.quick:
    args.seeds, args.width, args.probe, args.steps, args.calib_steps = 2, 32, 64, (20, 60), 30
  first, last = args.steps
  if last % first:
    raise SystemExit("--steps: the second count must be a multiple of the first")
  start = time.perf_counter()
  x_tr, y_tr, x_te, y_te = load_data()
  xp = x_tr[:args.probe]
  models = {"tanh": jnp.tanh, "ReLU": jax.nn.relu}
  results: dict = {}
  timing: dict = {name: [] for name in INITS[1:]}
  bar = tqdm(total=len(models) * args.seeds * len(INITS), desc="init x train")
  for model, act in models.items():
    net = make_net(act, args.width, args.depth)
    kernel_fn = ntklayers.ntk_fn(net.apply, trace_axes=(-1,))
    record = make_recorder(net, x_tr, y_tr, x_te, y_te)
    trainers = {name: (opt(lr), make_trainer(net, opt(lr), first, x_tr, y_tr))
                for name, (opt, lr) in OPTIMIZERS.items()}
    for seed in range(args.seeds):
      p0 = net.init(jax.random.key(seed), xp)
      inits = {"default": p0}
      t = time.perf_counter()
      inits["LSUV"] = jax.block_until_ready(
          ni.lsuv(net.apply, p0, xp, key=jax.random.key(1000 + seed)))
      timing["LSUV"].append(time.perf_counter() - t)
      for name, options in CALIBRATIONS.items():
        t = time.perf_counter()
        inits[name] = jax.block_until_ready(ni.calibrate(
            net.apply, p0, xp, steps=args.calib_steps, **options))
        timing[name].append(time.perf_counter() - t)
      for init, params in inits.items():
        kappa, tr = kernel_stats(kernel_fn, params, xp)
        for opt_name, (opt, run) in trainers.items():
          p, s = params, opt.init(params)
          row = results.setdefault((model, opt_name, init), {k: [] for k in (
              "kappa", "tr", "loss1", "loss2", "acc1", "acc2")})
          for chunk in range(last // first):
            p, s, _ = run(p, s)
            if chunk == 0:
              record(row, "1", p)
          record(row, "2", p)
          row["kappa"].append(kappa)
          row["tr"].append(tr)
        bar.update()
  bar.close()
  total = time.perf_counter() - start

  head = (f"| model | opt | init | κ(NTK) at init | tr K/N at init | train loss @{first} | "
          f"train loss @{last} | test acc @{first} | test acc @{last} |")
  lines = [head, "|" + "---|" * 9]
  for (model, opt_name, init), r in results.items():
    lines.append(f"| {model} | {opt_name} | {init} | {fmt(r['kappa'], sci=True)} | "
                 f"{fmt(r['tr'], sci=True)} | {fmt(r['loss1'])} | {fmt(r['loss2'])} | "
                 f"{fmt(r['acc1'])} | {fmt(r['acc2'])} |")
  cost = ", ".join(f"{k} {np.mean(v[1:] or v):.1f} s" for k, v in timing.items())
  notes = (
      f"\nMLP 64-{args.width}x{args.depth}-10 (ntklayers.Linear), digits 1297 train / 500 "
      f"test, full-batch softmax cross-entropy, float32; Adam lr "
      f"{OPTIMIZERS['Adam'][1]}, SGD lr {OPTIMIZERS['SGD'][1]}; mean ± std over "
      f"{args.seeds} seeds. κ and tr K/N: trace_axes=(-1,) NTK on {args.probe} training "
      f"examples, float64. Calibration: {args.calib_steps} Adam steps (lr 0.05) on the "
      f"same probe batch. Mean init cost per seed (after the first, which compiles): {cost}. "
      f"Total run time {total:.0f} s (jax {jax.__version__}, {jax.default_backend()}).")
  table = "\n".join(lines) + "\n" + notes + "\n"
  print(table)
  if args.out:
    with open(args.out, "w", encoding="utf-8") as fh:
      fh.write(table)


if __name__ == "__main__":
  main()
