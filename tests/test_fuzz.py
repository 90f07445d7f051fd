"""Differential fuzzing of every implementation against the reference (issue #6).

``hypothesis`` draws a ``Spec`` of a small Haiku model from the grammar of
``fuzz_grammar.py`` (annotated and plain layers of every kind, plain ``jax.numpy``
layers, per-example layers under ``jax.vmap``, weight tying, batch-coupling ops,
JAX transforms inside the model, the batch permuted around a layer, outputs of
rank 1 to 3, ``trace_axes`` / ``diagonal_axes``, ``trainable`` masks,
``layerwise``, ``x2`` of another batch size or none). Every
implementation's kernel must match the whole-batch ``jax.jacrev`` reference of
``reference.py`` in float64 (``rel_err <= 1e-10``); ntklayers' own warnings are
ignored, exceptions fail. Rebuild a failing spec with ``build(spec)`` / ``check(spec)``.

Shrinking is off (each step recompiles; ``NTKLAYERS_FUZZ_SHRINK=1`` turns it on), and
so is hypothesis' example database (nothing is written to the repository).

* ``test_fuzz_examples``: the 5 ``EXAMPLES`` (parts of the grammar a few draws
  may miss), one test each (the default tier samples them, see conftest.py);
* ``test_fuzz_implementations``: 1 drawn example, ``derandomize=True`` (the same
  one on every run).
* ``test_fuzz_implementations_slow`` (``@pytest.mark.slow``): ``SLOW_EXAMPLES``
  examples drawn from ``@seed(SLOW_SEED)``: 60 in CI (about 8 minutes on one
  core); ``NTKLAYERS_FUZZ_EXAMPLES=300`` for a long run (the other fuzzers read it too).
"""

from __future__ import annotations

import os
import warnings

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, Phase, find, given, seed, settings

import models
import ntklayers
from fuzz_grammar import (RANK2_OPS, RANK3_OPS, TOKEN_OPS, Spec, _apply_op, _op, _promotion,
                          build, specs)
from reference import IMPLEMENTATIONS, TOL64, apply_axes, flat_jacobian, full_kernel

SLOW_SEED = 20240606
SLOW_EXAMPLES = int(os.environ.get("NTKLAYERS_FUZZ_EXAMPLES", "60"))


# ------------------------------------------------------------------- check ---


def _error(k, ref) -> str | None:
  """``None`` if ``k`` matches ``ref`` to ``TOL64`` (relative to ``max|ref|``), else why."""
  k = np.asarray(k, np.float64)
  if k.shape != ref.shape:
    return f"shape {k.shape} != reference {ref.shape}"
  err = float(np.max(np.abs(k - ref), initial=0.0))
  scale = float(np.max(np.abs(ref), initial=0.0))
  if scale == 0.0:                     # e.g. a centered batch of one: an all-zero kernel
    return None if err <= 1e-12 else f"reference kernel is 0, max|K| = {err:.3e}"
  return None if err <= TOL64 * scale else f"relative error {err / scale:.3e} > {TOL64:.0e}"


def reference_kernel(spec: Spec, f, params, x1, x2, mask) -> np.ndarray:
  """The reference kernel, each batch differentiated whole, in one compilation
  (``reference.flat_jacobian`` of ``(x1, x2) -> [*f(x1).ravel(), *f(x2).ravel()]``)."""
  xs = (x1,) if x2 is None else (x1, x2)
  shapes = [jax.eval_shape(f, params, x).shape for x in xs]
  jac = flat_jacobian(lambda p, xs: jnp.concatenate([f(p, x).ravel() for x in xs]),
                      params, xs, mask)
  m1 = int(np.prod(shapes[0]))
  j1, j2 = jac[:m1].reshape(*shapes[0], -1), jac[m1:].reshape(*shapes[-1], -1)
  j2 = j1 if x2 is None else j2
  return apply_axes(full_kernel(j1, j2), j1.ndim - 1, spec.trace_axes, spec.diagonal_axes)


def kernels(spec: Spec, f, params, x1, x2, mask, implementations=IMPLEMENTATIONS):
  """``({implementation: kernel}, {implementation: exception})``. Each ``kernel_fn``
  is one jitted function; calling all inside one outer ``jax.jit`` traces the same
  code but compiles one XLA program instead of four (about 2x less compile time,
  which dominates). Exceptions raise while tracing: caught per implementation."""
  trainable = None if mask is None else (lambda p, mask=mask: mask)
  errors = {}

  def all_kernels(p, a, b):
    out = {}
    for impl in implementations:
      try:
        out[impl] = ntklayers.ntk_fn(
            f, trace_axes=spec.trace_axes, diagonal_axes=spec.diagonal_axes,
            implementation=impl, layerwise=spec.layerwise, trainable=trainable)(p, a, b)
      except Exception as e:  # pylint: disable=broad-except  (reported by check)
        errors[impl] = e
    return out

  with warnings.catch_warnings(), _promotion(spec):
    warnings.filterwarnings("ignore", message=models.NTKLAYERS_WARNING)
    out = jax.jit(all_kernels)(params, x1, x2)
  return out, errors


