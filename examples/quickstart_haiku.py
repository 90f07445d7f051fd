"""Quickstart: the exact NTK of a Haiku MLP on scikit-learn's digits.

Builds an MLP from ``ntklayers.Linear`` layers (drop-ins for ``hk.Linear``),
computes its empirical NTK ``[N, N, O, O]`` with ``ntklayers.ntk_fn``, reports
the spectrum of the flattened ``[N*O, N*O]`` matrix, and compares time and
values against the generic whole-model ``implementation="jacobian"``.

Run::

  pip install -e '.[examples]'
  python examples/quickstart_haiku.py            # about 15-30 s on 2 CPU cores
  python examples/quickstart_haiku.py --n 512 --n-compare 32
"""

from __future__ import annotations

import haiku as hk
import jax

import ntklayers

import _digits  # examples/_digits.py: data, timing, report


def mlp(x: jax.Array, width: int) -> jax.Array:
  """64 -> width -> width -> 10 ReLU MLP; ntklayers.Linear is a drop-in hk.Linear."""
  x = jax.nn.relu(ntklayers.Linear(width)(x))
  x = jax.nn.relu(ntklayers.Linear(width)(x))
  return ntklayers.Linear(10)(x)


def main() -> None:
  args = _digits.parse_args(__doc__.split("\n\n")[0])
  x, labels = _digits.data(args)
  net = hk.without_apply_rng(hk.transform(lambda x: mlp(x, args.width)))
  params = net.init(jax.random.key(0), x[:1])
  n_params = sum(p.size for p in jax.tree.leaves(params))
  _digits.header(args, labels, x.shape[1], "ntklayers.Linear", n_params)
  _digits.report(lambda **options: ntklayers.ntk_fn(net.apply, **options), params, x, args,
                 "kernel_fn(params, x)")


if __name__ == "__main__":
  main()
