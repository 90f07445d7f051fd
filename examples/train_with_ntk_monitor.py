"""Train an MLP on digits with optax while watching its NTK; save the pictures.

A Haiku MLP 64-256-256-10 of ``ntklayers.Linear`` is trained by minibatch SGD on
the mean-squared error to one-hot labels (``L = 1/B Σ ½‖f(x) − onehot(y)‖²``,
the loss whose stability bound ``2B/λmax`` ntklayers knows) on scikit-learn's
digits. Two NTK tools run alongside:

* ``ntklayers.optax.monitor`` in the jitted train step (``optax.chain(optax.sgd,
  monitor)``): every ``--every`` steps it records ``λmax``, ``κ``, trace,
  effective rank, the max stable lr, the kernel's relative change since step 0
  and its centered alignment with the labels, on a fixed probe batch of 64
  training examples;
* ``ntklayers.check_trainability`` on the current minibatch every
  ``--check-every`` steps, in the Python loop: is ``--lr`` below the NTK bound,
  is ``κ`` below ``--kappa-max``? Its warnings are printed, not raised.

Saved into ``--out`` (default ``ntk_monitor_out/``): ``history.png`` (the
monitor's history), ``spectrum_init.png`` / ``spectrum_final.png``,
``heatmap_init.png`` / ``heatmap_final.png`` (probe kernel averaged over the
outputs, examples sorted by label) and ``layerwise_final.png`` (per-layer components).

Run::

  pip install -e '.[examples]' matplotlib tqdm
  python examples/train_with_ntk_monitor.py          # 30-50 s on 2 CPU cores
  python examples/train_with_ntk_monitor.py --steps 4000 --lr 0.08 --out /tmp/ntk
"""

from __future__ import annotations

import argparse
import os
import warnings

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm import tqdm

import ntklayers
import ntklayers.metrics as nm
import ntklayers.optax as nopt
import ntklayers.plot as nplot
from ntklayers import TrainabilityWarning, check_trainability

import _digits  # examples/_digits.py: the standardized digits loader

METRICS = ("lambda_max", "condition_number", "trace", "effective_rank", "max_stable_lr",
           "relative_change", "centered_alignment")


def parse_args() -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--out", default="ntk_monitor_out/", help="folder for the PNGs")
  parser.add_argument("--steps", type=int, default=1000, help="SGD steps (1000)")
  parser.add_argument("--lr", type=float, default=0.05, help="SGD learning rate (0.05)")
  parser.add_argument("--batch", type=int, default=64, help="minibatch size (64)")
  parser.add_argument("--every", type=int, default=50, help="monitor period (50)")
  parser.add_argument("--check-every", type=int, default=500,
                      help="check_trainability period (500)")
  parser.add_argument("--kappa-max", type=float, default=1e5, help="κ threshold (1e5)")
  parser.add_argument("--seed", type=int, default=0)
  return parser.parse_args()


def mlp(x: jax.Array) -> jax.Array:
  """64 -> 256 -> 256 -> 10 ReLU MLP; ntklayers.Linear is a drop-in hk.Linear."""
  x = jax.nn.relu(ntklayers.Linear(256)(x))
  x = jax.nn.relu(ntklayers.Linear(256)(x))
  return ntklayers.Linear(10)(x)


