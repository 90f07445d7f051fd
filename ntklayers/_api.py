"""Public kernel entry points: ``ntk_fn``, ``ntk`` and ``summed_logits``."""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from ntklayers import _checks
from ntklayers._contract import all_finite, contract_unchecked, report_nonfinite
from ntklayers._factors import capture_with, prepare

KernelFn = Callable[..., "jax.Array | dict[str, jax.Array]"]


def ntk_fn(f: Callable[[Any, Any], jax.Array], *,
           trace_axes: int | Sequence[int] = (),
           diagonal_axes: int | Sequence[int] = (),
           implementation: str = "auto",
           layerwise: bool = False,
           trainable: Any = None,
           independent_samples: bool | None = None) -> KernelFn:
  """Returns ``kernel_fn(params, x1, x2=None)`` computing the exact empirical NTK.

  ``Theta(x1, x2) = J(x1) J(x2)^T`` where ``J`` is the Jacobian of ``f`` with
  respect to (the trainable leaves of) ``params``. Annotated layers
  (``ntklayers.Linear``, ``ntklayers.haiku.Conv2D``, ...) are contracted from
  cached per-layer factors; every other parameter is handled exactly by a
  Jacobian or NTK-vector-product fallback.

  Glossary of shapes: ``N1``, ``N2`` batch sizes; outputs of ``f`` are ``[N, *rest]``.

  Args:
    f: ``f(params, x) -> [N, ...]``, e.g. ``hk.without_apply_rng(hk.transform(fn)).apply``
      or a closure over Haiku state. ``kernel_fn`` is jitted as a whole; a jitted
      ``f`` is unwrapped. The compiled kernel is shared by every ``ntk_fn`` and
      ``ntk`` call with the same ``f`` and options.
    trace_axes: output axes to contract and average over (``(-1,)`` gives an
      ``[N1, N2]`` kernel averaged over logits).
    diagonal_axes: output axes on which to keep only the diagonal (``(0,)`` gives
      per-example kernels).
    implementation: ``"auto"`` (structured for annotated layers, the cheaper
      fallback elsewhere), ``"structured"`` (structured + Jacobian fallback),
      ``"ntk_vp"`` or ``"jacobian"`` (generic, whole model).
    layerwise: return ``{module name: kernel}``; the values sum to the full kernel.
    trainable: optax-style mask (pytree of bools like ``params``, a prefix of
      it, or a callable returning one); masked-out leaves are excluded.
    independent_samples: ``None`` proves (statically) or checks (one more random
      cotangent per capture) that examples do not interact and that layer rows
      are examples, and otherwise treats the batch as one sample (exact, ``N * O``
      backward passes); ``False`` treats the batch as one sample; ``True``
      promises independence and skips the checks.

  Returns:
    ``kernel_fn(params, x1, x2=None)``; ``x2=None`` means ``x2 = x1``. For outputs
    ``[N, O]`` and default options the kernel is ``[N1, N2, O, O]``. A kernel
    with NaN or inf values warns (``RuntimeWarning``) when ``kernel_fn`` is
    called eagerly; inside your own ``jax.jit`` it is returned as is (a host
    callback there would slow every call of your jitted function).

  Example:
    >>> import haiku as hk, jax, jax.numpy as jnp, ntklayers
    >>> def mlp(x):
    ...   return ntklayers.Linear(2)(jax.nn.relu(ntklayers.Linear(8)(x)))
    >>> net = hk.without_apply_rng(hk.transform(mlp))
    >>> params = net.init(jax.random.key(0), jnp.ones((1, 3)))
    >>> kernel_fn = ntklayers.ntk_fn(net.apply)
    >>> kernel_fn(params, jnp.ones((4, 3))).shape
    (4, 4, 2, 2)
  """
  f = _checks.check_f(f)
  options = check_options(trace_axes=trace_axes, diagonal_axes=diagonal_axes,
                          implementation=implementation, layerwise=layerwise,
                          trainable=trainable, independent_samples=independent_samples)
  key = _Options(**{k: _Static(v) if k == "trainable" else v for k, v in options.items()})

  def kernel_fn(params: Any, x1: Any, x2: Any = None):
    _checks.check_pair(x1, x2)
    result, ok = _jitted_kernel(f, key, params, x1, x2)
    return checked(result, ok)

  kernel_fn.__doc__ = "kernel_fn(params, x1, x2=None) -> NTK; see ntklayers.ntk_fn."
  return kernel_fn


