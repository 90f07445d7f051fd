"""``ntklayers.predict`` against neural-tangents 0.6.5's own outputs (float64, 1e-10).

The fixtures ``tests/fixtures/nt_predict.npz`` are written by
``tests/fixtures/make_nt_predict_fixtures.py`` run with neural-tangents 0.6.5
(jax 0.4.23): random well-conditioned PSD kernels, targets and initial outputs in
two layouts, ``2d`` (kernels ``[N, N]`` of outputs ``[N, O]``,
``trace_axes=(-1,)``) and ``4d`` (full ``[N, N, O, O]`` kernels,
``trace_axes=()``). Closed forms (``gradient_descent_mse``, ``gp_inference``,
``max_learning_rate``) agree to 1e-10 (relative to the output's largest entry);
ODE integration (``gradient_descent``, the same Dormand-Prince solver with
``rtol = atol = 1.4e-8`` in both) to 1e-6.
"""

from __future__ import annotations

import collections
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ntklayers.predict as npr
from ntklayers.predict import _mse

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures", "nt_predict.npz")
LAYOUTS = {"2d": (-1,), "4d": ()}
MSE_CASES = [("reg0", 0.0, False, 0.7), ("rel", 0.1, False, 1.0), ("abs", 0.05, True, 2.0)]
TIMES = np.array([[0.0, 0.3], [2.0, 25.0]])
ODE_TIMES = np.array([0.0, 0.5, 2.0])
EXACT = 1e-10
ODE_TOL = 1e-6
Kernel = collections.namedtuple("Kernel", "nngp ntk")


@pytest.fixture(scope="module")
def nt() -> dict[str, np.ndarray]:
  with np.load(FIXTURES) as z:
    return {k: z[k] for k in z.files}


def inputs(nt: dict[str, np.ndarray], layout: str) -> dict[str, jax.Array]:
  pre = f"{layout}/in/"
  return {k[len(pre):]: jnp.asarray(v) for k, v in nt.items() if k.startswith(pre)}


def close(got, want, tol: float = EXACT) -> None:
  got, want = np.asarray(got), np.asarray(want)
  assert got.shape == want.shape, (got.shape, want.shape)
  assert got.dtype == np.float64
  scale = max(float(np.max(np.abs(want))), 1e-300)
  err = float(np.max(np.abs(got - want))) / scale
  assert err <= tol, f"relative error {err:.2e} > {tol:.0e}"


def test_fixture_provenance(nt):
  assert str(nt["meta/nt_version"]) == "0.6.5"
  assert os.path.getsize(FIXTURES) < 200_000


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("case", MSE_CASES, ids=[c[0] for c in MSE_CASES])
def test_gradient_descent_mse(nt, layout, case):
  name, reg, absolute, lr = case
  x = inputs(nt, layout)
  fn = npr.gradient_descent_mse(x["k"], x["y"], learning_rate=lr, diag_reg=reg,
                                diag_reg_absolute_scale=absolute, trace_axes=LAYOUTS[layout])
  pre = f"{layout}/mse/{name}"
  for tname, t in (("t", jnp.asarray(TIMES)), ("inf", None)):
    tr, te = fn(t, x["f0"], x["ft0"], x["ktd"])
    close(tr, nt[f"{pre}/{tname}/train"])
    close(te, nt[f"{pre}/{tname}/test"])
    close(fn(t, x["f0"]), nt[f"{pre}/{tname}/train_only"])
    close(fn(t, None, x["ft0"], x["ktd"]), nt[f"{pre}/{tname}/test_only"])


def test_gradient_descent_mse_jit_and_cache(nt):
  """Jitted ``predict_fn`` matches; the eigendecomposition is computed once."""
  x = inputs(nt, "2d")
  fn = npr.gradient_descent_mse(x["k"], x["y"], learning_rate=0.7)
  jitted = jax.jit(fn)
  tr, te = jitted(jnp.asarray(TIMES), x["f0"], x["ft0"], x["ktd"])
  close(tr, nt["2d/mse/reg0/t/train"])
  close(te, nt["2d/mse/reg0/t/test"])
  calls = []
  orig = _mse._eigh

  def counting(*a, **k):
    calls.append(1)
    return orig(*a, **k)

  fn2 = npr.gradient_descent_mse(x["k"], x["y"], learning_rate=0.7)
  _mse._eigh = counting
  try:
    for t in (0.3, 2.0, jnp.asarray(TIMES), 25.0):
      fn2(t, x["f0"], x["ft0"], x["ktd"])
  finally:
    _mse._eigh = orig
  assert len(calls) == 1


# test_predict_dense.py checks MSE flows (plain and momentum) against SciPy.
ODE_DEFAULT = {("2d", "ce", 0.9), ("4d", "mse", None)}


