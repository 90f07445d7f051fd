"""Issue 17, classes 4 and 6 (metrics, monitor, guard, check): kernels of another
layout than a metric needs, layerwise dicts, and masked parameters.

* a stability bound is only ever computed from the full kernel: the monitor
  refuses ``max_stable_lr`` with ``trace_axes`` or ``diagonal_axes`` (naming the
  argument), as the guard and the check do; with ``diagonal_axes`` the monitor
  computes ``trace`` of the diagonal kernel and refuses the metrics that need the
  full matrix;
* every kernel metric of ``ntklayers.metrics`` takes a ``{name: kernel}`` dict
  from ``ntk_fn(layerwise=True)`` and returns ``{name: value}`` (jittable);
  ``max_stable_lr`` refuses it (the model's bound is that of the sum) and
  ``flatten`` too (it returns one matrix), with messages saying what to do;
* the monitor and the guard inside ``optax.multi_transform`` / ``optax.masked``
  (which hand them masked parameters) raise at ``init``, saying to chain them
  outside; chained outside they work.
"""

from __future__ import annotations

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import ntklayers
import ntklayers.metrics as nm
import ntklayers.optax as nopt

N, D, O = 6, 4, 3
RTOL = 1e-10


def mlp():
  return hk.without_apply_rng(hk.transform(
      lambda x: ntklayers.Linear(O, name="out")(
          jnp.tanh(ntklayers.Linear(8, name="hidden")(x)))))


@pytest.fixture(scope="module")
def model():
  net = mlp()
  x = jax.random.normal(jax.random.key(0), (N, D))
  params = net.init(jax.random.key(1), x)
  return net, x, params


# --- class 4: a bound from the full kernel only ------------------------------------

@pytest.mark.parametrize("option", [{"trace_axes": (-1,)}, {"trace_axes": -1},
                                    {"diagonal_axes": (0,)}, {"diagonal_axes": (-1,)}])
def test_monitor_refuses_the_bound_of_a_partial_kernel(model, option):
  net, x, _ = model
  name = next(iter(option))
  with pytest.raises(ValueError, match=f"`{name}`.*max_stable_lr|max_stable_lr.*`{name}`"):
    nopt.monitor(net.apply, x, metrics=("trace", "max_stable_lr"), **option)


def test_monitor_with_trace_axes_keeps_the_other_metrics(model):
  """The spectral metrics of the traced [N, N] kernel stay available (TE-NAS uses them)."""
  net, x, params = model
  mon = nopt.monitor(net.apply, x, trace_axes=(-1,), metrics=("lambda_max", "trace"))
  values = nopt.monitor_values(mon.update(params, mon.init(params), params)[1])
  K = ntklayers.ntk_fn(net.apply, trace_axes=(-1,))(params, x)
  np.testing.assert_allclose(values["lambda_max"], nm.lambda_max(K), rtol=RTOL)
  np.testing.assert_allclose(values["trace"], nm.trace(K), rtol=RTOL)


@pytest.mark.parametrize("axes", [(0,), (-1,)])
def test_monitor_with_diagonal_axes(model, axes):
  net, x, params = model
  mon = nopt.monitor(net.apply, x, diagonal_axes=axes, metrics=("trace", "relative_change"))
  values = nopt.monitor_values(mon.update(params, mon.init(params), params)[1])
  np.testing.assert_allclose(values["trace"], nm.trace(ntklayers.ntk_fn(net.apply)(params, x)),
                             rtol=RTOL)
  assert values["relative_change"] == 0
  for metric in ("lambda_max", "effective_rank", "alignment"):
    with pytest.raises(ValueError, match=f"diagonal_axes.*{metric}|{metric}.*diagonal_axes"):
      nopt.monitor(net.apply, x, diagonal_axes=axes, metrics=(metric,),
                   probe_y=jnp.zeros((N, O)))


def test_check_trainability_refuses_layerwise(model):
  net, x, params = model
  with pytest.raises(ValueError, match="layerwise"):
    ntklayers.check_trainability(net.apply, params, x, lr=0.1, layerwise=True)
  with pytest.raises(ValueError, match="diagonal_axes"):
    ntklayers.check_trainability(net.apply, params, x, lr=0.1, diagonal_axes=(0,))


