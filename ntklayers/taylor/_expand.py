"""``linearize`` and ``taylor_expand``: the model as a polynomial in its parameters.

For ``f(params, x)`` and an expansion point ``params0``, with ``d = params - params0``:

* ``linearize(f, params0)(params, x) = f(params0, x) + J(params0, x) d``, one
  ``jax.jvp`` (which returns the primal output and the directional derivative
  together);
* ``taylor_expand(f, params0, degree)(params, x) = sum_{k <= degree} D^k f(params0, x)[d^k] / k!``,
  the ``k``-th directional derivatives by ``degree`` nested ``jax.jvp``\\ s of one
  function that returns every lower order as well (each order is computed once,
  not once per level as a recursion on ``f`` alone would).

These are neural-tangents' ``linearize`` and ``taylor_expand`` (same signatures
and values); they work for any ``f(params, *args, **kwargs)`` whose ``params``
is a pytree of floating arrays and whose output is a pytree of floating arrays.
Framework models are such functions: a Haiku ``apply``, a linen module through
``ntklayers.flax.linen.linearize`` (only ``params`` moves), an NNX model through
``ntklayers.flax.nnx.linearize`` (only ``nnx.Param`` state moves).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


def _displacement(params: Any, params0: Any) -> Any:
  """``params - params0`` leaf by leaf, with errors that name the mismatch."""
  t, t0 = jax.tree.structure(params), jax.tree.structure(params0)
  if t != t0:  # type: ignore[operator]  # PyTreeDef has no stubs
    raise ValueError(
        f"`params` must have the structure of the expansion point: got {t}, expected {t0}.")

  def sub(path, p, p0):
    if jnp.shape(p) != jnp.shape(p0):
      raise ValueError(
          f"`params{jax.tree_util.keystr(path)}` has shape {jnp.shape(p)}, the expansion "
          f"point {jnp.shape(p0)}.")
    return jnp.asarray(p, dtype=jnp.result_type(p0)) - p0

  return jax.tree_util.tree_map_with_path(sub, params, params0)


def _check_params(params0: Any) -> None:
  for path, leaf in jax.tree_util.tree_flatten_with_path(params0)[0]:
    if not jnp.issubdtype(jnp.result_type(leaf), jnp.inexact):
      raise TypeError(
          f"Expansion point leaf `params{jax.tree_util.keystr(path)}` has dtype "
          f"{jnp.result_type(leaf)}: every leaf must be floating (it is differentiated).")


def _add(a: Any, b: Any) -> Any:
  return jax.tree.map(jnp.add, a, b)


def linearize(f: Callable[..., Any], params: Any) -> Callable[..., Any]:
  """Returns ``f_lin``, the first-order Taylor expansion of ``f`` around ``params``.

  ``f_lin(p, *args, **kwargs) = f(params, *args, **kwargs) + J d``, with
  ``d = p - params`` and ``J`` the Jacobian of ``f`` with respect to its
  parameters at ``params``, evaluated by one ``jax.jvp`` (no Jacobian is
  formed). The NTK of ``f_lin`` is the NTK of ``f`` at ``params``, at every
  ``p``; gradient descent on ``f_lin`` is the kernel regime that
  :mod:`ntklayers.predict` solves in closed form.

  Args:
    f: ``f(params, *args, **kwargs) -> output`` (a pytree of floating arrays),
      e.g. a Haiku ``apply``. For linen and NNX models see
      ``ntklayers.flax.linen.linearize`` and ``ntklayers.flax.nnx.linearize``.
    params: the expansion point, a pytree of floating arrays.

  Returns:
    ``f_lin(p, *args, **kwargs)`` with ``f``'s signature; ``p`` must have the
    structure and shapes of ``params``. Shapes: those of ``f``'s output.

  Example:
    >>> import haiku as hk, jax, jax.numpy as jnp, ntklayers
    >>> net = hk.without_apply_rng(hk.transform(lambda x: hk.Linear(2)(jnp.tanh(x))))
    >>> x = jnp.ones((4, 3))
    >>> params = net.init(jax.random.key(0), x)
    >>> f_lin = ntklayers.linearize(net.apply, params)
    >>> f_lin(params, x).shape
    (4, 2)
    >>> bool(jnp.allclose(f_lin(params, x), net.apply(params, x)))
    True
  """
  if not callable(f):
    raise TypeError(f"`f` must be callable as f(params, *args), got {type(f).__name__}.")
  _check_params(params)

  def f_lin(p: Any, *args: Any, **kwargs: Any) -> Any:
    d = _displacement(p, params)
    out, tangent = jax.jvp(lambda q: f(q, *args, **kwargs), (params,), (d,))
    return _add(out, tangent)

  return f_lin


def derivatives(g: Callable[[Any], Any], params: Any, d: Any, degree: int) -> tuple:
  """``(g(params), Dg[d], D^2 g[d, d], ..., D^degree g[d^degree])`` by nested JVPs.

  ``h_0(q) = (g(q),)`` and ``h_{k+1}(q) = h_k(q) + (last tangent of jvp(h_k, q, d),)``:
  the tangents of ``h_k``'s outputs are the next orders, so ``h_degree`` returns
  every order, each computed once.
  """
  def zeroth(q: Any) -> tuple:
    return (g(q),)

  h: Callable[[Any], tuple] = zeroth
  for _ in range(degree):
    h = _one_more(h, d)
  return h(params)


def _one_more(h: Callable[[Any], tuple], d: Any) -> Callable[[Any], tuple]:
  """``q -> h(q) + (the tangent of h's last output along d,)``."""
  def next_order(q: Any) -> tuple:
    primals, tangents = jax.jvp(h, (q,), (d,))
    return primals + (tangents[-1],)
  return next_order


def taylor_expand(f: Callable[..., Any], params: Any, degree: int) -> Callable[..., Any]:
  """Returns ``f_tayl``, the Taylor expansion of ``f`` of order ``degree`` around ``params``.

  ``f_tayl(p, *args, **kwargs) = sum_{k=0}^{degree} D^k f(params)[d, ..., d] / k!``
  with ``d = p - params``: ``degree=0`` is the constant ``f(params)``,
  ``degree=1`` is :func:`linearize`, ``degree=2`` adds ``d^T H d / 2`` with
  ``H`` the Hessian of each output. The directional derivatives are nested
  ``jax.jvp``\\ s (no Hessian is formed); their cost grows about as ``2^degree``
  forward passes.

  Args:
    f: ``f(params, *args, **kwargs) -> output`` (a pytree of floating arrays).
    params: the expansion point, a pytree of floating arrays.
    degree: the order, a non-negative int.

  Returns:
    ``f_tayl(p, *args, **kwargs)`` with ``f``'s signature and output shapes.

  Example:
    >>> import jax.numpy as jnp, ntklayers
    >>> f = lambda p, x: jnp.sin(p * x)
    >>> f2 = ntklayers.taylor_expand(f, jnp.array(0.), 2)
    >>> f2(jnp.array(0.1), jnp.array([1., 2.]))  # sin(p x) ~ p x up to order 2
    Array([0.1, 0.2], dtype=float64)
  """
  if not callable(f):
    raise TypeError(f"`f` must be callable as f(params, *args), got {type(f).__name__}.")
  if isinstance(degree, bool) or not isinstance(degree, (int, np.integer)) or degree < 0:
    raise ValueError(f"`degree` must be a non-negative int, got {degree!r}.")
  degree = int(degree)
  _check_params(params)

  def f_tayl(p: Any, *args: Any, **kwargs: Any) -> Any:
    d = _displacement(p, params)
    orders = derivatives(lambda q: f(q, *args, **kwargs), params, d, degree)
    total = orders[0]
    for k in range(1, degree + 1):
      scale = 1. / math.factorial(k)
      total = _add(total, jax.tree.map(lambda a, s=scale: a * s, orders[k]))
    return total

  return f_tayl
