"""neural-tangents 0.6.5 on a zoo model, same weights and inputs as ntklayers' side.

Runs in NT's own environment (jax 0.4.23; ``/work/shared/tools/nt_env.sh`` builds
it)::

  /work/nt-env/bin/python benchmarks/zoo/nt_side.py --data DIR/vit.npz --out DIR/vit_nt.json

``--data`` is the ``.npz`` that ``bench_zoo.py`` exports (``weights.save``: the
canonical weights, the inputs, the outputs of ntklayers' side). The model is
rebuilt here from ``plain.py`` (plain JAX on the canonical weights) or, for
``hk_resnet18``, with stock Haiku 0.0.12's ``hk.nets.ResNet``; its outputs must
equal the saved ones (float32: ``max |out - saved| / max |saved| <= 1e-5``) or
nothing is timed.

For each implementation (``STRUCTURED_DERIVATIVES``, ``JACOBIAN_CONTRACTION``,
``NTK_VECTOR_PRODUCTS``) of ``nt.empirical_ntk_fn(f, trace_axes=(), vmap_axes=0)``
(every zoo model is in inference mode: examples are independent), jitted as
``kernel(x1, None, params)``:

* ``first``: ahead-of-time ``lower`` + ``compile`` + the first call (also split
  into ``lower_s``, ``compile_s``), as on ntklayers' side;
* ``memory``: XLA's compiled memory analysis (argument, output, temp, alias bytes;
  jax 0.4.23 reports 0 bytes on CPU, so the lowered program is also written as
  StableHLO text, ``mlir``, which ``bench_zoo.py`` compiles with its own XLA);
* ``times``: steady-state calls of the compiled kernel, interleaved in rounds
  over the implementations (each blocked), until ``--repeats`` or, once 3 calls are
  timed, ``--budget`` seconds per implementation.

Writes JSON to ``--out`` and the kernels (``[N, N, O, O]``) to ``--out`` with
``.npz`` in place of ``.json``. Only ``jax``, ``numpy``, ``neural_tangents`` (and
Haiku for ``hk_resnet18``) are imported; ``plain.py`` and ``weights.py`` sit
next to this file.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import plain  # noqa: E402
import weights as W  # noqa: E402

IMPLEMENTATIONS = ("STRUCTURED_DERIVATIVES", "JACOBIAN_CONTRACTION", "NTK_VECTOR_PRODUCTS")
OUTPUT_TOL = 1e-5


def _haiku_resnet(cfg, canon):
  """``hk.nets.ResNet18`` (or its small twin, as ``hk_models.hk_resnet``) in Haiku 0.0.12."""
  import haiku as hk  # pylint: disable=g-import-not-at-top

  def fn(x, is_training=False):
    if tuple(cfg.blocks) == (2, 2, 2, 2) and tuple(cfg.channels) == (64, 128, 256, 512):
      net = hk.nets.ResNet18(num_classes=cfg.n_out)
    else:
      initial = dict(output_channels=cfg.channels[0], kernel_shape=7, stride=2,
                     with_bias=False, padding="SAME", name="initial_conv")
      net = hk.nets.ResNet(blocks_per_group=cfg.blocks, num_classes=cfg.n_out,
                           bottleneck=False, channels_per_group=cfg.channels,
                           use_projection=(False, True, True, True),
                           initial_conv_config=initial)
    return net(x, is_training=is_training)

  net = hk.without_apply_rng(hk.transform_with_state(fn))
  x0 = jnp.zeros((1, cfg.size, cfg.size, cfg.c_in), jnp.float32)
  params_t, state_t = jax.eval_shape(lambda k, x: net.init(k, x, True), jax.random.PRNGKey(0), x0)
  params, state = W.to_haiku(canon, params_t, state_t, convert=jnp.asarray)

  def f(p, x):
    return net.apply(p, state, x)[0]

  return f, params


def model(arch: str, size: str, canon: W.Canonical):
  """``(f(params, x), params)`` on NT's side."""
  cfg, _ = plain.SIZES[arch][size]
  if isinstance(cfg, plain.HkResNet):
    return _haiku_resnet(cfg, canon)
  stats = {k: jnp.asarray(v) for k, v in canon.items()
           if k.rsplit("/", 1)[-1] in ("mean", "var")}
  params = {k: jnp.asarray(v) for k, v in canon.items() if k not in stats}

  def f(p, x):
    return plain.apply(cfg, {**p, **stats}, x)

  return f, params


