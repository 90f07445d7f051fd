"""neural-tangents' conventions for the arguments of empirical kernel functions.

* ``apply_fn_kwargs`` are split into the kwargs of ``f(params, x1)`` and of
  ``f(params, x2)`` (neural-tangents' ``utils.split_kwargs``): a 2-tuple is
  ``(kwargs1, kwargs2)``; ``rng`` becomes two keys, the same when ``x2`` is
  ``None`` or equal to ``x1``, else ``fold_in(rng, 1)`` for ``x2`` (a 2-tuple of
  keys is taken as given, but for the same rule); anything else goes to both.
* ``vmap_axes`` (``None``, an axis, or ``(in_axes, out_axes, kwargs_axes)``):
  ntklayers proves or checks that examples are independent itself, so the
  promise is not needed; ``in_axes``/``out_axes`` must be the leading axis (or
  ``None``), and the kwargs named in ``kwargs_axes`` are batched with ``x``
  (each example gets its slice).
* ``implementation``: :class:`NtkImplementation` or its int value.
"""

from __future__ import annotations

import enum
import warnings
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp


class NtkImplementation(enum.IntEnum):
  """neural-tangents' NTK implementations, mapped to ntklayers' (all exact).

  Attributes:
    AUTO: (``0``) ``implementation="auto"``: structured layers (drop-ins and
      recognized layers) contracted from factors, the cheaper exact fallback
      elsewhere.
    JACOBIAN_CONTRACTION: (``1``, neural-tangents' default) ``"jacobian"``:
      per-example Jacobians contracted (whole-batch Jacobians when examples
      interact).
    NTK_VECTOR_PRODUCTS: (``2``) ``"ntk_vp"``: NTK-vector products, no Jacobian
      formed.
    STRUCTURED_DERIVATIVES: (``3``) ``"structured"``: structured layers from
      factors, Jacobians for the rest.

  Example:
    >>> import ntklayers.compat.neural_tangents as nt
    >>> nt.NtkImplementation.STRUCTURED_DERIVATIVES == 3
    True
  """

  AUTO = 0
  JACOBIAN_CONTRACTION = 1
  NTK_VECTOR_PRODUCTS = 2
  STRUCTURED_DERIVATIVES = 3


DEFAULT_NTK_IMPLEMENTATION = NtkImplementation.JACOBIAN_CONTRACTION

IMPLEMENTATIONS = {
    NtkImplementation.AUTO: "auto",
    NtkImplementation.JACOBIAN_CONTRACTION: "jacobian",
    NtkImplementation.NTK_VECTOR_PRODUCTS: "ntk_vp",
    NtkImplementation.STRUCTURED_DERIVATIVES: "structured",
}


def implementation(value: Any) -> str:
  """ntklayers' ``implementation`` of neural-tangents' ``value`` (also accepts
  ntklayers' own names)."""
  if isinstance(value, str) and value in IMPLEMENTATIONS.values():
    return value
  if isinstance(value, int) and not isinstance(value, bool) and value in range(4):
    return IMPLEMENTATIONS[NtkImplementation(value)]
  raise ValueError(
      f"`implementation` must be an NtkImplementation (or 0, 1, 2, 3), got {value!r}.")


def check_debug_flags(j_rules: Any, s_rules: Any, fwd: Any) -> None:
  """``_j_rules``, ``_s_rules``, ``_fwd``: neural-tangents' structured-derivatives
  internals. They do not change values; accepted (type-checked) and unused."""
  for name, v, ok in (("_j_rules", j_rules, isinstance(j_rules, bool)),
                      ("_s_rules", s_rules, isinstance(s_rules, bool)),
                      ("_fwd", fwd, fwd is None or isinstance(fwd, bool))):
    if not ok:
      raise TypeError(f"`{name}` must be a bool{' or None' if name == '_fwd' else ''}, "
                      f"got {v!r}.")


