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
  independently (tiles do not see each other) and does not depend on the batch
  size. This is decided from the program, never from values, so that a call
  under ``jax.jit`` decides as the eager one: the static proof of ``_rowproof``
  on the JVP of ``f`` traced on the batch and on a tile, or the user's
  ``independent_samples=True``; otherwise ``InteractingExamplesError``.
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
from ntklayers._large._independence import (InteractingExamplesError, coupled_layers,
                                            why_not_tileable)

MatVec = Callable[[jax.Array], jax.Array]


def _check_block_size(block_size: Any) -> int | None:
  if block_size is None:
    return None
  if (isinstance(block_size, (bool, np.bool_))
      or not isinstance(block_size, (int, np.integer)) or block_size < 1):
    raise ValueError(f"`block_size` must be a positive int or None, got {block_size!r}.")
  return int(block_size)


def _check_independent_samples(value: Any) -> bool | None:
  if value is not None and not isinstance(value, (bool, np.bool_)):
    raise TypeError(f"`independent_samples` must be None, True or False, got {value!r}.")
  return None if value is None else bool(value)


def _check_vector(v: Any, dim: int, dtype: Any) -> jax.Array:
  v = jnp.asarray(v)
  if v.shape != (dim,):
    raise ValueError(f"`v` must have shape [{dim}] (the flattened outputs [N·O]), got "
                     f"shape {list(v.shape)}.")
  if not jnp.issubdtype(v.dtype, jnp.number) or (
      jnp.issubdtype(v.dtype, jnp.complexfloating)
      and not jnp.issubdtype(dtype, jnp.complexfloating)):
    raise TypeError(f"`v` must be a real vector like the outputs ({dtype}), got dtype "
                    f"{v.dtype}.")
  return v.astype(dtype)


