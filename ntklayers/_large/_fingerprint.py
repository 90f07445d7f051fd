"""The fingerprint of a blocked-kernel request, recorded beside an ``out=`` file.

A resumed run reuses the blocks of an earlier one only if every value that
determines them is the same. The fingerprint has one field per part of the
request, so that a refusal can say what differs:

- ``params``, ``inputs``, ``model_kwargs``: SHA-256 of the pytrees (structure,
  shapes, dtypes and every value);
- ``options``: the normalized axes, the implementation, ``independent_samples``,
  the precision and the resolved ``trainable`` mask;
- ``model``: the model's program, the jaxpr of ``f`` traced on the batch, *and
  every value it closes over*: the jaxpr's constants, those of the closed jaxprs
  nested in its equations (``jit``, ``scan``, ``cond``, ``while``, ``custom_jvp``
  and ``custom_vjp`` bodies...) and its literals, hashed by value. A Haiku
  ``state`` or a scale array captured by a ``lambda`` is such a constant: a
  different value is a different model.

Not covered (they are not values of the program): Python-level side effects of
``f``, randomness drawn outside JAX (NumPy's global generator at trace time is a
constant of the jaxpr and *is* covered; a generator consulted between runs is
not re-run), files ``f`` reads, and the code of ``custom_jvp``/``custom_vjp``
rules (their primal programs are covered).
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterator
from typing import Any

import jax
import jax.extend as jex
import numpy as np


def _leaf_bytes(leaf: Any) -> bytes:
  if hasattr(leaf, "dtype") and jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
    leaf = jax.random.key_data(leaf)
  a = np.asarray(leaf)
  return f"{a.dtype.str}{a.shape}".encode() + np.ascontiguousarray(a).tobytes()


def digest(*trees: Any) -> str:
  """A SHA-256 digest of pytrees: their structure, shapes, dtypes and values."""
  h = hashlib.sha256()
  for tree in trees:
    leaves, treedef = jax.tree.flatten(tree)
    h.update(str(treedef).encode())
    for leaf in leaves:
      h.update(_leaf_bytes(leaf) if hasattr(leaf, "shape") else repr(leaf).encode())
  return h.hexdigest()[:32]


def _values(obj: Any, seen: set[int]) -> Iterator[Any]:
  """Every constant, literal and array parameter of a (closed) jaxpr, nested
  jaxprs included, in a deterministic order."""
  if isinstance(obj, jex.core.ClosedJaxpr):
    if id(obj) in seen:
      return
    seen.add(id(obj))
    yield from obj.consts
    yield from _values(obj.jaxpr, seen)
  elif isinstance(obj, jex.core.Jaxpr):
    if id(obj) in seen:
      return
    seen.add(id(obj))
    for eqn in obj.eqns:
      for v in eqn.invars:
        if isinstance(v, jex.core.Literal):
          yield v.val
      for name in sorted(eqn.params):
        yield from _values(eqn.params[name], seen)
  elif isinstance(obj, (tuple, list)):
    for item in obj:
      yield from _values(item, seen)
  elif isinstance(obj, dict):
    for key in sorted(obj, key=repr):
      yield from _values(obj[key], seen)
  elif isinstance(obj, (np.ndarray, np.generic, jax.Array)):
    yield obj


def program_digest(closed: Any) -> str:
  """A SHA-256 digest of a ``ClosedJaxpr``: its text and every value it holds
  (constants of it and of nested closed jaxprs, literals, array parameters)."""
  text = re.sub(r" at 0x[0-9a-fA-F]+", "", str(closed))  # no process-specific addresses
  h = hashlib.sha256(text.encode())
  for value in _values(closed, set()):
    h.update(b"|")
    h.update(_leaf_bytes(value) if hasattr(value, "shape") else repr(value).encode())
  return h.hexdigest()[:32]
