"""Quickstart: the exact NTK of a flax.nnx MLP on scikit-learn's digits.

Builds an MLP from ``ntklayers.flax.nnx.Linear`` layers (drop-ins for
``flax.nnx.Linear``), computes its empirical NTK ``[N, N, O, O]`` with
``ntklayers.flax.nnx.ntk_fn``, reports the spectrum of the flattened
``[N*O, N*O]`` matrix, and compares time and values against the generic
whole-model ``implementation="jacobian"``. The same job as ``quickstart_haiku.py``.

Run::

  pip install -e '.[examples]'
  python examples/quickstart_nnx.py              # about 40-60 s on 2 CPU cores
  python examples/quickstart_nnx.py --n 512 --n-compare 32
"""

from __future__ import annotations

import flax
import jax
from flax import nnx

from ntklayers.flax import nnx as ntk_nnx

import _digits  # examples/_digits.py: data, timing, report


class MLP(nnx.Module):
  """64 -> width -> width -> 10 ReLU MLP; ntk_nnx.Linear is a drop-in nnx.Linear."""

  def __init__(self, d_in: int, width: int, *, rngs: nnx.Rngs):
    self.hidden1 = ntk_nnx.Linear(d_in, width, rngs=rngs)
    self.hidden2 = ntk_nnx.Linear(width, width, rngs=rngs)
    self.out = ntk_nnx.Linear(width, 10, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    x = nnx.relu(self.hidden1(x))
    x = nnx.relu(self.hidden2(x))
    return self.out(x)


def main() -> None:
  args = _digits.parse_args(__doc__.split("\n\n")[0])
  x, labels = _digits.data(args)
  model = MLP(x.shape[1], args.width, rngs=nnx.Rngs(0))
  n_params = sum(p.size for p in jax.tree.leaves(nnx.state(model, nnx.Param)))
  _digits.header(args, labels, x.shape[1], "ntklayers.flax.nnx.Linear", n_params,
                 f", flax {flax.__version__}")
  # kernel_fn(model, x1, x2=None): only nnx.Param state is differentiated; the model
  # may also be given as nnx.split(model, nnx.Param, ...) (split once).
  _digits.report(lambda **options: ntk_nnx.ntk_fn(**options), model, x, args,
                 "kernel_fn(model, x)")


if __name__ == "__main__":
  main()