def check(spec: Spec, implementations=IMPLEMENTATIONS) -> None:
  """Every implementation's kernel of ``spec`` against the reference; one assertion
  listing every failing implementation (the first exception chained)."""
  f, params, x1, x2, mask = build(spec)
  ref = reference_kernel(spec, f, params, x1, x2, mask)
  out, errors = kernels(spec, f, params, x1, x2, mask, implementations)
  failures = []
  for impl in implementations:
    k = out.get(impl)
    if impl in errors:
      why = f"{type(errors[impl]).__name__}: {str(errors[impl])[:300]}"
    elif spec.layerwise and not (isinstance(k, dict) and k):
      why = f"layerwise=True returned {k!r}"
    else:
      why = _error(sum(k.values()) if spec.layerwise else k, ref)
    if why:
      failures.append(f"implementation={impl!r}: {why}")
  if failures:
    raise AssertionError("\n".join(failures)) from next(iter(errors.values()), None)


# ------------------------------------------------------------------- tests ---

_PHASES = (Phase.explicit, Phase.reuse, Phase.generate) + (
    (Phase.shrink,) if os.environ.get("NTKLAYERS_FUZZ_SHRINK") == "1" else ())
_SETTINGS = dict(deadline=None, database=None, phases=_PHASES, print_blob=True,
                 suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


# Explicit cases run first: parts of the grammar that 25 derandomized draws may miss.
EXAMPLES = (
    Spec("seq", (("mha", False), ("conv2d", 3, 2, False), ("bias_scale",), ("center",),
                 ("pool",)), ("linear", 2, False), 3, None, (0,), (), ("all",), False),
    Spec("vec", (("tied_decoder", 3), ("batchnorm", True), ("residual",)),
         ("linear", 2, False), 3, 2, (-1,), (), ("freeze_module", 1), True),
    Spec("seq", (("conv1d", 3, 2, True), ("conv2d", 2, 3, True), ("permute", "roll", True),
                 ("layernorm", True, True)), ("hk_linear", 2, False), 2, 4, (1,), (2,),
         ("no_biases",), True),
    Spec("seq", (("stack", 2, True), ("remat",), ("scan_shared",), ("vmap_linear",),
                 ("shared_twice",), ("pool",)), ("linear", 2, False), 3, 2, (), (),
         ("all",), True),
    Spec("tokens", (("jnp_embed",), ("jnp_conv", 3, 2, 2), ("vmap_dense_t", 3, True),
                    ("jnp_norm", True), ("vmap_conv", 2, 3, 1), ("jnp_dense", 2, True),
                    ("pool",)), ("linear", 2, False), 3, 2, (), (), ("no_biases",), True),
)


@pytest.mark.parametrize("spec", EXAMPLES, ids=[f"example{i}" for i in range(len(EXAMPLES))])
def test_fuzz_examples(spec):
  check(spec)


@settings(max_examples=1, derandomize=True, **_SETTINGS)
@given(spec=specs())
def test_fuzz_implementations(spec):
  check(spec)


@pytest.mark.slow
@seed(SLOW_SEED)
@settings(max_examples=SLOW_EXAMPLES, **_SETTINGS)
@given(spec=specs())
def test_fuzz_implementations_slow(spec):
  check(spec)


def test_spec_grammar_covers_every_op():
  """The grammar draws every op, and each builds (a typo in ``_op`` would silently
  drop one from the fuzzer). Traced only, no compilation."""
  for kind in sorted(set(RANK2_OPS) | set(RANK3_OPS) | set(TOKEN_OPS)):
    rank = 2 if kind in RANK2_OPS else 3
    if kind in TOKEN_OPS:
      op, h = (kind,), jnp.zeros((3, 3), jnp.int32)
    else:
      op = find(_op(rank, 3), lambda o, kind=kind: o[0] == kind,
                settings=settings(database=None, derandomize=True))
      h = jnp.zeros((3, 4) if rank == 2 else (3, 3, 4), jnp.float64)
    init = hk.transform_with_state(lambda x, op=op: _apply_op(op, x, init=True)).init
    with jax.numpy_dtype_promotion("standard"):  # hk.BatchNorm (see _promotion)
      params, _ = jax.eval_shape(init, jax.random.key(0), h)
    assert params or kind in ("act", "center", "batch_softmax", "batch_stats", "pool",
                              "layernorm", "hk_layernorm"), op
