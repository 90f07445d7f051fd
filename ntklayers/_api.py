"""Public kernel entry points: ``ntk_fn``, ``ntk`` and ``summed_logits``."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from ntklayers import _checks
from ntklayers._contract import all_finite, contract_unchecked, report_nonfinite
from ntklayers._factors import capture

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
      or a closure over Haiku state. Pass the un-jitted function: ``kernel_fn`` is
      jitted as a whole.
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
    independent_samples: ``None`` detects samples that interact inside the model
      (``hk.BatchNorm`` in training mode); ``False`` declares it; ``True`` asserts
      the examples are independent.

  Returns:
    ``kernel_fn(params, x1, x2=None)``; ``x2=None`` means ``x2 = x1``. For outputs
    ``[N, O]`` and default options the kernel is ``[N1, N2, O, O]``.

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
  if not callable(f):
    raise TypeError(f"`f` must be callable as f(params, x), got {type(f).__name__}.")
  options = check_options(trace_axes=trace_axes, diagonal_axes=diagonal_axes,
                          implementation=implementation, layerwise=layerwise,
                          trainable=trainable, independent_samples=independent_samples)
  jitted = jax.jit(lambda params, x1, x2: kernel(f, params, x1, x2, **options))

  def kernel_fn(params: Any, x1: Any, x2: Any = None):
    _checks.check_pair(x1, x2)
    return checked(*jitted(params, x1, x2))

  kernel_fn.__doc__ = "kernel_fn(params, x1, x2=None) -> NTK; see ntklayers.ntk_fn."
  return kernel_fn


def check_options(*, trace_axes, diagonal_axes, implementation, layerwise, trainable,
                  independent_samples) -> dict[str, Any]:
  """Validates the options of :func:`ntk_fn` eagerly; returns them normalized."""
  _checks.check_implementation(implementation)
  if not isinstance(layerwise, bool):
    raise TypeError(f"`layerwise` must be a bool, got {layerwise!r}.")
  if independent_samples not in (None, True, False):
    raise TypeError(f"`independent_samples` must be None or a bool, got "
                    f"{independent_samples!r}.")
  return dict(trace_axes=_checks.check_axes(trace_axes, "trace_axes"),
              diagonal_axes=_checks.check_axes(diagonal_axes, "diagonal_axes"),
              implementation=implementation, layerwise=layerwise, trainable=trainable,
              independent_samples=independent_samples)


def checked(result, ok):
  """Reports a non-finite kernel (see :func:`kernel`) and returns it."""
  report_nonfinite(ok)
  return result


def kernel(f: Callable, params: Any, x1: Any, x2: Any, *, trace_axes, diagonal_axes,
           implementation, layerwise, trainable, independent_samples):
  """``contract(capture(x1), capture(x2))``, the body of every kernel function.

  Returns ``(kernel, all_finite)``; the flag is reported outside ``jit`` by
  :func:`checked` (a host callback inside the compiled kernel would cost more
  than the contraction of small models).
  """
  opts = dict(implementation=implementation, trainable=trainable,
              independent_samples=independent_samples)
  c1 = capture(f, params, x1, **opts)
  c2 = None if x2 is None else capture(f, params, x2, **opts)
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
