"""NTK-vector products ``v ↦ J (Jᵀ v)`` for matrix-free eigensolvers.

``J`` is the Jacobian of the flattened outputs ``[N·O]`` of a model on a batch
(row ``n·O + o``) with respect to its trainable parameters, so ``J Jᵀ`` is the
flattened ``[N·O, N·O]`` NTK, applied without forming it.

Two schedules:

* ``block_size=None``: the whole batch is linearized once (``jax.linearize``);
  each product is one transposed and one forward linear pass. Exact even when
  examples interact (batch statistics); memory ``O(N)`` activations, held for
  the lifetime of ``matvec``.
* ``block_size=b``: the batch is cut into ``T = ceil(N / b)`` tiles of ``b``
  examples (the last one padded by repeating its last example, with zero
  cotangent, and its padded outputs dropped). ``Jᵀ v`` is the sum of per-tile
  VJPs accumulated by ``lax.scan``, then ``J (Jᵀ v)`` is computed tile by tile
  by ``lax.map`` of per-tile JVPs. Peak memory is ``O(b)`` activations plus
  ``O(N·O)`` for the vectors and one parameter-shaped gradient; each product
  re-runs the forward pass twice per tile. Exact when ``f`` treats examples
  independently (tiles do not see each other), which is checked.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ntklayers import _core
from ntklayers._core import resolve_trainable

MatVec = Callable[[jax.Array], jax.Array]


def _check_block_size(block_size: Any) -> int | None:
  if block_size is None:
    return None
  if (isinstance(block_size, (bool, np.bool_))
      or not isinstance(block_size, (int, np.integer)) or block_size < 1):
    raise ValueError(f"`block_size` must be a positive int or None, got {block_size!r}.")
  return int(block_size)


def _check_vector(v: jax.Array, dim: int) -> None:
  if jnp.shape(v) != (dim,):
    raise ValueError(f"`v` must have shape [{dim}] (the flattened outputs [N·O]), got "
                     f"shape {list(jnp.shape(v))}.")


def ntk_matvec(f: Callable[..., jax.Array], params: Any, x: Any, *,
               block_size: int | None = None, trainable: Any = None,
               model_kwargs: Mapping[str, Any] | None = None,
               ) -> tuple[MatVec, int, Any]:
  """``(matvec, dim, dtype)`` with ``matvec(v) = J (Jᵀ v)`` on flattened outputs.

  ``J [N·O, P]`` is the Jacobian of ``f(params, x, **model_kwargs).ravel()``
  (row ``n·O + o``) with respect to the leaves of ``params`` selected by
  ``trainable``; frozen leaves are closed over (zero tangents). ``matvec`` is
  jittable, e.g. inside the ``lax.fori_loop`` of :func:`lanczos_lambda_max`.

  Args:
    f: ``f(params, x, **model_kwargs) -> [N, ...]`` (``O`` = product of the
      trailing axes).
    params: parameters (a pytree).
    x: batch, a pytree of arrays ``[N, ...]``.
    block_size: ``None`` linearizes the whole batch once (``O(N)`` activations
      kept alive; exact even when examples interact). An int ``b`` computes the
      products tile by tile over ``ceil(N / b)`` tiles of ``b`` examples: peak
      memory ``O(b)`` activations plus ``O(N·O)``, at the cost of re-running the
      forward pass on every product. Examples must not interact: layers declared
      coupled (BatchNorm with batch statistics), or outputs that change with how
      the batch is cut (checked once on two tilings when the values are
      concrete), raise ``InteractingExamplesError``.
    trainable: optax-style mask like ``ntk_fn``'s (pytree of bools, a prefix of
      ``params``, or a callable returning one).
    model_kwargs: keyword arguments of ``f`` (default none), passed unchanged to
      every call (they are not tiled).

  Returns:
    ``matvec`` (``v [N·O] -> [N·O]``), ``dim = N·O`` and the output dtype.

  Raises:
    ValueError: bad ``block_size``, no trainable leaf, an output without the
      batch axis, or (from ``matvec``) ``v`` not of shape ``[dim]``.

  Example:
    >>> import haiku as hk, jax, jax.numpy as jnp, ntklayers, ntklayers.metrics as nm
    >>> net = hk.without_apply_rng(hk.transform(lambda x: ntklayers.Linear(2)(x)))
    >>> x = jnp.arange(15.).reshape(5, 3) / 10
    >>> params = net.init(jax.random.key(0), x)
    >>> matvec, dim, dtype = nm.ntk_matvec(net.apply, params, x, block_size=2)
    >>> dim
    10
    >>> K = nm.flatten(ntklayers.ntk_fn(net.apply)(params, x))  # [10, 10]
    >>> v = jnp.linspace(-1., 1., dim)
    >>> bool(jnp.allclose(jax.jit(matvec)(v), K @ v))
    True
  """
  block_size = _check_block_size(block_size)
  if model_kwargs is None:
    model_kwargs = {}
  elif not isinstance(model_kwargs, Mapping):
    raise TypeError(f"`model_kwargs` must be a dict or None, got "
                    f"{type(model_kwargs).__name__}.")
  leaves, treedef = jax.tree.flatten(params)
  mask = resolve_trainable(trainable, params)
  if not any(mask):
    raise ValueError("No trainable parameters: every leaf of `params` is masked out "
                     "by `trainable`.")
  train = [leaf for leaf, m in zip(leaves, mask) if m]

  def f_train(train_leaves: list[jax.Array], xs: Any) -> jax.Array:
    it = iter(train_leaves)
    merged = [next(it) if m else leaf for leaf, m in zip(leaves, mask)]
    return f(jax.tree.unflatten(treedef, merged), xs, **model_kwargs)

  if block_size is None:
    return _linearized(f_train, train, x)
  blocked = _blocked(f_train, train, x, block_size)  # checks shapes first
  _check_independent(lambda p, z: f(p, z, **model_kwargs), params, x, block_size)
  return blocked


def _check_independent(f: Callable[..., jax.Array], params: Any, x: Any, b: int) -> None:
  """Refuses tiles when the model's examples interact: layers declared coupled
  (BatchNorm with batch statistics) or, with concrete values, outputs that change
  with how the batch is cut (two tilings, offset by half a tile, must agree)."""
  from ntklayers._large._exec import InteractingExamplesError  # pylint: disable=g-import-not-at-top
  n = _core.check_batch(x, "x")
  b = min(b, n)
  if b == n:
    return
  why = None
  if _core.discover(f, params, jax.tree.map(lambda a: a[:b], x), _core.interceptors()).coupled:
    why = "a layer declares its examples coupled (e.g. BatchNorm with batch statistics)"
  elif not any(_core.is_tracer(a) for a in jax.tree.leaves((params, x))):
    from ntklayers._large._independence import check_tiling  # pylint: disable=g-import-not-at-top
    if not check_tiling(f, params, x, b):
      why = "the model's parameter Jacobian changes with how the batch is cut into tiles"
  if why is not None:
    raise InteractingExamplesError(
        f"ntk_matvec with `block_size`={b}: {why}, so per-tile products would not be "
        f"the NTK's. Use block_size=None (exact for interacting examples).")


def _linearized(f_train: Callable[..., jax.Array], train: list[jax.Array],
                x: Any) -> tuple[MatVec, int, Any]:
  """One linearization of the whole batch; each product is two linear passes."""
  out, f_jvp = jax.linearize(lambda p: f_train(p, x), train)
  if not isinstance(out, jax.Array) or out.ndim < 1:
    raise ValueError(f"`f(params, x)` must return one array [N, ...], got "
                     f"{jax.tree.map(jnp.shape, out)}.")
  f_vjp = jax.linear_transpose(f_jvp, train)
  dim = out.size

  def matvec(v: jax.Array) -> jax.Array:
    _check_vector(v, dim)
    (g,) = f_vjp(v.reshape(out.shape).astype(out.dtype))
    return f_jvp(g).ravel()

  return matvec, dim, out.dtype


def _blocked(f_train: Callable[..., jax.Array], train: list[jax.Array], x: Any,
             block_size: int) -> tuple[MatVec, int, Any]:
  """Products summed (``Jᵀ v``) and mapped (``J u``) over tiles of examples."""
  n = _core.check_batch(x, "x")
  b = min(block_size, n)
  num_tiles = -(-n // b)
  out = jax.eval_shape(f_train, train, x)
  _core.check_output(out, n, x)
  rest, dtype = out.shape[1:], out.dtype
  dim = n * int(np.prod(rest, dtype=np.int64))

  def tile(i: jax.Array) -> Any:
    """Examples ``i·b, ..., i·b + b - 1`` of ``x``; past ``N``, the last one again."""
    idx = i * b + jnp.arange(b, dtype=jnp.int32)
    return jax.tree.map(lambda a: jnp.take(a, idx, axis=0, mode="clip"), x)

  tile_out = jax.eval_shape(lambda p: f_train(p, tile(jnp.zeros((), jnp.int32))), train)
  if getattr(tile_out, "shape", None) != (b, *rest):
    raise ValueError(
        f"With `block_size`, `f` must map a tile of {b} examples to outputs "
        f"{[b, *rest]} (it maps the batch of {n} to {list(out.shape)}), got "
        f"{jax.tree.map(lambda s: list(s.shape), tile_out)}.")

  def matvec(v: jax.Array) -> jax.Array:
    _check_vector(v, dim)
    ct = v.astype(dtype).reshape(n, *rest)
    ct = jnp.pad(ct, [(0, num_tiles * b - n)] + [(0, 0)] * len(rest))  # zero cotangent
    ct = ct.reshape(num_tiles, b, *rest)

    def pull(acc: list[jax.Array], i_ct: tuple[jax.Array, jax.Array]):
      i, c = i_ct
      _, vjp = jax.vjp(lambda p: f_train(p, tile(i)), train)
      (g,) = vjp(c)
      return jax.tree.map(operator.add, acc, g), None

    zeros = jax.tree.map(jnp.zeros_like, train)
    g, _ = jax.lax.scan(pull, zeros, (jnp.arange(num_tiles, dtype=jnp.int32), ct))

    def push(i: jax.Array) -> jax.Array:
      return jax.jvp(lambda p: f_train(p, tile(i)), (train,), (g,))[1]

    u = jax.lax.map(push, jnp.arange(num_tiles, dtype=jnp.int32))  # [T, b, *rest]
    return u.reshape(num_tiles * b, *rest)[:n].ravel()

  return matvec, dim, dtype