def batched_kwargs(vmap_axes: Any) -> dict[str, Any]:
  """``kwargs_axes`` of ``vmap_axes``: the kwargs batched with ``x`` (name -> axis).

  Raises:
    NotImplementedError: a batch axis of ``x`` or of the output other than 0.
    TypeError: ``vmap_axes`` is not ``None``, an int or a triple.
  """
  if vmap_axes is None:
    return {}
  if isinstance(vmap_axes, int) and not isinstance(vmap_axes, bool):
    kwargs_axes: dict[str, Any] = {}
    in_axes, out_axes = vmap_axes, vmap_axes
  elif isinstance(vmap_axes, tuple) and len(vmap_axes) == 3:
    in_axes, out_axes, kwargs_axes = vmap_axes
  else:
    raise TypeError(f"`vmap_axes` must be None, an int or a triple (in_axes, out_axes, "
                    f"kwargs_axes), got {vmap_axes!r}.")
  for name, axes in (("in_axes", in_axes), ("out_axes", out_axes)):
    bad = [a for a in jax.tree.leaves(axes) if a != 0]
    if bad:
      raise NotImplementedError(
          f"`vmap_axes`: {name}={axes!r}; ntklayers needs the batch on axis 0 of every "
          f"input and output (examples are proven or checked independent whatever "
          f"`vmap_axes` says). Move the batch axis to the front.")
  if kwargs_axes is None:
    return {}
  if not isinstance(kwargs_axes, Mapping):
    raise TypeError(f"`vmap_axes`: kwargs_axes must be a dict, got {kwargs_axes!r}.")
  return {k: a for k, a in kwargs_axes.items() if a is not None}


def _is_key(x: Any) -> bool:
  return hasattr(x, "dtype") and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)


def x1_is_x2(x1: Any, x2: Any) -> Any:
  """neural-tangents' test: ``True``, ``False`` or a traced bool (values within 1e-12)."""
  if x2 is None or x1 is x2:
    return True
  l1, l2 = jax.tree.leaves(x1), jax.tree.leaves(x2)
  if str(jax.tree.structure(x1)) != str(jax.tree.structure(x2)) or any(
      jnp.shape(a) != jnp.shape(b) for a, b in zip(l1, l2)):
    return False
  same = jnp.asarray(True)
  for a, b in zip(l1, l2):
    if _is_key(a):
      same &= jnp.all(jax.random.key_data(a) == jax.random.key_data(b))
    else:
      same &= jnp.all(jnp.abs(jnp.asarray(a) - jnp.asarray(b)) < 1e-12)
  return same


def _select(cond: Any, a: Any, b: Any) -> Any:
  if isinstance(cond, bool):
    return a if cond else b
  try:
    if bool(cond):
      return a
    return b
  except jax.errors.ConcretizationTypeError:
    return jnp.where(cond, a, b)


def read_keys(key: Any, x1: Any, x2: Any) -> tuple[Any, Any]:
  """neural-tangents' two ``rng`` keys: equal exactly when ``x1`` equals ``x2``."""
  if key is None or x2 is None:
    return key, key
  if isinstance(key, tuple) and len(key) == 2:
    key1, key2 = key
    warnings.warn("The value of `key[1]` might be replaced by a new value if "
                  "key[0] == key[1] and x1 != x2 or key[0] != key[1] and x1 == x2.",
                  UserWarning, stacklevel=5)
    key2 = _select(x1_is_x2(key1, key2), jax.random.fold_in(key2, 1), key2)
    return key1, _select(x1_is_x2(x1, x2), key1, key2)
  if hasattr(key, "dtype"):
    return key, _select(x1_is_x2(x1, x2), key, jax.random.fold_in(key, 1))
  raise TypeError(f"`rng` must be a PRNG key or a pair of keys, got {type(key).__name__}.")


def split_kwargs(kwargs: Mapping[str, Any], x1: Any, x2: Any) -> tuple[dict, dict]:
  """``(kwargs1, kwargs2)`` by neural-tangents' rules (module docstring)."""
  kw1, kw2 = {}, {}
  for k, v in kwargs.items():
    if x2 is not None and k == "rng":
      kw1[k], kw2[k] = read_keys(v, x1, x2)
    elif isinstance(v, tuple) and len(v) == 2:
      kw1[k], kw2[k] = v
    else:
      kw1[k] = kw2[k] = v
  return kw1, kw2


def same_kwargs(kw1: Mapping[str, Any], kw2: Mapping[str, Any]) -> bool:
  """Whether both sides call ``f`` with the same kwargs (the same objects, or equal
  non-array values)."""
  if kw1.keys() != kw2.keys():
    return False
  for k in kw1:
    a, b = kw1[k], kw2[k]
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    if str(jax.tree.structure(a)) != str(jax.tree.structure(b)) or len(la) != len(lb):
      return False
    for u, v in zip(la, lb):
      if u is v:
        continue
      if hasattr(u, "shape") or hasattr(v, "shape"):
        return False
      try:
        if u != v:
          return False
      except Exception:  # pylint: disable=broad-except  (incomparable: not the same)
        return False
  return True
