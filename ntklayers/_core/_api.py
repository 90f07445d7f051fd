"""Public kernel entry points: ``ntk_fn``, ``ntk``, ``nngp_fn``, ``kernel_fn`` and
``summed_logits``."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from ntklayers._core import _checks
from ntklayers._core._inspect import Inspection
from ntklayers._core._kernel_fn import KernelFn, make_kernel_fn, with_kwargs
from ntklayers._core._nngp import KERNELS, normalize_get
from ntklayers._core._options import Options


def ntk_fn(f: Callable[[Any, Any], jax.Array], *,
           trace_axes: int | Sequence[int] = (),
           diagonal_axes: int | Sequence[int] = (),
           implementation: str = "auto",
           layerwise: bool = False,
           trainable: Any = None,
           independent_samples: bool | None = None,
           precision: str = "highest",
           structure: str = "auto") -> KernelFn:
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
    structure: ``"auto"`` (default): besides the drop-ins, the dense,
      convolution, bias, scale and embedding equations of unmodified layers
      (``hk.Linear``, ``nn.Dense``, ``x @ W + b``, ...) are recognized in the
      traced program and contracted from factors too; ``"annotated"``: drop-ins
      only (everything else on the fallback), to compare.

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
                           precision=precision, structure=structure)
  return make_kernel_fn(_bind, lambda params: (f, params, None), options,
                        "kernel_fn(params, x1, x2=None, **model_kwargs) -> NTK; see "
                        "ntklayers.ntk_fn.")


def _bind(f: Callable, rest: None, kwargs: dict[str, Any]) -> Callable:
  """``ntk_fn``'s model: ``f`` itself, with the model kwargs bound."""
  del rest
  return with_kwargs(f, kwargs)


def nngp_fn(f: Callable[[Any, Any], jax.Array], *,
            trace_axes: int | Sequence[int] = (),
            diagonal_axes: int | Sequence[int] = (),
            precision: str = "highest") -> KernelFn:
  """Returns ``nngp_fn(params, x1, x2=None, **model_kwargs)``, the empirical NNGP kernel.

  ``K(x1, x2) = f(x1) f(x2)^T``, the outer product of the model's outputs, with
  the output layout of :func:`ntk_fn`: for outputs ``[N, O]`` and the default
  axes ``[N1, N2, O, O]``; traced axes are contracted and averaged (divided by
  their size), diagonal axes appear once. The defaults are ntklayers' (no axis
  traced); neural-tangents' ``empirical_nngp_fn`` traces the last axis by
  default (``trace_axes=(-1,)``, as ``ntklayers.compat.neural_tangents`` does).

  Args:
    f: ``f(params, x) -> [N, ...]`` as for :func:`ntk_fn`.
    trace_axes: output axes to contract and average over (``(-1,)`` gives an
      ``[N1, N2]`` kernel).
    diagonal_axes: output axes on which to keep only the diagonal (``(0,)``
      gives per-example ``[N, O, O]`` kernels).
    precision: matrix-product precision of the contraction, as for :func:`ntk_fn`.

  Returns:
    ``nngp_fn(params, x1, x2=None, **model_kwargs)``, jitted; ``model_kwargs``
    as for :func:`ntk_fn`.

  Example:
    >>> import haiku as hk, jax, jax.numpy as jnp, ntklayers
    >>> net = hk.without_apply_rng(hk.transform(lambda x: hk.Linear(2)(x)))
    >>> x = jnp.ones((4, 3))
    >>> params = net.init(jax.random.key(0), x)
    >>> k = ntklayers.nngp_fn(net.apply)(params, x, jnp.zeros((5, 3)))
    >>> k.shape
    (4, 5, 2, 2)
    >>> bool(jnp.allclose(ntklayers.nngp_fn(net.apply, trace_axes=(-1,))(params, x),
    ...                   net.apply(params, x) @ net.apply(params, x).T / 2))
    True
  """
  f = _checks.check_f(f)
  options = Options.create(trace_axes=trace_axes, diagonal_axes=diagonal_axes,
                           precision=precision)
  return make_kernel_fn(_bind, lambda params: (f, params, None), options,
                        "nngp_fn(params, x1, x2=None, **model_kwargs) -> NNGP; see "
                        "ntklayers.nngp_fn.", get="nngp")