def ntk_matvec(f: Callable[..., jax.Array], params: Any, x: Any, *,
               block_size: int | None = None, trainable: Any = None,
               model_kwargs: Mapping[str, Any] | None = None,
               independent_samples: bool | None = None,
               ) -> tuple[MatVec, int, Any]:
  """``(matvec, dim, dtype)`` with ``matvec(v) = J (Jᵀ v)`` on flattened outputs.

  ``J [N·O, P]`` is the Jacobian of ``f(params, x, **model_kwargs).ravel()``
  (row ``n·O + o``) with respect to the leaves of ``params`` selected by
  ``trainable``; frozen leaves are closed over (zero tangents). ``matvec`` is
  jittable, e.g. inside the ``lax.fori_loop`` of :func:`lanczos_lambda_max`.

  Args:
    f: ``f(params, x, **model_kwargs) -> [N, ...]`` (``O`` = product of the
      trailing axes); a jitted ``f`` is unwrapped.
    params: parameters (a pytree).
    x: batch, a pytree of arrays ``[N, ...]``.
    block_size: ``None`` linearizes the whole batch once (``O(N)`` activations
      kept alive; exact even when examples interact). An int ``b`` computes the
      products tile by tile over ``ceil(N / b)`` tiles of ``b`` examples: peak
      memory ``O(b)`` activations plus ``O(N·O)``, at the cost of re-running the
      forward pass on every product. Tiles are exact only when examples do not
      interact, which is proven from the program (the same decision eagerly and
      under ``jax.jit``): row ``n`` of ``f`` and of its Jacobian must depend on
      example ``n`` only, and ``f`` on a tile must be ``f`` on the batch but for
      the batch size. Otherwise ``InteractingExamplesError``.
    trainable: optax-style mask like ``ntk_fn``'s (pytree of bools, a prefix of
      ``params``, or a callable returning one).
    model_kwargs: keyword arguments of ``f`` (default none), passed unchanged to
      every call (they are not tiled).
    independent_samples: ``None`` proves (statically) that tiles are exact;
      ``True`` promises it and skips the proof, for models it cannot see through
      (e.g. a permutation of the batch that is undone); ``False``
      declares that examples interact, so ``block_size`` is refused.

  Returns:
    ``matvec`` (``v [N·O] -> [N·O]``), ``dim = N·O`` and the output dtype.

  Raises:
    ValueError: bad ``block_size``, no trainable leaf, an empty batch, an output
      without the batch axis or whose shape depends on the batch size (with
      ``block_size``), or (from ``matvec``) ``v`` not of shape ``[dim]``.
    InteractingExamplesError: ``block_size`` for examples not proven independent.

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
  return make_matvec(f, params, x, block_size=block_size, trainable=trainable,
                     model_kwargs=model_kwargs, independent_samples=independent_samples,
                     caller="ntk_matvec")


def make_matvec(f: Callable[..., jax.Array], params: Any, x: Any, *, block_size: Any,
                trainable: Any, model_kwargs: Any, independent_samples: Any,
                caller: str) -> tuple[MatVec, int, Any]:
  """:func:`ntk_matvec` for ``caller`` (named in its errors)."""
  f = _core.check_f(f)
  block_size = _check_block_size(block_size)
  independent_samples = _check_independent_samples(independent_samples)
  if model_kwargs is None:
    model_kwargs = {}
  elif not isinstance(model_kwargs, Mapping):
    raise TypeError(f"`model_kwargs` must be a dict or None, got "
                    f"{type(model_kwargs).__name__}.")
  _core.check_params(params)
  n = _core.check_batch(x, "x")
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

  try:
    out = jax.eval_shape(f_train, train, x)
  except Exception as e:  # pylint: disable=broad-except
    _core.note_failure(e, params, x)
    if model_kwargs and hasattr(e, "add_note"):  # Python >= 3.11
      e.add_note(f"`model_kwargs` passed to f: {sorted(model_kwargs)}.")
    raise
  if not isinstance(out, jax.ShapeDtypeStruct) or out.ndim < 1:
    raise ValueError(f"`f(params, x)` must return one array [N, ...], got "
                     f"{jax.tree.map(lambda s: list(s.shape), out)}.")
  if not _core.is_inexact(out.dtype):
    raise TypeError(f"The output of `f` must be floating to be differentiated, got "
                    f"dtype {out.dtype} (shape {list(out.shape)}).")
  if block_size is None:
    return _linearized(f_train, train, x)
  blocked = _blocked(f_train, train, x, out, block_size)  # checks shapes first
  if independent_samples is not True and block_size < n:  # else one tile: exact
    _check_independent(f_train, train, params, x, block_size, caller, independent_samples)
  return blocked


def _check_independent(f_train: Callable, train: list, params: Any, x: Any, b: int,
                       caller: str, independent_samples: bool | None) -> None:
  """Refuses tiles unless examples are proven independent from the program (the
  shared guard ``why_not_tileable``: the same answer eagerly and under jit)."""
  if independent_samples is False:
    why = "independent_samples=False declares that the examples interact"
  else:
    proof = why_not_tileable(f_train, train, x, b)
    if proof is None:
      return
    tile = jax.tree.map(lambda a: a[:b], x)
    why = coupled_layers(f_train, train, tile) or f"not proven: {proof}"
  raise InteractingExamplesError(
      f"{caller} with `block_size`={b}: the examples of `f` may interact ({why}), so "
      f"the batch cannot be cut into tiles: per-tile products would not be the NTK's. "
      f"Use block_size=None (exact for interacting examples), or, if row n of "
      f"f(params, x) depends on example n only and not on the batch size, pass "
      f"independent_samples=True to skip the proof.")


def _linearized(f_train: Callable[..., jax.Array], train: list[jax.Array],
                x: Any) -> tuple[MatVec, int, Any]:
  """One linearization of the whole batch; each product is two linear passes."""
  out, f_jvp = jax.linearize(lambda p: f_train(p, x), train)
  f_vjp = jax.linear_transpose(f_jvp, train)
  dim = out.size

  def matvec(v: jax.Array) -> jax.Array:
    v = _check_vector(v, dim, out.dtype)
    (g,) = f_vjp(v.reshape(out.shape))
    return f_jvp(g).ravel()

  return matvec, dim, out.dtype


def _blocked(f_train: Callable[..., jax.Array], train: list[jax.Array], x: Any,
             out: jax.ShapeDtypeStruct, block_size: int) -> tuple[MatVec, int, Any]:
  """Products summed (``Jᵀ v``) and mapped (``J u``) over tiles of examples."""
  n = _core.batch_size(x)
  b = min(block_size, n)
  num_tiles = -(-n // b)
  _core.check_output(out, n, x)
  rest, dtype = out.shape[1:], out.dtype
  dim = n * int(np.prod(rest, dtype=np.int64))

  def tile(i: jax.Array) -> Any:
    """Examples ``i·b, ..., i·b + b - 1`` of ``x``; past ``N``, the last one again."""
    idx = i * b + jnp.arange(b, dtype=jnp.int32)
    return jax.tree.map(lambda a: jnp.take(a, idx, axis=0, mode="clip"), x)

  shapes = jax.tree.map(lambda a: list(jnp.shape(a)), x)
  try:
    tile_out = jax.eval_shape(lambda p: f_train(p, tile(jnp.zeros((), jnp.int32))), train)
  except Exception as e:  # pylint: disable=broad-except
    raise ValueError(
        f"With `block_size`={block_size}, `f` must accept a tile of {b} examples (it "
        f"accepts the batch `x` of {n}: {shapes}), but calling it on a tile failed: "
        f"{type(e).__name__}: {e}") from e
  if getattr(tile_out, "shape", None) != (b, *rest):
    raise ValueError(
        f"With `block_size`, `f` must map a tile of {b} examples to outputs "
        f"{[b, *rest]} (it maps the batch of {n} to {list(out.shape)}), got "
        f"{jax.tree.map(lambda s: list(s.shape), tile_out)}: its output shape depends "
        f"on the batch size. Use block_size=None.")

  def matvec(v: jax.Array) -> jax.Array:
    ct = _check_vector(v, dim, dtype).reshape(n, *rest)
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
