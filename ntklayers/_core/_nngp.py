"""The empirical NNGP kernel ``f(x1) f(x2)^T`` and the ``get`` argument of kernel functions.

The NNGP is contracted from the model's outputs with the same output-axis
conventions as the NTK (:class:`~ntklayers._core._axes.OutputSpec`: traced axes
averaged, diagonal axes once, layout ``(N1, N2, A1, A2, ...)``).

When the NTK is computed in the same call (``get=("nngp", "ntk")``), the
outputs are those of the program discovery traced for the capture, evaluated
again by :func:`~ntklayers._core._replay.replay` in the same jitted program as
the capture's replay: XLA's common-subexpression elimination merges the two
evaluations, so every operation of the forward pass is computed once
(``tests/test_nngp_shared.py`` counts them in the compiled program). The only
operations the NNGP adds are those the NTK never needs, such as the model's
last activation (its derivative, not its value, enters the capture).
"""

from __future__ import annotations

import collections
import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from ntklayers._core import _checks
from ntklayers._core._axes import OutputSpec
from ntklayers._core._capture import Setup
from ntklayers._core._options import Options
from ntklayers._core._replay import replay

#: The kernels a kernel function can return, in the order ``get`` may name them.
KERNELS = ("nngp", "ntk")

Get = str | Sequence[str]  # a kernel name or several


def normalize_get(get: Get | None, default: Get = KERNELS) -> tuple[bool, tuple[str, ...]]:
  """``(single, names)``: whether ``get`` names one kernel as a string, and the names.

  Args:
    get: ``"nngp"``, ``"ntk"``, or a non-empty sequence of distinct names
      (case-insensitive, as in neural-tangents); ``None`` for ``default``.
    default: what ``None`` means.

  Raises:
    ValueError: an unknown, repeated or empty ``get``.
    TypeError: ``get`` is neither a string nor a sequence of strings.
  """
  if get is None:
    get = default
  single = isinstance(get, str)
  if not single and (not isinstance(get, Sequence) or not all(isinstance(g, str) for g in get)):
    raise TypeError(f"`get` must be 'nngp', 'ntk' or a tuple of them, got {get!r}.")
  items: list[str] = [get] if isinstance(get, str) else list(get)
  names = tuple(g.lower() for g in items)
  if not names:
    raise ValueError("`get` must name at least one kernel: 'nngp' or 'ntk'.")
  unknown = [g for g in names if g not in KERNELS]
  if unknown:
    raise ValueError(f"`get`={get!r} names unknown kernels {unknown}; the empirical "
                     f"kernels are {KERNELS}.")
  if len(set(names)) != len(names):
    raise ValueError(f"`get`={get!r} names a kernel twice.")
  return single, names


@functools.cache
def kernels_type(names: tuple[str, ...], name: str = "Kernels") -> type:
  """The named-tuple class with one field per kernel name, in ``names``' order."""
  return collections.namedtuple(name, names)


def pack(values: dict[str, Any], single: bool, names: tuple[str, ...]) -> Any:
  """One kernel (``single``) or a :func:`kernels_type` tuple of them."""
  if single:
    return values[names[0]]
  return kernels_type(names)(*(values[g] for g in names))


def nngp_contract(spec: OutputSpec, out1: jax.Array, out2: jax.Array | None) -> jax.Array:
  """``out1 out2^T`` in ``spec``'s final layout, traced axes averaged.

  Args:
    spec: the output layout (``out1``'s and ``out2``'s shapes, traced and
      diagonal axes, precision).
    out1: outputs ``[N1, *rest]``.
    out2: outputs ``[N2, *rest]``; ``None`` for ``out1``.
  """
  s1, s2, working = spec.letters()
  out2 = out1 if out2 is None else out2
  k = jnp.einsum(f"{s1},{s2}->{working}", out1, out2, precision=spec.precision)
  return spec.finalize(k)


def outputs(f: Callable, params: Any, xs: tuple, setup: Setup | None) -> list[jax.Array]:
  """The model's outputs on each batch of ``xs``, checked.

  With a ``setup`` (the NTK is computed in the same program), the programs its
  discovery traced are replayed, so that the forward pass is the capture's (see
  the module docstring); otherwise ``f`` is called.
  """
  outs = []
  for k, x in enumerate(xs):
    traced = None if setup is None or len(setup.traced) <= k else setup.traced[k]
    out = f(params, x) if traced is None else replay(traced, params, x, {})[0]
    shapes = jax.tree.map(lambda a: jax.ShapeDtypeStruct(jnp.shape(a), a.dtype), out)
    _checks.check_output(shapes, _checks.batch_size(x), x)
    outs.append(out)
  return outs


def nngp(f: Callable, params: Any, x1: Any, x2: Any, options: Options,
         setup: Setup | None = None) -> jax.Array:
  """The empirical NNGP of ``f`` at ``params`` (traceable; see :func:`outputs`)."""
  xs = (x1,) if x2 is None else (x1, x2)
  outs = outputs(f, params, xs, setup)
  o2 = None if x2 is None else outs[1]
  spec = OutputSpec.create(outs[0].shape, outs[0].shape if o2 is None else o2.shape,
                           options.trace_axes, options.diagonal_axes, options.precision)
  return nngp_contract(spec, outs[0], o2)
