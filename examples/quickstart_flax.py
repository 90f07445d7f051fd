"""Quickstart: the exact NTK of a flax.linen MLP on scikit-learn's digits.

Builds an MLP from ``ntklayers.flax.linen.Dense`` layers (drop-ins for
``flax.linen.Dense``), computes its empirical NTK ``[N, N, O, O]`` with
``ntklayers.flax.ntk_fn``, reports the spectrum of the flattened ``[N*O, N*O]``
matrix, and compares time and values against the generic whole-model
``implementation="jacobian"``. The same job as ``quickstart_haiku.py``.

Run::

  pip install -e '.[examples]'
  python examples/quickstart_flax.py             # about 40-60 s on 2 CPU cores
  python examples/quickstart_flax.py --n 512 --n-compare 32
"""

from __future__ import annotations

import flax
import flax.linen as nn
import jax

import ntklayers.flax
from ntklayers.flax import linen as ntk_nn

import _digits  # examples/_digits.py: data, timing, report


class MLP(nn.Module):
  """64 -> width -> width -> 10 ReLU MLP; ntk_nn.Dense is a drop-in nn.Dense."""

  width: int

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    x = nn.relu(ntk_nn.Dense(self.width)(x))
    x = nn.relu(ntk_nn.Dense(self.width)(x))
    return ntk_nn.Dense(10)(x)


def main() -> None:
  args = _digits.parse_args(__doc__.split("\n\n")[0])
  x, labels = _digits.data(args)
  module = MLP(args.width)
  variables = module.init(jax.random.key(0), x[:1])  # {"params": ...}
  n_params = sum(p.size for p in jax.tree.leaves(variables["params"]))
  _digits.header(args, labels, x.shape[1], "ntklayers.flax.linen.Dense", n_params,
                 f", flax {flax.__version__}")
  # Only variables["params"] is differentiated (other collections are held fixed).
  _digits.report(lambda **options: ntklayers.flax.ntk_fn(module, **options), variables, x,
                 args, "kernel_fn(variables, x)")


if __name__ == "__main__":
  main()