class _Static:
  """A hashable stand-in for an option value (a pytree of bools, a callable, None)."""

  def __init__(self, value: Any):
    self.value = value
    leaves, treedef = jax.tree.flatten(value)
    try:
      self._key = (treedef, tuple(leaves))
      hash(self._key)
    except TypeError:  # unhashable leaves: compare by identity
      self._key = (id(value),)

  def __hash__(self) -> int:
    return hash(self._key)

  def __eq__(self, other: Any) -> bool:
    return isinstance(other, _Static) and self._key == other._key


@dataclasses.dataclass(frozen=True)
class _Options:
  trace_axes: tuple[int, ...]
  diagonal_axes: tuple[int, ...]
  implementation: str
  layerwise: bool
  trainable: _Static
  independent_samples: bool | None


@functools.partial(jax.jit, static_argnums=(0, 1))
def _jitted_kernel(f: Callable, options: _Options, params: Any, x1: Any, x2: Any):
  """One compiled kernel per model ``f``, options and input shapes, shared by every
  ``ntk_fn(f, ...)`` and ``ntk(f, ...)`` call (JAX's jit cache holds them)."""
  opts = {k.name: getattr(options, k.name) for k in dataclasses.fields(options)}
  opts["trainable"] = options.trainable.value
  return kernel(f, params, x1, x2, **opts)


def check_options(*, trace_axes, diagonal_axes, implementation, layerwise, trainable,
                  independent_samples) -> dict[str, Any]:
  """Validates the options of :func:`ntk_fn` eagerly; returns them normalized."""
  _checks.check_implementation(implementation)
  if not isinstance(layerwise, bool):
    raise TypeError(f"`layerwise` must be a bool, got {layerwise!r}.")
  if independent_samples not in (None, True, False):
    raise TypeError(f"`independent_samples` must be None or a bool, got "
                    f"{independent_samples!r}.")
  trace_axes, diagonal_axes = _checks.check_axes_pair(trace_axes, diagonal_axes)
  return dict(trace_axes=trace_axes, diagonal_axes=diagonal_axes,
              implementation=implementation, layerwise=layerwise, trainable=trainable,
              independent_samples=independent_samples)


def checked(result, ok):
  """Reports a non-finite kernel (see :func:`kernel` and
  :func:`ntklayers._contract.report_nonfinite`) and returns it."""
  report_nonfinite(ok)
  return result


def kernel(f: Callable, params: Any, x1: Any, x2: Any, *, trace_axes, diagonal_axes,
           implementation, layerwise, trainable, independent_samples):
  """``contract(capture(x1), capture(x2))``, the body of every kernel function.

  Both batches are discovered first and share one plan. Returns
  ``(kernel, all_finite)``; pass them to :func:`checked`.
  """
  xs = (x1,) if x2 is None else (x1, x2)
  setup = prepare(f, params, xs, implementation=implementation, trainable=trainable,
                  independent_samples=independent_samples)
  c1 = capture_with(setup, params, x1)
  c2 = None if x2 is None else capture_with(setup, params, x2)
  result = contract_unchecked(c1, c2, trace_axes=trace_axes,
                              diagonal_axes=diagonal_axes, layerwise=layerwise)
  return result, all_finite(result)


def ntk(f: Callable[[Any, Any], jax.Array], params: Any, x1: Any, x2: Any = None,
        **options: Any) -> jax.Array | dict[str, jax.Array]:
  """One-shot ``ntk_fn(f, **options)(params, x1, x2)``.

  Example:
    >>> import haiku as hk, jax, jax.numpy as jnp, ntklayers
    >>> net = hk.without_apply_rng(hk.transform(lambda x: ntklayers.Linear(2)(x)))
    >>> params = net.init(jax.random.key(0), jnp.ones((1, 3)))
    >>> ntklayers.ntk(net.apply, params, jnp.ones((4, 3)), trace_axes=(-1,)).shape
    (4, 4)
  """
  return ntk_fn(f, **options)(params, x1, x2)


def summed_logits(f: Callable[[Any, Any], jax.Array]) -> Callable[[Any, Any], jax.Array]:
  """Wraps ``f`` so that its output is summed over all non-batch axes (``[N]``).

  The NTK of the wrapped function is the ``[N1, N2]`` kernel of TE-NAS's
  condition-number score (gradients of the summed logits).

  Example:
    >>> import haiku as hk, jax, jax.numpy as jnp, ntklayers
    >>> net = hk.without_apply_rng(hk.transform(lambda x: ntklayers.Linear(5)(x)))
    >>> params = net.init(jax.random.key(0), jnp.ones((1, 3)))
    >>> ntklayers.ntk(ntklayers.summed_logits(net.apply), params, jnp.ones((4, 3))).shape
    (4, 4)
  """
  def summed(params, x):
    out = f(params, x)
    return jnp.sum(out, axis=tuple(range(1, out.ndim)))

  return summed