@pytest.mark.parametrize("layout,loss,momentum", [
    pytest.param(layout, loss, momentum, id=f"{layout}-{loss}-{momentum}",
                 marks=() if (layout, loss, momentum) in ODE_DEFAULT else pytest.mark.slow)
    for layout in LAYOUTS for loss in ("mse", "ce") for momentum in (None, 0.9)])
def test_gradient_descent_ode(nt, layout, loss, momentum):
  """Each case compiles its own ODE solver (~3 s): two by default, all eight when slow."""
  x = inputs(nt, layout)
  if loss == "mse":
    loss_fn, y = (lambda fx, y: 0.5 * jnp.mean((fx - y) ** 2)), x["y"]
  else:
    loss_fn, y = (lambda fx, y: -jnp.mean(jax.nn.log_softmax(fx) * y)), x["y_onehot"]
  fn = npr.gradient_descent(loss_fn, x["k"], y, learning_rate=0.5, momentum=momentum,
                            trace_axes=LAYOUTS[layout])
  order = np.array([2, 0, 1])  # times in any order (NT needs them increasing)
  tr, te = fn(jnp.asarray(ODE_TIMES[order]), x["f0"], x["ft0"], x["ktd"])
  pre = f"{layout}/ode/{loss}/{'plain' if momentum is None else 'momentum'}"
  close(tr, nt[f"{pre}/train"][order], ODE_TOL)
  close(te, nt[f"{pre}/test"][order], ODE_TOL)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("reg", [("reg0", 0.0), ("reg", 1e-2)], ids=["reg0", "reg"])
def test_gp_inference(nt, layout, reg):
  rname, diag_reg = reg
  x = inputs(nt, layout)
  k_dd = Kernel(nngp=x["k_nngp"], ntk=x["k"])
  k_td = Kernel(nngp=x["ktd_nngp"], ntk=x["ktd"])
  k_tt = Kernel(nngp=x["ktt_nngp"], ntk=x["ktt"])
  fn = npr.gp_inference(k_dd, x["y"], diag_reg=diag_reg, trace_axes=LAYOUTS[layout])
  pre = f"{layout}/gp/{rname}"
  res = fn(("nngp", "ntk", "ntkgp"), k_td, k_tt)
  assert res._fields == ("nngp", "ntk", "ntkgp")
  for g in res._fields:
    assert isinstance(getattr(res, g), npr.Gaussian)
    close(getattr(res, g).mean, nt[f"{pre}/{g}/mean"])
    close(getattr(res, g).covariance, nt[f"{pre}/{g}/cov"])
  close(fn("ntk", k_td), nt[f"{pre}/mean_only_ntk"])
  # dicts work like namedtuples
  dicts = npr.gp_inference(dict(k_dd._asdict()), x["y"], diag_reg=diag_reg,
                           trace_axes=LAYOUTS[layout])
  close(dicts("ntk", dict(k_td._asdict()), dict(k_tt._asdict())).covariance,
        nt[f"{pre}/ntk/cov"])
  fn_arr = npr.gp_inference(x["k_nngp"], x["y"], diag_reg=diag_reg, trace_axes=LAYOUTS[layout])
  mean, cov = fn_arr("nngp", x["ktd_nngp"], x["ktt_nngp"])
  close(mean, nt[f"{pre}/array_nngp/mean"])
  close(cov, nt[f"{pre}/array_nngp/cov"])
  both = fn_arr(None, x["ktd_nngp"])  # get=None: both, the array serving as each kernel
  assert both._fields == ("nngp", "ntk")
  close(both.ntk, nt[f"{pre}/array_nngp/mean"])


def test_gp_train_set(nt):
  x = inputs(nt, "4d")
  fn = npr.gp_inference(Kernel(nngp=x["k_nngp"], ntk=x["k"]), x["y"], trace_axes=())
  res = fn("ntk", None, True)
  np.testing.assert_array_equal(res.mean, x["y"])
  assert res.covariance.shape == x["k"].shape and not np.asarray(res.covariance).any()


@pytest.mark.parametrize("layout", LAYOUTS)
def test_max_learning_rate(nt, layout):
  x = inputs(nt, layout)
  for mom in (0.0, 0.9):
    close(npr.max_learning_rate(x["k"], momentum=mom), nt[f"{layout}/max_lr/m{mom}"])
  close(npr.max_learning_rate(x["k"], y_train_size=x["y"].size), nt[f"{layout}/max_lr/size"])
  op = npr.KernelOperator.from_array(np.asarray(x["k"]))
  close(npr.max_learning_rate(op, momentum=0.9), nt[f"{layout}/max_lr/m0.9"], 1e-9)
