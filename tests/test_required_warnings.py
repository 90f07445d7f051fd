"""Models with ``warning="require"`` (issue #6, class 1: a parameter read outside
its annotated layer) warn once that a layer goes to the exact fallback.

The warning is emitted once per model, so whether a call in the shared test
process warns depends on test order (other tests only tolerate it). Here one
fresh Python process builds each such model of ``models.registry()`` once, and
records the ntklayers warnings of

* ``first``: its first kernel (``implementation="auto"``, computed, so a warning
  emitted at run time counts too), which must contain a ``UserWarning`` with
  "handled by the exact generic fallback";
* ``again``: the same ``kernel_fn`` called again, which must emit no ntklayers
  warning (once per kernel function), and
* ``other``: a new ``ntk_fn`` of the same model with other options (traced
  only), which warns again (warnings belong to kernel functions, not to the
  process).

Exactness is checked by the registry tests (``test_exactness``,
``test_flax_exactness``). Cost: one subprocess (imports, then one compilation per
model), a few seconds.
"""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
import textwrap

import pytest

import models

FALLBACK_WARNING = "handled by the exact generic fallback"
REQUIRED = [m for m in models.registry() if m.warning == "require"]

_CHILD = textwrap.dedent("""
    import json, sys, warnings
    sys.path.insert(0, sys.argv[1])
    import conftest  # noqa: F401  (the suite's JAX settings)
    import jax
    import models, models_flax, ntklayers

    def record(fn):
      with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
          jax.block_until_ready(fn())
          jax.effects_barrier()
          error = None
        except Exception as e:  # reported, not raised: one model must not hide the others
          error = f"{type(e).__name__}: {e}"[:500]
      msgs = [f"{w.category.__name__}: {w.message}" for w in caught
              if str(w.message).startswith("ntklayers")]
      return msgs, error

    out = {}
    for name in sys.argv[2:]:
      model = {**models.BY_NAME, **models_flax.BY_NAME}[name]
      built = model.build(jax.numpy.float64)  # fresh, not the cached registry model
      if hasattr(built, "ntk_fn"):  # linen / NNX entry points
        fn, fn2 = built.ntk_fn(), built.ntk_fn(trace_axes=(-1,))
        first = lambda: fn(built.x1, built.x2)
        again = lambda: fn(built.x1, built.x2)
        other = lambda: jax.eval_shape(fn2, built.x1, built.x2)
      else:
        fn = ntklayers.ntk_fn(built.f)
        fn2 = ntklayers.ntk_fn(built.f, trace_axes=(-1,))
        first = lambda: fn(built.params, built.x1, built.x2)
        again = lambda: fn(built.params, built.x1, built.x2)
        other = lambda: jax.eval_shape(fn2, built.params, built.x1, built.x2)
      (w1, e1), (w2, e2), (w3, e3) = record(first), record(again), record(other)
      out[name] = dict(first=w1, again=w2, other=w3, error=e1 or e2 or e3)
    print("RESULT " + json.dumps(out))
""")


@functools.lru_cache(maxsize=None)
def _child_results() -> dict:
  tests_dir = os.path.dirname(os.path.abspath(__file__))
  proc = subprocess.run(
      [sys.executable, "-c", _CHILD, tests_dir, *[m.name for m in REQUIRED]],
      capture_output=True, text=True, timeout=600, check=False)
  lines = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
  assert proc.returncode == 0 and lines, (proc.returncode, proc.stderr[-3000:])
  return json.loads(lines[-1][len("RESULT "):])


@pytest.mark.parametrize("model", [pytest.param(m, id=m.name) for m in REQUIRED])
def test_required_warning_once(model):
  result = _child_results()[model.name]
  assert result["error"] is None, result["error"]
  assert any(m.startswith("UserWarning") and FALLBACK_WARNING in m
             for m in result["first"]), f"no fallback warning: {result['first']}"
  assert not result["again"], f"warned again: {result['again']}"
  assert any(FALLBACK_WARNING in m for m in result["other"]), (
      f"a new kernel function did not warn: {result['other']}")