def kernel_fn(f: Callable[[Any, Any], jax.Array], *,
              get: str | Sequence[str] | None = KERNELS, **options: Any) -> KernelFn:
  """Returns ``kernel_fn(params, x1, x2=None, **model_kwargs)``: NNGP and NTK in one call.

  Both kernels come from one jitted program that evaluates the model's forward
  pass once: the NNGP is contracted from the outputs of the program the NTK
  capture replays (XLA merges the two evaluations; see ``docs/guides/kernels.md``).

  Args:
    f: ``f(params, x) -> [N, ...]`` as for :func:`ntk_fn`.
    get: ``"nngp"``, ``"ntk"``, or a tuple of them (default ``("nngp", "ntk")``;
      ``None`` means the same, as in neural-tangents).
    **options: the options of :func:`ntk_fn` (``trace_axes``, ``diagonal_axes``
      and ``precision`` apply to both kernels; ``implementation``,
      ``layerwise``, ``trainable`` and ``independent_samples`` to the NTK).

  Returns:
    ``kernel_fn(params, x1, x2=None, **model_kwargs)`` returning one kernel for
    a string ``get``, else a ``Kernels`` named tuple with one field per name in
    ``get``'s order, e.g. ``Kernels(nngp=[N1, N2, O, O], ntk=[N1, N2, O, O])``.

  Example:
    >>> import haiku as hk, jax, jax.numpy as jnp, ntklayers
    >>> net = hk.without_apply_rng(hk.transform(lambda x: ntklayers.Linear(2)(x)))
    >>> x = jnp.ones((4, 3))
    >>> params = net.init(jax.random.key(0), x)
    >>> k = ntklayers.kernel_fn(net.apply, trace_axes=(-1,))(params, x)
    >>> k.nngp.shape, k.ntk.shape
    ((4, 4), (4, 4))
    >>> ntklayers.kernel_fn(net.apply, get="nngp")(params, x).shape
    (4, 4, 2, 2)
  """
  f = _checks.check_f(f)
  single, names = normalize_get(get)
  opts = Options.create(**options)
  return make_kernel_fn(_bind, lambda params: (f, params, None), opts,
                        "kernel_fn(params, x1, x2=None, **model_kwargs) -> NNGP and/or NTK; "
                        "see ntklayers.kernel_fn.", get=names[0] if single else names)


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


def inspect(f: Callable[[Any, Any], jax.Array], params: Any, x1: Any, x2: Any = None,
            **options: Any) -> Inspection:
  """How ``ntk_fn(f, **options)(params, x1, x2)`` would handle each parameter.

  Nothing is computed: the model is traced abstractly (``jax.eval_shape``) and
  the plan is the one the kernel function would make. Per group: the parameter
  paths and size, the route (``"structured (tag)"`` for drop-in layers,
  ``"structured (recognized)"`` for equations of unmodified layers,
  ``"fallback (jacobian)"`` / ``"fallback (ntk_vp)"``), the reason for a
  fallback, the estimated FLOPs and factor memory; and the sample mode.

  Args:
    f: ``f(params, x) -> [N, ...]`` as for :func:`ntk_fn`.
    params: its parameters.
    x1: first batch ``[N1, ...]``.
    x2: second batch ``[N2, ...]`` (``None``: ``x1``).
    **options: the options of :func:`ntk_fn`.

  Returns:
    An :class:`Inspection`; ``print`` it for a table.

  Example:
    >>> import haiku as hk, jax, jax.numpy as jnp, ntklayers
    >>> net = hk.without_apply_rng(hk.transform(lambda x: hk.nets.MLP([8, 2])(x)))
    >>> params = net.init(jax.random.key(0), jnp.ones((1, 3)))
    >>> info = ntklayers.inspect(net.apply, params, jnp.ones((4, 3)))
    >>> [g.route for g in info.groups][:2]
    ['structured (recognized)', 'structured (recognized)']
  """
  return ntk_fn(f, **options).inspect(params, x1, x2)  # type: ignore[attr-defined]
