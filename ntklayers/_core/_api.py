"""Public kernel entry points: ``ntk_fn``, ``ntk`` and ``summed_logits``."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from ntklayers._core import _checks
from ntklayers._core._kernel_fn import KernelFn, make_kernel_fn, with_kwargs
from ntklayers._core._options import Options


def ntk_fn(f: Callable[[Any, Any], jax.Array], *,
           trace_axes: int | Sequence[int] = (),
           diagonal_axes: int | Sequence[int] = (),
           implementation: str = "auto",
           layerwise: bool = False,
           trainable: Any = None,
           independent_samples: bool | None = None,
           precision: str = "highest") -> KernelFn:
  """Returns ``kernel_fn(params, x1, x2=None, **model_kwargs)``, the exact empirical NTK.

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
    precision: matrix-product precision of the contractions, ``"highest"``,
      ``"high"`` or ``"default"`` (or a ``jax.lax.Precision``).

  Returns:
    ``kernel_fn(params, x1, x2=None, **model_kwargs)``; ``x2=None`` means
    ``x2 = x1``; ``model_kwargs`` are passed to ``f(params, x, **model_kwargs)``
    (neural-tangents' ``**apply_fn_kwargs``, e.g. ``is_training=False``): array
    leaves are traced, other leaves are static and must be hashable. For outputs
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
  options = Options.create(trace_axes=trace_axes, diagonal_axes=diagonal_axes,
                           implementation=implementation, layerwise=layerwise,
                           trainable=trainable, independent_samples=independent_samples,
                           precision=precision)
  return make_kernel_fn(_bind, lambda params: (f, params, None), options,
                        "kernel_fn(params, x1, x2=None, **model_kwargs) -> NTK; see "
                        "ntklayers.ntk_fn.")


def _bind(f: Callable, rest: None, kwargs: dict[str, Any]) -> Callable:
  """``ntk_fn``'s model: ``f`` itself, with the model kwargs bound."""
  del rest
  return with_kwargs(f, kwargs)


def ntk(f: Callable[[Any, Any], jax.Array], params: Any, x1: Any, x2: Any = None,
        **options: Any) -> jax.Array | dict[str, jax.Array]:
  """One-shot ``ntk_fn(f, **options)(params, x1, x2)`` (options as :func:`ntk_fn`).

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