def _memory(compiled) -> dict | None:
  try:
    m = compiled.memory_analysis()
  except Exception:  # pylint: disable=broad-except  (backend-dependent)
    return None
  if m is None:
    return None
  get = lambda k: int(getattr(m, k, 0) or 0)
  return dict(argument=get("argument_size_in_bytes"), output=get("output_size_in_bytes"),
              temp=get("temp_size_in_bytes"), alias=get("alias_size_in_bytes"))


def run(data: str, out: str, implementations: list[str], repeats: int, budget: float) -> dict:
  import neural_tangents as nt  # pylint: disable=g-import-not-at-top
  canon, x_np, saved, meta = W.load(data)
  arch, size = str(meta["arch"]), str(meta["size"])
  f, params = model(arch, size, canon)
  x = jnp.asarray(x_np)
  ours = np.asarray(jax.jit(f)(params, x))
  err = float(np.max(np.abs(ours - saved)) / max(float(np.max(np.abs(saved))), 1e-30))
  result = dict(arch=arch, size=size, jax=jax.__version__, neural_tangents=nt.__version__,
                backend=jax.default_backend(), output_rel_err=err,
                load_before=list(os.getloadavg()), impls={})
  if not err <= OUTPUT_TOL:
    result["error"] = f"outputs differ from ntklayers' side: rel err {err:.2e}"
    return result
  compiled, kernels = {}, {}
  for name in implementations:
    impl = getattr(nt.NtkImplementation, name)
    row: dict = dict(times=[], error=None)
    result["impls"][name] = row
    try:
      fn = jax.jit(nt.empirical_ntk_fn(f, trace_axes=(), vmap_axes=0, implementation=impl))
      t0 = time.perf_counter()
      lowered = fn.lower(x, None, params)
      t1 = time.perf_counter()
      comp = lowered.compile()
      t2 = time.perf_counter()
      k = jax.block_until_ready(comp(x, None, params))
      t3 = time.perf_counter()
    except Exception as e:  # pylint: disable=broad-except  (recorded, the others go on)
      row["error"] = f"{type(e).__name__}: {str(e)[:500]}"
      traceback.print_exc()
      continue
    mlir = f"{os.path.splitext(out)[0]}-{name.lower()}.mlir"
    with open(mlir, "w", encoding="utf-8") as fh:
      fh.write(lowered.as_text())
    row.update(first=t3 - t0, lower_s=t1 - t0, compile_s=t2 - t1, memory=_memory(comp),
               mlir=mlir)
    compiled[name] = comp
    kernels[name] = np.asarray(k)
  for _ in range(repeats):
    for name, comp in compiled.items():
      ts = result["impls"][name]["times"]
      if len(ts) >= 3 and sum(ts) > budget:
        continue
      t0 = time.perf_counter()
      jax.block_until_ready(comp(x, None, params))
      ts.append(time.perf_counter() - t0)
  result["load_after"] = list(os.getloadavg())
  if kernels:
    np.savez(os.path.splitext(out)[0] + ".npz", **kernels)
  return result


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--data", required=True, help="the .npz exported by bench_zoo.py")
  parser.add_argument("--out", required=True, help="JSON output path")
  parser.add_argument("--impls", default=",".join(IMPLEMENTATIONS),
                      help="comma-separated NtkImplementation names")
  parser.add_argument("--repeats", type=int, default=10)
  parser.add_argument("--budget", type=float, default=20.0)
  args = parser.parse_args(argv)
  result = run(args.data, args.out, [s for s in args.impls.split(",") if s],
               args.repeats, args.budget)
  with open(args.out, "w", encoding="utf-8") as fh:
    json.dump(result, fh, indent=1)
  print(json.dumps({k: v for k, v in result.items() if k != "impls"}))
  for name, row in result["impls"].items():
    med = float(np.median(row["times"])) if row["times"] else float("nan")
    print(f"{name}: median {med * 1e3:.1f} ms, first {row.get('first', float('nan')):.2f} s, "
          f"error {row['error']}")
  return 0 if "error" not in result else 1


if __name__ == "__main__":
  sys.exit(main())