# --- class 6: layerwise dicts -------------------------------------------------------

METRICS = ("eigvalsh", "lambda_max", "lambda_min", "condition_number", "trace",
           "effective_rank")


@pytest.mark.parametrize("name", METRICS)
def test_every_metric_takes_a_layerwise_dict(model, name):
  net, x, params = model
  layers = ntklayers.ntk_fn(net.apply, layerwise=True)(params, x)
  fn = getattr(nm, name)
  for got in (fn(layers), jax.jit(fn)(layers)):
    assert isinstance(got, dict) and sorted(got) == sorted(layers)
    for key, K in layers.items():
      np.testing.assert_allclose(got[key], fn(K), rtol=RTOL, atol=1e-12, err_msg=key)
  if name == "trace":  # additive: the layers' traces sum to the model's
    np.testing.assert_allclose(sum(fn(layers).values()),
                               fn(ntklayers.ntk_fn(net.apply)(params, x)), rtol=RTOL)


def test_alignment_and_diagonal_trace_of_dicts(model):
  net, x, params = model
  labels = jnp.arange(N) % O
  layers = ntklayers.ntk_fn(net.apply, layerwise=True)(params, x)
  got = nm.alignment(layers, labels, True, num_classes=O)
  for key, K in layers.items():
    np.testing.assert_allclose(got[key], nm.alignment(K, labels, True, num_classes=O),
                               rtol=RTOL)
  diag = ntklayers.ntk_fn(net.apply, layerwise=True, diagonal_axes=(0,))(params, x)
  got = nm.trace(diag, diagonal_axes=(0,))
  for key in layers:
    np.testing.assert_allclose(got[key], nm.trace(layers[key]), rtol=RTOL)


def test_bound_and_flatten_of_a_dict_refuse(model):
  net, x, params = model
  layers = ntklayers.ntk_fn(net.apply, layerwise=True)(params, x)
  with pytest.raises(ValueError, match=r"max_stable_lr.*sum\(K.values\(\)\)"):
    nm.max_stable_lr(layers)
  with pytest.raises(ValueError, match="flatten.*layerwise"):
    nm.flatten(layers)
  with pytest.raises(ValueError, match="empty"):
    nm.trace({})


# --- class 6: masked parameters -----------------------------------------------------

def labels_of(params):
  return {k: jax.tree.map(lambda _, k=k: "hidden" if "hidden" in k else "out", v)
          for k, v in params.items()}


@pytest.mark.parametrize("make", [
    lambda net, x: nopt.monitor(net.apply, x),
    lambda net, x: nopt.step_size_guard(net.apply, x, lr=0.1),
    lambda net, x: nopt.step_size_guard(net.apply, x, lr=0.1, method="lanczos"),
])
def test_inside_multi_transform_or_masked_raises_at_init(model, make):
  net, x, params = model
  inner = make(net, x)
  multi = optax.multi_transform(
      {"hidden": optax.sgd(0.1), "out": optax.chain(optax.sgd(0.1), inner)},
      labels_of(params))
  with pytest.raises(ValueError, match="outside.*multi_transform"):
    multi.init(params)
  masked = optax.masked(inner, {k: jax.tree.map(lambda _, k=k: "out" in k, v)
                                for k, v in params.items()})
  with pytest.raises(ValueError, match="outside.*multi_transform"):
    masked.init(params)
  with pytest.raises(ValueError, match="outside.*multi_transform"):  # update alone too
    inner.update(params, inner.init(params),
                 jax.tree.map(lambda _: optax.MaskedNode(), params))


def test_chained_outside_multi_transform_works(model):
  net, x, params = model
  multi = optax.multi_transform({"hidden": optax.sgd(0.1), "out": optax.sgd(0.01)},
                                labels_of(params))
  opt = optax.chain(multi, nopt.monitor(net.apply, x, every=1, metrics=("trace",)))
  state = opt.init(params)
  _, state = jax.jit(opt.update)(params, state, params)
  np.testing.assert_allclose(nopt.monitor_values(state)["trace"],
                             nm.trace(ntklayers.ntk_fn(net.apply)(params, x)), rtol=RTOL)