def main() -> None:
  args = parse_args()
  os.makedirs(args.out, exist_ok=True)
  x_np, y_np = _digits.load_data(1797)
  x_train, y_train = x_np[:1500], y_np[:1500]  # NumPy: cheap minibatch indexing
  x_test, y_test = x_np[1500:], y_np[1500:]
  probe_x, probe_y = jnp.asarray(x_train[:64]), jnp.asarray(y_train[:64])

  net = hk.without_apply_rng(hk.transform(mlp))
  params = jax.jit(net.init)(jax.random.key(args.seed), probe_x[:1])
  monitor = nopt.monitor(net.apply, probe_x, every=args.every, metrics=METRICS,
                         history=args.steps // args.every + 1, probe_y=probe_y,
                         num_classes=10)
  opt = optax.chain(optax.sgd(args.lr), monitor)
  state = opt.init(params)

  def loss_fn(params, x, y):
    return 0.5 * jnp.mean(jnp.sum((net.apply(params, x) - jax.nn.one_hot(y, 10)) ** 2, -1))

  @jax.jit
  def train_step(params, state, x, y):
    loss, grads = jax.value_and_grad(loss_fn)(params, x, y)
    updates, state = opt.update(grads, state, params)  # the monitor needs params
    return optax.apply_updates(params, updates), state, loss

  @jax.jit
  def accuracy(params, x, y):
    return jnp.mean(jnp.argmax(net.apply(params, x), -1) == y)

  kernel_fn = ntklayers.ntk_fn(net.apply)  # [N, N, 10, 10]; compiled once, cached
  k_init = kernel_fn(params, probe_x)
  rng = np.random.default_rng(args.seed)
  order = np.argsort(probe_y, kind="stable")

  def check(step: int, xb: jax.Array, yb: jax.Array) -> None:
    with warnings.catch_warnings(record=True) as caught:
      warnings.simplefilter("always", TrainabilityWarning)
      report = check_trainability(net.apply, params, xb, lr=args.lr, y=yb,
                                  kappa_max=args.kappa_max)
    tqdm.write(f"\nstep {step}: check_trainability on the minibatch\n{report}")
    for w in caught:
      tqdm.write(f"  TrainabilityWarning: {w.message}")

  bar = tqdm(range(args.steps), desc="sgd", unit="step")
  for step in bar:
    idx = rng.choice(len(x_train), args.batch, replace=False)
    xb, yb = x_train[idx], y_train[idx]
    if step % args.check_every == 0:
      check(step, xb, yb)
    params, state, loss = train_step(params, state, xb, yb)
    if step % args.every == 0:
      values = nopt.monitor_values(state)
      bar.set_postfix(loss=f"{float(loss):.4f}", kappa=f"{values['condition_number']:.3g}",
                      lr_max=f"{values['max_stable_lr']:.3g}")
  check(args.steps, xb, yb)

  print(f"\ntest accuracy {float(accuracy(params, x_test, y_test)):.3f}, train accuracy "
        f"{float(accuracy(params, x_train, y_train)):.3f} after {args.steps} steps")
  history = nopt.monitor_history(state)
  steps = history.pop("step")
  print(f"monitor: {len(steps)} records, steps {steps[0]}..{steps[-1]}; last values:")
  for name, value in nopt.monitor_values(state).items():
    print(f"  {name:20} {value:.4g}")

  k_final = kernel_fn(params, probe_x)
  print(f"probe kernel: λmax {float(nm.lambda_max(k_init)):.4g} -> "
        f"{float(nm.lambda_max(k_final)):.4g}, relative change "
        f"{float(nm.relative_change(k_final, k_init)):.3f}")
  # [N, N, O, O] -> [N, N] averaged over outputs (ntk_fn's trace_axes=(-1,)): the
  # class structure is easier to see than in the [N·O, N·O] matrix.
  traced = lambda k: jnp.einsum("nmoo->nm", k) / k.shape[-1]
  figures = {
      "history.png": lambda p: nplot.history(
          history, p, steps=steps, title=f"NTK of the probe batch (64 digits), SGD lr "
          f"{args.lr}"),
      "spectrum_init.png": lambda p: nplot.spectrum(k_init, p, title="NTK spectrum at init"),
      "spectrum_final.png": lambda p: nplot.spectrum(
          k_final, p, title=f"NTK spectrum after {args.steps} steps"),
      "heatmap_init.png": lambda p: nplot.heatmap(
          traced(k_init), probe_y, path=p, title="NTK at init (mean over outputs)"),
      "heatmap_final.png": lambda p: nplot.heatmap(
          traced(k_final), probe_y, path=p, title=f"NTK after {args.steps} steps"),
      "layerwise_final.png": lambda p: nplot.layerwise(
          ntklayers.ntk_fn(net.apply, layerwise=True)(params, probe_x[order[::4]]),
          probe_y[order[::4]], p),
  }
  for name, draw in figures.items():
    draw(os.path.join(args.out, name))
  print(f"saved {', '.join(figures)} in {args.out}")


if __name__ == "__main__":
  main()
