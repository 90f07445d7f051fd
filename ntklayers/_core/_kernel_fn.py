"""The kernel-function factory shared by every entry point, and its body.

``ntk_fn`` (plain functions), ``ntklayers.flax.ntk_fn`` (linen modules),
``ntklayers.flax.nnx.ntk_fn`` and ``ntklayers.equinox.ntk_fn`` differ only in how
a model argument becomes ``f(params, x)`` and its parameters: each passes a
``split`` (outside ``jax.jit``: the model argument -> a static key, the
parameters and the rest of its state) and a ``build`` (inside: key, rest and
model kwargs -> ``f``) to :func:`make_kernel_fn`, which does the rest once:
input checks, the split of model kwargs into traced and static parts, one
compiled kernel per key, options, static kwargs and shapes, fallback warnings
once per kernel function, and the NaN report.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax

from ntklayers._core import _checks
from ntklayers._core._capture import capture_with, prepare
from ntklayers._core._contract import all_finite, contract_unchecked, report_nonfinite
from ntklayers._core._inspect import Inspection, inspect_model, slow_route_message
from ntklayers._core._nngp import nngp, normalize_get, pack
from ntklayers._core._options import Options, StaticKwargs, split_kwargs
from ntklayers._core._plan import collecting_notes, emit_note

KernelFn = Callable[..., "jax.Array | dict[str, jax.Array]"]
Build = Callable[[Any, Any, dict[str, Any]], Callable[[Any, Any], jax.Array]]
Split = Callable[[Any], tuple[Any, Any, Any]]


class KernelFunction:
  """``kernel_fn(model, x1, x2=None, **model_kwargs)``; see :func:`make_kernel_fn`.

  Attributes:
    fallback: names of the parameter groups the exact generic fallback counted
      in the calls so far (parameters outside structured layers).
  """

  def __init__(self, build: Build, split: Split, options: Options, doc: str,
               get: str | Sequence[str] | None = None):
    self._build, self._split, self._options = build, split, options
    self._get = _static_get(get)
    self._warned: set = set()  # fallback warnings are per kernel function
    self.fallback: tuple[str, ...] = ()
    self.__doc__ = doc

  def __call__(self, model: Any, x1: Any, x2: Any = None, **model_kwargs: Any):
    key, params, rest = self._split(model)
    _checks.check_pair(x1, x2)
    dynamic, static = split_kwargs(model_kwargs)
    result = _jitted_kernel(self._build, key, self._options, static, self._get, params, rest,
                            x1, x2, dynamic)
    self.fallback = tuple(dict.fromkeys(self.fallback + result.fallback))
    return checked(result, self._warned)

  def inspect(self, model: Any, x1: Any, x2: Any = None, **model_kwargs: Any) -> Inspection:
    """How each parameter group of ``self(model, x1, x2, **model_kwargs)`` would be
    handled (route, reason, estimated FLOPs and memory), computed abstractly:
    the model is traced, nothing is evaluated. ``print`` the result for a table."""
    key, params, rest = self._split(model)
    _checks.check_pair(x1, x2)
    return inspect_model(self._build(key, rest, model_kwargs), params, x1, x2,
                         self._options)


def make_kernel_fn(build: Build, split: Split, options: Options, doc: str,
                   get: str | Sequence[str] | None = None) -> KernelFunction:
  """``kernel_fn(model, x1, x2=None, **model_kwargs)`` for one kind of model argument.

  Args:
    build: ``(key, rest, model_kwargs) -> f(params, x)``, called inside ``jax.jit``
      (``key`` is static, ``rest`` and the array leaves of the kwargs traced). A
      module-level function, so that compiled kernels are shared between kernel
      functions of the same key.
    split: ``model -> (key, params, rest)``, called outside: ``key`` hashable
      (static), ``params`` the differentiated pytree, ``rest`` other arrays.
    options: validated kernel options.
    doc: the kernel function's docstring.
    get: which kernels the function returns: ``None`` (or ``"ntk"``) the NTK,
      ``"nngp"`` the NNGP, a tuple such as ``("nngp", "ntk")`` a
      ``Kernels`` named tuple of them computed in one program (see :func:`kernel`).

  Returns:
    A :class:`KernelFunction`.
  """
  return KernelFunction(build, split, options, doc, get)


def _static_get(get: str | Sequence[str] | None) -> str | tuple[str, ...] | None:
  """``get`` checked and made hashable (a static argument of the jitted kernel)."""
  if get is None:
    return None
  single, names = normalize_get(get)
  return names[0] if single else names


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3, 4))
def _jitted_kernel(build: Build, key: Any, options: Options, static: StaticKwargs,
                   get: str | tuple[str, ...] | None, params: Any, rest: Any, x1: Any, x2: Any,
                   dynamic: list):
  """One compiled kernel per model (``build``, ``key``), options, ``get``, static
  model kwargs and input shapes, shared by every kernel function with the same
  model (JAX's jit cache holds them)."""
  return kernel(build(key, rest, static.merge(dynamic)), params, x1, x2, options, get)


def with_kwargs(f: Callable, kwargs: dict[str, Any]) -> Callable:
  """``f`` with extra keyword arguments bound."""
  if not kwargs:
    return f

  def bound(params, x):
    return f(params, x, **kwargs)

  return bound


@jax.tree_util.register_pytree_node_class
class KernelResult:
  """What :func:`kernel` returns: the kernel, whether it is finite, and (static,
  so that they come back from ``jax.jit``'s cache too) the fallback notes and the
  names of the parameter groups on the fallback."""

  def __init__(self, value: Any, ok: Any, notes: tuple = (), fallback: tuple = ()):
    self.value, self.ok, self.notes, self.fallback = value, ok, notes, fallback

  def tree_flatten(self):
    return (self.value, self.ok), (self.notes, self.fallback)

  @classmethod
  def tree_unflatten(cls, aux, children):
    return cls(*children, *aux)


def checked(result: KernelResult, warned: set | None = None):
  """Warns about a non-finite kernel (see :func:`ntklayers._core._contract.report_nonfinite`)
  and about parameters on the fallback (once per note and ``warned`` set, i.e. per
  kernel function); returns the kernel."""
  report_nonfinite(result.ok)
  warned = set() if warned is None else warned
  for note in result.notes:
    if note not in warned:
      warned.add(note)
      emit_note(note, stacklevel=4)
  return result.value


def kernel(f: Callable, params: Any, x1: Any, x2: Any, options: Options,
           get: str | tuple[str, ...] | None = None) -> KernelResult:
  """``contract(capture(x1), capture(x2))``, the body of every kernel function.

  Both batches are discovered first and share one plan. With ``"nngp"`` in
  ``get`` the NNGP ``f(x1) f(x2)^T`` is contracted from the outputs of the
  programs discovery traced (:func:`ntklayers._core._nngp.outputs`: the forward
  pass is the capture's, merged by XLA); ``get=None`` is the NTK alone. Call it
  inside ``jax.jit``; pass its result to :func:`checked` outside.
  """
  single, names = (True, ("ntk",)) if get is None else normalize_get(get)
  xs = (x1,) if x2 is None else (x1, x2)
  values: dict[str, Any] = {}
  notes: list = []
  setup = None
  if "ntk" in names:
    with collecting_notes() as notes:
      setup = prepare(f, params, xs, options)
    slow = (slow_route_message(setup, params)  # (not when auto chose a whole-model route)
            if setup.route in ("structured", "structured+ntk_vp") else None)
    if slow is not None:
      notes.append((None, None, slow))
    c1 = capture_with(setup, params, x1)
    c2 = None if x2 is None else capture_with(setup, params, x2)
    values["ntk"] = contract_unchecked(c1, c2, options)
  if "nngp" in names:
    values["nngp"] = nngp(f, params, x1, x2, options, setup)
  result = pack(values, single, names)
  fallback = () if setup is None else tuple(g.name for g in setup.plan.fallback)
  return KernelResult(result, all_finite(result), tuple(notes), fallback)


