"""Benchmark: a scanned, rematerialized 6-block transformer (issue 9's target).

Models (same architecture; float32, ``[N, T, D] = [16, 16, 64]``, 4 heads, O = 10):

* ``haiku``: ``hk.layer_stack(6)(hk.remat(block))`` of Haiku drop-ins (as
  ``ntklayers._bench.zoo.scanned_transformer``);
* ``linen``: ``nn.scan(nn.remat(Block), variable_axes={"params": 0})`` of linen
  drop-ins (``ntklayers.flax.linen``), timed through ``ntklayers.flax.ntk_fn``.

Rows per model:

* ``factors``: the floor, capturing the factors alone (``ntklayers.capture``);
* ``auto``: the kernel ``[N, N, O, O]`` with the default ``implementation="auto"``;
  every annotated layer inside the scan and the remat is contracted from
  factors (structure tags survive the transforms);
* ``before``: (with ``--before REF``) the same ``auto`` call run by the ntklayers
  of git revision ``REF`` in a subprocess, e.g. ``fa9cfac``, the last revision
  before structure tags, where every parameter inside the scan went to the
  generic fallback;
* ``ntk_vp`` and ``jacobian``: the generic methods over the whole model.

Columns: median and min ms per call (after one untimed compile + first call),
``first s``, ``x auto``: the row's median time / auto's median time, and
``rel err`` against ``jacobian``.

Usage::

  python benchmarks/bench_scan.py                    # both models, about 3 minutes on 2 CPU cores
  python benchmarks/bench_scan.py --before fa9cfac   # + the pre-tag auto of that revision
  python benchmarks/bench_scan.py --models haiku --repeats 5
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

import jax
import jax.numpy as jnp

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def haiku_model(blocks: int, n: int = 16, t: int = 16, d: int = 64, heads: int = 4,
                n_out: int = 10):
  """``hk.layer_stack(blocks)(hk.remat(block))`` of Haiku drop-ins (defined here, not
  imported from ``ntklayers._bench.zoo``, so that older revisions can run it too)."""
  import haiku as hk  # pylint: disable=g-import-not-at-top
  import ntklayers  # pylint: disable=g-import-not-at-top
  import ntklayers.haiku as nh  # pylint: disable=g-import-not-at-top

  def block(x):
    init = hk.initializers.VarianceScaling(1.0)
    h = nh.LayerNorm(axis=-1, create_scale=True, create_offset=True)(x)
    x = x + nh.MultiHeadAttention(num_heads=heads, key_size=d // heads,
                                  w_init=init)(h, h, h)
    h = nh.LayerNorm(axis=-1, create_scale=True, create_offset=True)(x)
    h = jax.nn.gelu(ntklayers.Linear(4 * d)(h))
    return x + ntklayers.Linear(d)(h)

  def fn(x):
    x = ntklayers.Linear(d)(x)
    x = hk.layer_stack(blocks)(hk.remat(block))(x)
    return ntklayers.Linear(n_out)(x.mean(axis=1))

  net = hk.without_apply_rng(hk.transform(fn))
  kp, kx = jax.random.split(jax.random.key(0))
  x = jax.random.normal(kx, (n, t, d), jnp.float32)
  params = net.init(kp, x)
  return net.apply, params, x, lambda impl: ntklayers.ntk_fn(net.apply, implementation=impl)


def linen_model(blocks: int, n: int = 16, t: int = 16, d: int = 64, heads: int = 4,
                n_out: int = 10):
  """The linen twin: ``nn.scan`` over ``nn.remat`` blocks with stacked params."""
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  import ntklayers.flax  # pylint: disable=g-import-not-at-top
  from ntklayers.flax import linen as L  # pylint: disable=g-import-not-at-top

  class Block(nn.Module):
    @nn.compact
    def __call__(self, x, _):
      h = L.LayerNorm()(x)
      x = x + L.MultiHeadDotProductAttention(num_heads=heads, qkv_features=d)(h)
      h = L.LayerNorm()(x)
      h = nn.gelu(L.Dense(4 * d)(h))
      return x + L.Dense(d)(h), None

  class Net(nn.Module):
    @nn.compact
    def __call__(self, x):
      x = L.Dense(d)(x)
      stack = nn.scan(nn.remat(Block), variable_axes={"params": 0},
                      split_rngs={"params": True}, length=blocks)
      x, _ = stack()(x, None)
      return L.Dense(n_out)(x.mean(axis=1))

  net = Net()
  kp, kx = jax.random.split(jax.random.key(0))
  x = jax.random.normal(kx, (n, t, d), jnp.float32)
  params = net.init(kp, x)["params"]

  def apply(p, x):
    return net.apply({"params": p}, x)

  def kernel(impl):
    kfn = ntklayers.flax.ntk_fn(net, implementation=impl)
    return lambda p, x: kfn({"params": p}, x)

  return apply, params, x, kernel


MODELS = {"haiku": haiku_model, "linen": linen_model}


def _auto_only(model: str, blocks: int, repeats: int) -> dict:
  """Times ``auto`` alone (the ``--json`` mode run for ``--before``; the timing
  helpers moved in the renovation, so both places are tried)."""
  try:
    from ntklayers import _bench as _timing  # pylint: disable=g-import-not-at-top
  except ImportError:  # revisions before the renovation
    from ntklayers import _timing  # type: ignore  # pylint: disable=g-import-not-at-top
  apply, params, x, kernel = MODELS[model](blocks)
  times, firsts, _ = _timing.time_round_robin({"auto": kernel("auto")}, params, x,
                                              repeats=repeats)
  return {"median": _timing.median(times["auto"]), "min": min(times["auto"]),
          "first": firsts["auto"]}


def _before(ref: str, model: str, blocks: int, repeats: int) -> dict | None:
  """``auto`` timed by the ntklayers of git revision ``ref`` (a fresh process)."""
  with tempfile.TemporaryDirectory() as tmp:
    archive = subprocess.run(["git", "-C", ROOT, "archive", ref, "ntklayers"],
                             capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", tmp], input=archive, check=True)
    env = dict(os.environ, PYTHONPATH=tmp + os.pathsep + os.environ.get("PYTHONPATH", ""))
    cmd = [sys.executable, os.path.abspath(__file__), "--json", "--models", model,
           "--blocks", str(blocks), "--repeats", str(repeats)]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=tmp)
    if out.returncode != 0:
      print(out.stderr[-2000:], file=sys.stderr)
      return None
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--models", default="haiku,linen")
  parser.add_argument("--blocks", type=int, default=6)
  parser.add_argument("--repeats", type=int, default=10)
  parser.add_argument("--before", default=None, help="git revision to time `auto` at")
  parser.add_argument("--skip-jacobian", action="store_true")
  parser.add_argument("--markdown", default=None,
                      help="also write the tables as a Markdown page "
                      "(docs/benchmarks/bench_scan.md)")
  parser.add_argument("--json", action="store_true", help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  models = args.models.split(",")
  if args.json:
    print(json.dumps(_auto_only(models[0], args.blocks, args.repeats)))
    return 0
  from ntklayers._bench import markdown_report  # pylint: disable=g-import-not-at-top
  with markdown_report(args.markdown, "A scanned transformer (layer_stack / nn.scan)",
                       PAGE_INTRO):
    return _tables(args, models)


PAGE_INTRO = """
A 6-block pre-LN transformer written as `hk.layer_stack` of `hk.remat` blocks (and
its linen twin, `nn.scan` of `nn.remat` with stacked params), `[N, T, D] = [16, 16,
64]`, 4 heads, O = 10, kernel `[16, 16, 10, 10]`, float32; medians of interleaved
calls; "before" (with `--before REV`) times `auto` at an older revision in a
subprocess after them.
"""


def _tables(args: argparse.Namespace, models: list[str]) -> int:
  import ntklayers  # pylint: disable=g-import-not-at-top
  from ntklayers import _bench as _timing  # pylint: disable=g-import-not-at-top
  print(f"jax {jax.__version__}, {jax.devices()[0].platform}, {os.cpu_count()} CPUs")
  for name in models:
    apply, params, x, kernel = MODELS[name](args.blocks)
    n_params = sum(a.size for a in jax.tree.leaves(params))
    print(f"\n{name}: {args.blocks} blocks, {n_params} parameters, x {tuple(x.shape)}")
    fns = {"factors": jax.jit(lambda p, x, f=apply: ntklayers.capture(
               f, p, x, implementation="structured")),
           "auto": kernel("auto"), "ntk_vp": kernel("ntk_vp")}
    if not args.skip_jacobian:
      fns["jacobian"] = kernel("jacobian")
    times, firsts, outs = _timing.time_round_robin(fns, params, x, repeats=args.repeats,
                                                   budget_s=60.0)
    med = {k: _timing.median(v) for k, v in times.items()}
    rows = {k: (med[k], min(times[k]), firsts[k]) for k in fns}
    if args.before:
      b = _before(args.before, name, args.blocks, max(3, args.repeats // 2))
      if b is not None:
        rows[f"before ({args.before})"] = (b["median"], b["min"], b["first"])
    ref = outs.get("jacobian", outs["ntk_vp"])
    table = []
    for key, (m, lo, first) in rows.items():
      err = "-"
      if key in outs and key != "factors":
        err = f"{_timing.max_rel_diff(outs[key], ref):.1e}"
      table.append([key, f"{m * 1e3:.1f}", f"{lo * 1e3:.1f}", f"{first:.1f}",
                    f"{m / med['auto']:.2f}", err])
    print(_timing.format_table(["method", "median ms", "min ms", "first s", "x auto",
                                "rel err"], table))
  return 0


if __name__ == "__main__":
  sys.exit(main())
