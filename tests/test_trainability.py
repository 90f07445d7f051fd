"""``check_trainability``: report values against ``ntklayers.metrics``, warnings,
errors, verdict reasons, and no recompilation on repeated calls."""

from __future__ import annotations

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from compile_log import log_compilations

import ntklayers
import ntklayers.metrics as nm
from ntklayers.trainability import TrainabilityError
from ntklayers.trainability import TrainabilityReport
from ntklayers.trainability import TrainabilityWarning
from ntklayers.trainability import check_trainability

N, D, O, W = 8, 4, 3, 16
RTOL = 1e-10


def _mlp(x):
  return ntklayers.Linear(O)(jnp.tanh(ntklayers.Linear(W)(x)))


NET = hk.without_apply_rng(hk.transform(_mlp))  # one `f` object: one compiled kernel


@pytest.fixture(scope="module")
def setup():
  x = jax.random.normal(jax.random.key(0), (N, D))
  params = NET.init(jax.random.key(1), x)
  labels = jnp.arange(N) % O
  K = ntklayers.ntk_fn(NET.apply)(params, x)
  return params, x, labels, K


def test_report_matches_metrics(setup):
  params, x, labels, K = setup
  bound = float(nm.max_stable_lr(K))
  report = check_trainability(NET.apply, params, x, lr=0.5 * bound, y=labels)
  assert isinstance(report, TrainabilityReport)
  expected = {name: getattr(nm, name)(K) for name in (
      "lambda_max", "lambda_min", "condition_number", "max_stable_lr", "effective_rank",
      "trace")}
  expected["alignment"] = nm.alignment(K, labels, num_classes=O)
  expected["centered_alignment"] = nm.alignment(K, labels, True, num_classes=O)
  for name, value in expected.items():
    np.testing.assert_allclose(getattr(report, name), value, rtol=RTOL, err_msg=name)
  assert report.ok and report.reasons == () and report.size == N * O
  assert report.lr == 0.5 * bound and report.loss == "mean"
  with pytest.raises(AttributeError):
    report.ok = False  # frozen


def test_loss_normalization(setup):
  params, x, _, K = setup
  for loss in ("sum", "elementwise_mean"):
    report = check_trainability(NET.apply, params, x, lr=1e-6, loss=loss)
    np.testing.assert_allclose(report.max_stable_lr, nm.max_stable_lr(K, loss=loss),
                               rtol=RTOL)
  report = check_trainability(NET.apply, params, x, lr=1e-6)
  assert report.alignment is None and report.centered_alignment is None


def test_warns_when_lr_exceeds_bound(setup):
  params, x, _, K = setup
  lr = 1.5 * float(nm.max_stable_lr(K))
  with pytest.warns(TrainabilityWarning, match=r"exceeds the max stable lr .*1\.50x"):
    report = check_trainability(NET.apply, params, x, lr=lr)
  assert not report.ok and len(report.reasons) == 1
  assert "exceeds the max stable lr" in report.reasons[0]
  assert issubclass(TrainabilityWarning, UserWarning)
  check_trainability(NET.apply, params, x, lr=lr, warn=False)  # silent (warnings are errors)


def test_warns_when_kappa_exceeds_threshold(setup):
  params, x, _, K = setup
  kappa = float(nm.condition_number(K))
  with pytest.warns(TrainabilityWarning, match="κ = .* exceeds kappa_max"):
    report = check_trainability(NET.apply, params, x, lr=1e-6, kappa_max=kappa / 2)
  assert not report.ok and report.reasons[0].startswith("κ = ")


def test_both_reasons_and_raise(setup):
  params, x, _, K = setup
  lr = 2 * float(nm.max_stable_lr(K))
  with pytest.raises(TrainabilityError, match="exceeds the max stable lr") as info:
    check_trainability(NET.apply, params, x, lr=lr, kappa_max=1.0, raise_on_failure=True)
  report = info.value.report
  assert isinstance(info.value, ValueError) and not report.ok and len(report.reasons) == 2
  text = str(report)
  assert "PROBLEM" in text and "λmax" in text and "κ = λmax/λmin" in text
  assert text.count("\n  - ") == 2


def test_singular_kernel():
  """N·O = 8·3 = 24 outputs, 2·3 + 3 = 9 parameters: λmin = 0, κ = inf (or round-off)."""
  net = hk.without_apply_rng(hk.transform(lambda x: ntklayers.Linear(O)(x)))
  x = jax.random.normal(jax.random.key(0), (N, 2))
  params = net.init(jax.random.key(1), x)
  with pytest.warns(TrainabilityWarning, match="kappa_max|singular"):
    report = check_trainability(net.apply, params, x, lr=1e-6)
  assert report.condition_number > 1e6 and not report.ok


@pytest.mark.parametrize("loss", [None, "softmax_cross_entropy"])
def test_repeated_calls_do_not_recompile(setup, loss):
  """Nothing compiles on the second call (cross-entropy: the logits' program neither)."""
  params, x, labels, _ = setup
  check_trainability(NET.apply, params, x, lr=1e-3, y=labels, loss=loss)
  new_params = jax.tree.map(lambda p: p * 1.01, params)
  with log_compilations() as log:
    check_trainability(NET.apply, new_params, x, lr=1e-3, y=labels, loss=loss)
  assert not log.names, log.names


def test_argument_checks(setup):
  params, x, _, _ = setup
  with pytest.raises(ValueError, match="`lr`"):
    check_trainability(NET.apply, params, x, lr=0.0)
  with pytest.raises(ValueError, match="`loss`"):
    check_trainability(NET.apply, params, x, lr=1.0, loss="l1")
  with pytest.raises(ValueError, match="full kernel"):
    check_trainability(NET.apply, params, x, lr=1.0, trace_axes=(-1,))


def test_public_names():
  """Exported at the top level (lines added to ntklayers/__init__.py by the lead)."""
  for name in ("check_trainability", "TrainabilityError", "TrainabilityReport",
               "TrainabilityWarning"):
    assert name in ntklayers.__all__
  assert ntklayers.check_trainability is check_trainability
