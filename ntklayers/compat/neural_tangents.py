"""neural-tangents' empirical API on ntklayers: ``import ntklayers.compat.neural_tangents as nt``.

The names and signatures of neural-tangents 0.6.5 (``empirical_ntk_fn``,
``empirical_nngp_fn``, ``empirical_kernel_fn``, ``empirical_ntk_vp_fn``,
``NtkImplementation``, ``linearize``, ``taylor_expand``, ``batch``,
``monte_carlo_kernel_fn``, ``predict``) with its defaults (``trace_axes=(-1,)``)
and argument order (``kernel_fn(x1, x2, params, **apply_fn_kwargs)``), computed
by ntklayers: the values agree with neural-tangents' to float64 rounding
(``tests/test_compat_nt.py`` compares them with neural-tangents 0.6.5's own
outputs).

What differs, and why (see ``docs/guides/migrating.md``):

* every implementation is exact whatever ``vmap_axes`` says: ntklayers proves or
  checks that examples are independent (``vmap_axes=0`` on a model whose examples
  interact is exact here, wrong in neural-tangents); ``vmap_axes`` with a batch
  axis other than 0 is refused; its ``kwargs_axes`` are honoured (those kwargs
  are sliced per example);
* ``implementation`` maps to ntklayers' ``"auto"``, ``"jacobian"``, ``"ntk_vp"``,
  ``"structured"`` (:class:`NtkImplementation`); ``_j_rules``, ``_s_rules`` and
  ``_fwd`` (structured-derivative internals that do not change values) are
  accepted and unused;
* ``apply_fn_kwargs`` follow neural-tangents' split (``rng`` becomes two keys, a
  2-tuple is ``(kwargs1, kwargs2)``); when the two sides' kwargs differ the
  kernel is computed by whole-batch Jacobians (exact, ``N * O * P`` memory);
  other kwargs must be arrays or hashable;
* pytree outputs: one kernel per output leaf, as in neural-tangents (each leaf
  its own program);
* ``batch`` runs ``ntklayers.ntk_blocked``: no divisibility requirement, the
  shapes of the unbatched kernel for every ``diagonal_axes``; ``device_count``
  is accepted and every device is used;
* ``stax`` (infinite-width kernels) and ``predict.gradient_descent_mse_ensemble``
  are not provided.

Example:
  >>> import jax.numpy as jnp
  >>> import ntklayers.compat.neural_tangents as nt
  >>> f = lambda params, x: jnp.tanh(x @ params["w"])
  >>> params = {"w": jnp.ones((3, 2)) / 3}
  >>> x1, x2 = jnp.ones((4, 3)), jnp.zeros((5, 3))
  >>> nt.empirical_ntk_fn(f)(x1, x2, params).shape  # trace_axes=(-1,)
  (4, 5)
  >>> nt.empirical_kernel_fn(f, trace_axes=())(x1, None, "nngp", params).shape
  (4, 4, 2, 2)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ntklayers import predict
from ntklayers import taylor as _taylor
from ntklayers.compat import _batch
from ntklayers.compat import _empirical
from ntklayers.compat import _monte_carlo
from ntklayers.compat._kwargs import DEFAULT_NTK_IMPLEMENTATION
from ntklayers.compat._kwargs import NtkImplementation

__version__ = "0.6.5"  # the neural-tangents API this module follows

Axes = int | tuple[int, ...]


def empirical_ntk_fn(f: Callable[..., Any], trace_axes: Axes = (-1,),
                     diagonal_axes: Axes = (), vmap_axes: Any = None,
                     implementation: NtkImplementation | int = DEFAULT_NTK_IMPLEMENTATION,
                     _j_rules: bool = True, _s_rules: bool = True,
                     _fwd: bool | None = None) -> Callable[..., Any]:
  """Returns ``ntk_fn(x1, x2, params, **apply_fn_kwargs)``, the empirical NTK (neural-tangents).

  ``J(x1) J(x2)^T`` with ``J`` the Jacobian of ``f(params, x)`` in ``params``.

  Args:
    f: ``f(params, x, **kwargs)``, outputs ``[N, ...]`` (or a pytree of them:
      one kernel per leaf).
    trace_axes: output axes contracted and averaged (neural-tangents' default
      ``(-1,)``: an ``[N1, N2]`` kernel for outputs ``[N, O]``).
    diagonal_axes: output axes kept on their diagonal only (``(0,)``: per-example
      kernels).
    vmap_axes: accepted (see the module docstring): ``None``, ``0`` or
      ``(in_axes, out_axes, kwargs_axes)`` with batch axes 0.
    implementation: an :class:`NtkImplementation` or ``0``-``3``.
    _j_rules: accepted, unused (neural-tangents' structured-derivative internals).
    _s_rules: accepted, unused.
    _fwd: accepted, unused.

  Returns:
    ``ntk_fn(x1, x2, params, **apply_fn_kwargs)``: ``x2=None`` means ``x1``; the
    kernel has shape ``[N1, N2, O, O]`` for outputs ``[N, O]`` and no traced
    axes, traced axes removed, diagonal axes once.

  Example:
    >>> import jax.numpy as jnp
    >>> import ntklayers.compat.neural_tangents as nt
    >>> f = lambda params, x: x @ params
    >>> ntk_fn = nt.empirical_ntk_fn(f, trace_axes=(), vmap_axes=0)
    >>> ntk_fn(jnp.ones((4, 3)), None, jnp.ones((3, 2))).shape
    (4, 4, 2, 2)
  """
  emp = _empirical.options(f, trace_axes, diagonal_axes, vmap_axes, implementation,
                           _j_rules, _s_rules, _fwd)

  def ntk_fn(x1: Any, x2: Any, params: Any, **apply_fn_kwargs: Any) -> Any:
    """The empirical NTK of ``f`` (``[N1, N2, ...]``); see ``empirical_ntk_fn``."""
    _empirical.check_x2(x1, x2)
    return emp("ntk", x1, x2, params, apply_fn_kwargs)

  return _batch.tag(ntk_fn, "ntk", emp)


def empirical_nngp_fn(f: Callable[..., Any], trace_axes: Axes = (-1,),
                      diagonal_axes: Axes = ()) -> Callable[..., Any]:
  """Returns ``nngp_fn(x1, x2, params, **apply_fn_kwargs)``, the empirical NNGP (neural-tangents).

  ``f(x1) f(x2)^T``, the outer product of the outputs, laid out as the NTK.

  Args:
    f: ``f(params, x, **kwargs)``, outputs ``[N, ...]`` (or a pytree of them).
    trace_axes: output axes contracted and averaged (default ``(-1,)``).
    diagonal_axes: output axes kept on their diagonal only.

  Returns:
    ``nngp_fn(x1, x2, params, **apply_fn_kwargs)`` -> ``[N1, N2, ...]``.

  Example:
    >>> import jax.numpy as jnp
    >>> import ntklayers.compat.neural_tangents as nt
    >>> f = lambda params, x: x @ params
    >>> nt.empirical_nngp_fn(f, diagonal_axes=(0,))(jnp.ones((4, 3)), None,
    ...                                             jnp.ones((3, 2)))
    Array([9., 9., 9., 9.], dtype=float64)
  """
  emp = _empirical.Empirical(f, trace_axes, diagonal_axes)

  def nngp_fn(x1: Any, x2: Any, params: Any, **apply_fn_kwargs: Any) -> Any:
    """The empirical NNGP of ``f`` (``[N1, N2, ...]``); see ``empirical_nngp_fn``."""
    _empirical.check_x2(x1, x2)
    return emp("nngp", x1, x2, params, apply_fn_kwargs)

  return _batch.tag(nngp_fn, "nngp", emp)


def empirical_kernel_fn(f: Callable[..., Any], trace_axes: Axes = (-1,),
                        diagonal_axes: Axes = (), vmap_axes: Any = None,
                        implementation: NtkImplementation | int = DEFAULT_NTK_IMPLEMENTATION,
                        _j_rules: bool = True, _s_rules: bool = True,
                        _fwd: bool | None = None) -> Callable[..., Any]:
  """Returns ``kernel_fn(x1, x2, get, params, **apply_fn_kwargs)``: NNGP and/or NTK.

  With both kernels requested they come from one program that evaluates the
  model's forward pass once (``ntklayers.kernel_fn``).

  Args:
    f: ``f(params, x, **kwargs)``, outputs ``[N, ...]`` (or a pytree of them).
    trace_axes: output axes contracted and averaged (default ``(-1,)``).
    diagonal_axes: output axes kept on their diagonal only.
    vmap_axes: as for :func:`empirical_ntk_fn` (the NTK only).
    implementation: as for :func:`empirical_ntk_fn` (the NTK only).
    _j_rules: accepted, unused.
    _s_rules: accepted, unused.
    _fwd: accepted, unused.

  Returns:
    ``kernel_fn(x1, x2, get, params, **apply_fn_kwargs)``: ``get`` is ``"nngp"``,
    ``"ntk"`` (one kernel), a tuple of them or ``None`` (both): an
    ``EmpiricalKernel`` named tuple with fields in ``get``'s order.

  Example:
    >>> import jax.numpy as jnp
    >>> import ntklayers.compat.neural_tangents as nt
    >>> kernel_fn = nt.empirical_kernel_fn(lambda p, x: x @ p, vmap_axes=0)
    >>> k = kernel_fn(jnp.ones((4, 3)), jnp.ones((2, 3)), None, jnp.ones((3, 2)))
    >>> k.nngp.shape, k.ntk.shape
    ((4, 2), (4, 2))
  """
  emp = _empirical.options(f, trace_axes, diagonal_axes, vmap_axes, implementation,
                           _j_rules, _s_rules, _fwd)

  def kernel_fn(x1: Any, x2: Any, get: Any, params: Any, **apply_fn_kwargs: Any) -> Any:
    """Empirical kernels of ``f`` for ``get``; see ``empirical_kernel_fn``."""
    _empirical.check_x2(x1, x2)
    return emp(get, x1, x2, params, apply_fn_kwargs)

  return _batch.tag(kernel_fn, "kernel", emp)


def empirical_ntk_vp_fn(f: Callable[..., Any], x1: Any, x2: Any, params: Any,
                        **apply_fn_kwargs: Any) -> Callable[[Any], Any]:
  """Returns ``ntk_vp_fn(cotangents)``: ``J(x1) J(x2)^T cotangents`` without the NTK.

  One VJP of ``f`` on ``x2`` and one JVP on ``x1`` (neural-tangents'
  ``empirical_ntk_vp_fn``); ``ntklayers.metrics.ntk_matvec`` is the blocked, multi-device
  form for ``x1 = x2``.

  Args:
    f: ``f(params, x, **kwargs)``.
    x1: first batch ``[N1, ...]``.
    x2: second batch ``[N2, ...]``; ``None`` for ``x1``.
    params: the parameters.
    **apply_fn_kwargs: kwargs of ``f``, split per side as neural-tangents does.

  Returns:
    ``ntk_vp_fn(cotangents)`` taking a pytree shaped like ``f(params, x2)`` and
    returning one shaped like ``f(params, x1)``.

  Example:
    >>> import jax.numpy as jnp
    >>> import ntklayers.compat.neural_tangents as nt
    >>> f = lambda p, x: x @ p
    >>> ntk_vp = nt.empirical_ntk_vp_fn(f, jnp.ones((4, 3)), None, jnp.ones((3, 2)))
    >>> ntk_vp(jnp.ones((4, 2))).shape
    (4, 2)
  """
  if not callable(f):
    raise TypeError(f"`f` must be callable as f(params, x), got {type(f).__name__}.")
  return _empirical.ntk_vp(f, x1, x2, params, apply_fn_kwargs)


def linearize(f: Callable[..., Any], params: Any) -> Callable[..., Any]:
  """neural-tangents' ``linearize``: :func:`ntklayers.linearize`.

  Args:
    f: ``f(params, *args, **kwargs)``.
    params: the expansion point.

  Returns:
    ``f_lin(p, *args, **kwargs) = f(params) + J (p - params)``, ``f``'s output shapes.

  Example:
    >>> import jax.numpy as jnp
    >>> import ntklayers.compat.neural_tangents as nt
    >>> f_lin = nt.linearize(lambda p, x: jnp.sin(p * x), jnp.array(0.))
    >>> f_lin(jnp.array(0.5), jnp.array([1., 2.]))
    Array([0.5, 1. ], dtype=float64)
  """
  return _taylor.linearize(f, params)


def taylor_expand(f: Callable[..., Any], params: Any, degree: int) -> Callable[..., Any]:
  """neural-tangents' ``taylor_expand``: :func:`ntklayers.taylor_expand`.

  Args:
    f: ``f(params, *args, **kwargs)``.
    params: the expansion point.
    degree: the order.

  Returns:
    ``f_tayl(p, *args, **kwargs)``, ``f``'s output shapes.

  Example:
    >>> import jax.numpy as jnp
    >>> import ntklayers.compat.neural_tangents as nt
    >>> f2 = nt.taylor_expand(lambda p, x: jnp.exp(p * x), jnp.array(0.), 2)
    >>> f2(jnp.array(1.), jnp.array([1.]))  # 1 + 1 + 1/2
    Array([2.5], dtype=float64)
  """
  return _taylor.taylor_expand(f, params, degree)


def batch(kernel_fn: Callable[..., Any], batch_size: int = 0, device_count: int = -1,
          store_on_device: bool = True) -> Callable[..., Any]:
  """neural-tangents' ``batch`` of an empirical kernel function, by ``ntklayers.ntk_blocked``.

  Args:
    kernel_fn: a function of :func:`empirical_ntk_fn`, :func:`empirical_nngp_fn`
      or :func:`empirical_kernel_fn` (of this module).
    batch_size: examples per tile; ``0`` lets ``ntk_blocked`` pick the largest
      that fits its memory budget. Need not divide the batch sizes.
    device_count: accepted; blocks are spread over every device.
    store_on_device: ``True`` returns JAX arrays, ``False`` NumPy arrays in host
      memory.

  Returns:
    A function with ``kernel_fn``'s signature and outputs (shapes of the
    unbatched kernel, ``diagonal_axes`` included). Keyword arguments: a 2-tuple
    of arrays is per example; ``rng`` goes unchanged to every block.

  Example:
    >>> import jax.numpy as jnp
    >>> import ntklayers.compat.neural_tangents as nt
    >>> kernel_fn = nt.empirical_kernel_fn(lambda p, x: x @ p)
    >>> batched = nt.batch(kernel_fn, batch_size=3)
    >>> x = jnp.arange(14.).reshape(7, 2)
    >>> batched(x, None, "ntk", jnp.ones((2, 4))).shape
    (7, 7)
  """
  return _batch.batch(kernel_fn, batch_size, device_count, store_on_device)


def monte_carlo_kernel_fn(
    init_fn: Callable[..., Any], apply_fn: Callable[..., Any], key: Any, n_samples: Any,
    batch_size: int = 0, device_count: int = -1, store_on_device: bool = True,
    trace_axes: Axes = (-1,), diagonal_axes: Axes = (), vmap_axes: Any = None,
    implementation: NtkImplementation | int = DEFAULT_NTK_IMPLEMENTATION,
    _j_rules: bool = True, _s_rules: bool = True,
    _fwd: bool | None = None) -> Callable[..., Any]:
  """neural-tangents' Monte Carlo estimate of the NNGP and NTK over random initializations.

  Sample ``n`` uses neural-tangents' keys (``split`` of ``key``, then
  ``init_key, dropout_key``), ``params = init_fn(init_key, input shapes)[1]`` and
  ``apply_fn(params, x, rng=dropout_key, **apply_fn_kwargs)``, so ``apply_fn``
  must accept ``rng``.

  Args:
    init_fn: ``init_fn(key, input_shape) -> (output_shape, params)``.
    apply_fn: ``apply_fn(params, x, rng=..., **kwargs)``.
    key: a PRNG key.
    n_samples: the number of samples, or an iterable of counts at which a
      generator yields estimates.
    batch_size: as for :func:`batch` (``0``: unbatched).
    device_count: accepted, as for :func:`batch`.
    store_on_device: as for :func:`batch`.
    trace_axes: as for :func:`empirical_kernel_fn`; likewise ``diagonal_axes``,
      ``vmap_axes``, ``implementation``, ``_j_rules``, ``_s_rules``, ``_fwd``.

  Returns:
    ``kernel_fn(x1, x2=None, get=None, **apply_fn_kwargs)``: the mean kernels
    (an ``EmpiricalKernel`` tuple for ``get=None`` or a tuple), or a generator of
    them when ``n_samples`` is an iterable.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> import ntklayers.compat.neural_tangents as nt
    >>> init_fn = lambda key, shape: (None, jax.random.normal(key, (shape[-1], 2)))
    >>> apply_fn = lambda p, x, rng=None: x @ p
    >>> mc = nt.monte_carlo_kernel_fn(init_fn, apply_fn, jax.random.key(0), 3)
    >>> mc(jnp.ones((4, 3)), None, "ntk").shape
    (4, 4)
  """
  emp = _empirical.options(apply_fn, trace_axes, diagonal_axes, vmap_axes, implementation,
                           _j_rules, _s_rules, _fwd)
  _batch.batch(_batch.tag(lambda: None, "kernel", emp), batch_size, device_count,
               store_on_device)  # checks the batching arguments
  return _monte_carlo.monte_carlo(init_fn, emp, key, n_samples, batch_size, store_on_device)


_NOT_PROVIDED = {
    "stax": "infinite-width kernels (neural_tangents.stax) are not provided by ntklayers, "
            "which computes finite-width kernels of your model; keep neural-tangents for "
            "stax, or define the network in Haiku, Flax or plain JAX",
    "experimental": "neural_tangents.experimental (TF/Keras conversion) is not provided",
    "Kernel": "neural_tangents.Kernel (stax's kernel object) is not provided: empirical "
              "kernels are arrays",
}


def __getattr__(name: str) -> Any:
  if name in _NOT_PROVIDED:
    raise AttributeError(f"ntklayers.compat.neural_tangents.{name}: {_NOT_PROVIDED[name]}.")
  raise AttributeError(f"module 'ntklayers.compat.neural_tangents' has no attribute {name!r}")


__all__ = ("NtkImplementation", "batch", "empirical_kernel_fn", "empirical_nngp_fn",
           "empirical_ntk_fn", "empirical_ntk_vp_fn", "linearize", "monte_carlo_kernel_fn",
           "predict", "taylor_expand")
