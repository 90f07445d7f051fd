"""Plain hk.Linear vs ntklayers.Linear candidates: TE-NAS kappa and full kappa.

MLP 64-256-256-10 on N=64 standardized digits (float32, CPU). Steady-state calls
of each method are interleaved in rounds (same load for both); reported: median
and min ms, and the pair-median ratio. Then the Scorer's wall time per candidate
(repeats=3, scores te_nas_kappa + kappa, compilation included), interleaved.
"""
import statistics
import sys
import time
import warnings

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
from sklearn.datasets import load_digits

import ntklayers
import ntklayers.nas as nas

X = load_digits().data[:64].astype(np.float32)
X = jnp.asarray((X - X.mean(0)) / (X.std(0) + 1e-6))
ROUNDS = int(sys.argv[1]) if len(sys.argv) > 1 else 15

def mlp(layer):
  def fn(x):
    x = jax.nn.relu(layer(256)(x))
    x = jax.nn.relu(layer(256)(x))
    return layer(10)(x)
  return fn

warnings.simplefilter("ignore", nas.FallbackWarning)
calls = {}
for name, layer in (("drop-in", ntklayers.Linear), ("plain", hk.Linear)):
  net = hk.without_apply_rng(hk.transform(mlp(layer)))
  params = net.init(jax.random.key(0), X)
  kfull = ntklayers.ntk_fn(net.apply)
  kte = ntklayers.ntk_fn(ntklayers.summed_logits(net.apply), trainable=nas.weights_only)
  calls[name] = {
      "K full [N,N,O,O]": lambda p=params, k=kfull: k(p, X),
      "K TE-NAS [N,N]": lambda p=params, k=kte: k(p, X),
      "kappa (K + eigvals)": lambda p=params, f=net.apply: nas.kappa(f, p, X),
      "te_nas_kappa": lambda p=params, f=net.apply: nas.te_nas_kappa(f, p, X)}
times = {(n, m): [] for n in calls for m in calls[n]}
for n in calls:
  for fn in calls[n].values():
    jax.block_until_ready(fn())  # compile
for _ in range(ROUNDS):
  for m in calls["plain"]:
    for n in calls:
      t = time.perf_counter()
      jax.block_until_ready(calls[n][m]())
      times[n, m].append(time.perf_counter() - t)
print(f"{'method':22s} {'drop-in ms (med/min)':>22s} {'plain ms (med/min)':>20s} "
      f"{'slowdown':>9s}")
for m in calls["plain"]:
  d, p = times["drop-in", m], times["plain", m]
  ratio = statistics.median(b / a for a, b in zip(d, p))
  print(f"{m:22s} {1e3*statistics.median(d):10.2f} / {1e3*min(d):8.2f} "
        f"{1e3*statistics.median(p):9.2f} / {1e3*min(p):8.2f} {ratio:8.1f}x")
wall = {"drop-in": [], "plain": []}
for _ in range(3):
  for n, layer in (("drop-in", ntklayers.Linear), ("plain", hk.Linear)):
    scorer = nas.Scorer(X, repeats=3, scores=("te_nas_kappa", "kappa"))
    t = time.perf_counter()
    scorer(mlp(layer))
    wall[n].append(time.perf_counter() - t)
d, p = statistics.median(wall["drop-in"]), statistics.median(wall["plain"])
print(f"Scorer per candidate (3 repeats, incl. compile): drop-in {d:.2f} s, "
      f"plain {p:.2f} s ({p / d:.1f}x)")
print(f"jax {jax.__version__} on {jax.devices()[0].platform}, {ROUNDS} rounds")
