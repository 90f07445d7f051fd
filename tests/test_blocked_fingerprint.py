"""The resume fingerprint covers every value the model closes over (issue 17, class 1).

``ntk_blocked(f, ..., out=path)`` records a fingerprint of the request; a rerun
with a different request is refused (``model: recorded ..., now ...``). The
model's part is its jaxpr *and* every constant in it: a Haiku ``state`` closed over
by ``lambda p, x: apply(p, state, x)[0]``, a scale array captured by a closure, at
the top level or inside ``jit``, ``scan``, ``cond``, ``while_loop`` and
``custom_jvp`` bodies, a JAX scalar, a PRNG key. Changing such a value and
rerunning with the same ``out=`` must be refused, never resumed from the other
model's blocks; the same values (even as new objects) must resume.

The fingerprint costs no trace of its own: ``ntk_blocked`` and ``ntk_trace``
trace ``f`` once for the output shape and the fingerprint together.
"""

from __future__ import annotations

import os
import pathlib

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import blocked_worker as worker
import ntklayers

N, B = 6, 4
F, P, X, _ = worker.problem(N)


def snapshot(path) -> dict[str, bytes]:
  names = [str(path), f"{path}.ntk.json", f"{path}.ntk.p0.log"]
  return {n: pathlib.Path(n).read_bytes() for n in names if os.path.exists(n)}


def refused(f, path, params=P) -> None:
  """``f`` on an ``out`` written by another model: refused, naming only ``model``;
  nothing is written."""
  before = snapshot(path)
  with pytest.raises(ValueError, match=r"model: recorded '[0-9a-f]+', now '[0-9a-f]+'") as e:
    ntklayers.ntk_blocked(f, params, X, block_size=B, out=path, progress=False)
  for field in ("params", "inputs", "options", "model_kwargs", "block_size"):
    assert f"{field}: recorded" not in str(e.value)
  assert snapshot(path) == before


def resumed(f, path, params=P) -> None:
  k = ntklayers.ntk_blocked(f, params, X, block_size=B, out=path, progress=False)
  np.testing.assert_allclose(k, ntklayers.ntk(f, params, X), rtol=1e-10, atol=0)


# ------------------------------------------------------------- closures ---


def _counter(x):
  """``blocked_worker``'s MLP times a Haiku state ``s [1, 3]``."""
  s = hk.get_state("s", [1, 3], x.dtype, init=jnp.ones)
  return worker._mlp(x) * s  # pylint: disable=protected-access


STATEFUL = hk.without_apply_rng(hk.transform_with_state(_counter))


def test_haiku_state_closed_over(tmp_path):
  params, state = STATEFUL.init(jax.random.key(0), X)
  params = jax.tree.map(np.asarray, params)
  path = tmp_path / "k.npy"
  resumed(lambda p, x: STATEFUL.apply(p, state, x)[0], path, params)
  same = jax.tree.map(lambda a: np.array(a, copy=True), state)  # equal values, new arrays
  resumed(lambda p, x: STATEFUL.apply(p, same, x)[0], path, params)
  other = jax.tree.map(lambda a: a * 2.0, state)
  refused(lambda p, x: STATEFUL.apply(p, other, x)[0], path, params)


def _wrap(where: str, c):
  """``F`` followed by an op that reads the closed-over ``c [1, 3]`` in ``where``."""
  def op(h):
    if where == "top":
      return h * c
    if where == "jit":
      return jax.jit(lambda z: z * c)(h)
    if where == "scan":
      return jax.lax.scan(lambda s, _: (s * c, None), h, None, length=2)[0]
    if where == "cond":
      return jax.lax.cond(True, lambda z: z * c, lambda z: z + c, h)
    if where == "while":
      scale = jax.lax.while_loop(lambda s: s[0] < 2, lambda s: (s[0] + 1, s[1] * c),
                                 (0, jnp.ones_like(c)))[1]  # not differentiated
      return h * scale
    if where == "custom_jvp":
      @jax.custom_jvp
      def g(z):
        return z * c
      g.defjvp(lambda primals, tangents: (g(primals[0]), tangents[0] * c))
      return g(h)
    if where == "jax_scalar":
      return h * c[0, 0]
    raise ValueError(where)
  return lambda p, x: op(F(p, x))


@pytest.mark.parametrize("where", ["top", "jit", "scan", "cond", "while", "custom_jvp",
                                   "jax_scalar"])
def test_closed_over_array(tmp_path, where):
  path = tmp_path / "k.npy"
  resumed(_wrap(where, jnp.asarray([[2.0, 1.0, 0.5]])), path)
  resumed(_wrap(where, jnp.asarray([[2.0, 1.0, 0.5]])), path)  # the same values, anew
  refused(_wrap(where, jnp.asarray([[3.0, 1.0, 0.5]])), path)


def test_closed_over_numpy_array_and_scalar(tmp_path):
  for k, (old, new) in enumerate([(np.asarray([[2.0, 1.0, 0.5]]),
                                   np.asarray([[2.0, 1.0, 0.25]])),
                                  (np.float64(2.0), np.float64(2.5))]):
    path = tmp_path / f"k{k}.npy"
    resumed(lambda p, x, c=old: F(p, x) * c, path)
    refused(lambda p, x, c=new: F(p, x) * c, path)


def test_closed_over_prng_key(tmp_path):
  def model(key):
    return lambda p, x: F(p, x) * jax.random.uniform(key, (1, 3), jnp.float64)
  path = tmp_path / "k.npy"
  resumed(model(jax.random.key(1)), path)
  refused(model(jax.random.key(2)), path)


# ---------------------------------------------------------------- traces ---


def _counting():
  """A fresh model (no cache hits) and its trace count."""
  calls = [0]

  def f(p, x):
    calls[0] += 1
    return F(p, x) * 1.0
  return f, calls


def test_fingerprint_costs_no_trace(tmp_path):
  """With ``out=`` ``f`` is traced as often as without; ``ntk_trace`` as often as
  ``ntk_blocked`` with every axis diagonal (one trace gives the output shape and
  the fingerprint)."""
  counts = {}
  for name in ("memory", "out", "diagonal", "trace"):
    f, calls = _counting()
    if name == "memory":
      ntklayers.ntk_blocked(f, P, X, block_size=B)
    elif name == "out":
      ntklayers.ntk_blocked(f, P, X, block_size=B, out=tmp_path / "k.npy")
    elif name == "diagonal":
      ntklayers.ntk_blocked(f, P, X, block_size=B, diagonal_axes=(0, 1))
    else:
      ntklayers.ntk_trace(f, P, X, block_size=B)
    counts[name] = calls[0]
  assert counts["out"] == counts["memory"], counts
  assert counts["trace"] == counts["diagonal"], counts


def test_refused_before_compiling(tmp_path):
  """A different model is refused from the sidecar, before any block program is
  compiled (the model is traced once, for its shape and fingerprint)."""
  path = tmp_path / "k.npy"
  resumed(_wrap("top", np.asarray([[2.0, 1.0, 0.5]])), path)
  f, calls = _counting()
  with pytest.raises(ValueError, match="model: recorded"):
    ntklayers.ntk_blocked(f, P, X, block_size=B, out=path)
  assert calls[0] == 1
