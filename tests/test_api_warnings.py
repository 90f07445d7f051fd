"""Public API warnings: layers inside JAX transforms (structured, no warning), the
exact fallback's one-time warning, non-finite kernels, custom getters and
parameterless norms."""

from __future__ import annotations

import itertools
import warnings

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import models
import ntklayers
import ntklayers.haiku as nh
from reference import TOL64, assert_rel_close, reference_ntk

FALLBACK_WARNING = r"handled by the exact generic fallback"


# ------------------------------------------------------- fallback warnings ---

# ntklayers warns once per kernel function and (module, reason); each test still
# builds a model with module names that no other test uses.
_UID = itertools.count()


def _fresh_name(kind: str) -> str:
  return f"{kind}_{next(_UID)}"


def _remat(x, name):
  x = jnp.tanh(ntklayers.Linear(6)(x))
  x = hk.remat(lambda h: jnp.tanh(ntklayers.Linear(6, name=name)(h)))(x)
  return ntklayers.Linear(2)(x)


def _layer_stack(x, name):
  x = jnp.tanh(ntklayers.Linear(6)(x))
  x = hk.layer_stack(2)(lambda h: jnp.tanh(ntklayers.Linear(6, name=name)(h)))(x)
  return ntklayers.Linear(2)(x)


def _scan(x, name):
  cell = ntklayers.Linear(4, name=name)

  def step(h, _):
    return jnp.tanh(cell(h)), None

  h, _ = hk.scan(step, ntklayers.Linear(4)(x), None, length=3)
  return ntklayers.Linear(2)(h)


def _vmap(x, name):
  h = hk.vmap(lambda xi: jnp.tanh(ntklayers.Linear(6, name=name)(xi)), split_rng=False)(x)
  return ntklayers.Linear(2)(h)


def _vmap_layer_norm(x, name):
  h = hk.vmap(lambda xi: nh.LayerNorm(-1, True, True, name=name)(xi), split_rng=False)(x)
  return ntklayers.Linear(2)(h)


def _vmap_conv(x, name):
  """A convolution written per example (unbatched input) and batched by vmap."""
  h = hk.vmap(lambda xi: nh.Conv1D(3, 2, name=name)(xi.reshape(5, 1)),
              split_rng=False)(x)
  return ntklayers.Linear(2)(jnp.tanh(h).reshape(h.shape[0], -1))


def _vmap_batched_conv(x, name):
  """A batched convolution under vmap: two leading axes, which the rule cannot take."""
  h = hk.vmap(lambda xi: nh.Conv1D(3, 2, name=name)(xi.reshape(1, 5, 1)),
              split_rng=False)(x)
  return ntklayers.Linear(2)(jnp.tanh(h).reshape(h.shape[0], -1))


def _custom_getter(x, name):
  def double(next_getter, value, context):
    del context
    return next_getter(value) * 2

  x = jnp.tanh(ntklayers.Linear(6)(x))
  with hk.custom_getter(double):
    x = jnp.tanh(ntklayers.Linear(6, name=name)(x))
  return ntklayers.Linear(2)(x)


def _masked_conv(x, name):
  x = x.reshape(x.shape[0], 5, 1, 1)
  mask = jnp.asarray(np.tril(np.ones((3, 1, 1, 2))), x.dtype)
  return jnp.mean(nh.Conv2D(2, (3, 1), mask=mask, name=name)(x), axis=(1, 2))


FALLBACK_MODELS = {
    "vmap_batched_conv": (_vmap_batched_conv, "runs under vmap"),
    "masked_conv": (_masked_conv, "masked"),
}

# Layers inside hk.remat, hk.layer_stack, hk.scan and hk.vmap (unbatched weights;
# dense, a LayerNorm's scale, a convolution written per example) are captured
# structurally (their structure tags survive the transforms): no fallback, no
# warning, exact.
STRUCTURED_MODELS = {"remat": _remat, "layer_stack": _layer_stack, "scan": _scan,
                     "vmap": _vmap, "vmap_layer_norm": _vmap_layer_norm,
                     "vmap_conv": _vmap_conv}


@pytest.mark.parametrize("kind", sorted(STRUCTURED_MODELS))
def test_layers_inside_transforms_are_structured(kind):
  name = _fresh_name(kind)
  net = hk.without_apply_rng(hk.transform(lambda x: STRUCTURED_MODELS[kind](x, name)))
  x1, x2 = models.make_inputs((5,), jnp.float64)
  params = models.init_params(net.init, jnp.float64, x1)
  cache = ntklayers.capture(net.apply, params, x1)
  assert not cache.meta.plan.fallback, cache.meta.plan.fallback
  assert any(name in g for g in cache.layer_names), cache.layer_names
  k = ntklayers.ntk_fn(net.apply)(params, x1, x2)
  assert_rel_close(k, reference_ntk(net.apply, params, x1, x2), TOL64)


@pytest.mark.parametrize("kind", sorted(FALLBACK_MODELS))
def test_fallback_warning_and_exact(kind):
  fn, reason = FALLBACK_MODELS[kind]
  name = _fresh_name(kind)
  net = hk.without_apply_rng(hk.transform(lambda x: fn(x, name)))
  x1, x2 = models.make_inputs((5,), jnp.float64)
  params = models.init_params(net.init, jnp.float64, x1)
  kernel_fn = ntklayers.ntk_fn(net.apply)
  with pytest.warns(UserWarning, match=FALLBACK_WARNING) as record:
    k = kernel_fn(params, x1, x2)
  messages = [str(w.message) for w in record if FALLBACK_WARNING[:10] in str(w.message)]
  assert any(name in m and reason in m for m in messages), messages
  assert_rel_close(k, reference_ntk(net.apply, params, x1, x2), TOL64)
  # Once per kernel function: calling it again does not warn (warnings are errors
  # in this suite); a new kernel function warns again (tracing is enough).
  kernel_fn(params, x1, x2)
  with pytest.warns(UserWarning, match=FALLBACK_WARNING):
    jax.eval_shape(ntklayers.ntk_fn(net.apply, trace_axes=(-1,)), params, x1, x2)


# ----------------------------------------------------------- non-finite ---


def _with_nan(params):
  first = sorted(params)[0]
  return {m: ({n: v.at[(0,) * v.ndim].set(jnp.nan) for n, v in leaves.items()}
              if m == first else leaves) for m, leaves in params.items()}


def test_nan_params_warn():
  built = models.build("mlp_relu")
  params = _with_nan(built.params)
  with pytest.warns(RuntimeWarning, match="NaN or inf"):
    k = ntklayers.ntk(built.f, params, built.x1, built.x2)
    jax.block_until_ready(k)
    jax.effects_barrier()
  assert not np.all(np.isfinite(np.asarray(k)))


def test_nan_warning_under_error_filter_surfaces_as_exception():
  """With RuntimeWarnings turned into errors (as in this suite's pytest config),
  the warning raised inside ``jax.debug.callback`` surfaces as a JAX runtime error
  that carries ntklayers' message."""
  built = models.build("mlp_relu")
  params = _with_nan(built.params)
  with warnings.catch_warnings():
    warnings.simplefilter("error", RuntimeWarning)
    with pytest.raises(Exception, match="NaN or inf"):
      k = ntklayers.ntk(built.f, params, built.x1, built.x2)
      jax.block_until_ready(k)
      jax.effects_barrier()


def test_no_host_callback_inside_user_jit():
  """Inside the user's jit the kernel carries no effect (a host callback would
  take the user's whole program off jit's fast dispatch path); NaN stay visible."""
  built = models.build("mlp_relu")
  kernel_fn = ntklayers.ntk_fn(built.f)
  step = lambda p: jax.lax.cond(p is None, lambda p: 0.0, lambda p: jnp.sum(
      kernel_fn(p, built.x1)), p)
  assert jax.make_jaxpr(step)(built.params).effects == set()
  k = jax.jit(kernel_fn)(_with_nan(built.params), built.x1)
  assert not np.all(np.isfinite(np.asarray(k)))


def test_finite_kernel_does_not_warn():
  built = models.build("mlp_relu")
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    k = ntklayers.ntk(built.f, built.params, built.x1, built.x2)
    jax.block_until_ready(k)
    jax.effects_barrier()


@pytest.mark.parametrize("implementation", ["auto", "structured"])
def test_custom_getter_transformed_params_are_exact(implementation):
  name = _fresh_name("custom_getter")
  net = hk.without_apply_rng(hk.transform(lambda x: _custom_getter(x, name)))
  x1, x2 = models.make_inputs((5,), jnp.float64)
  params = models.init_params(net.init, jnp.float64, x1)
  with warnings.catch_warnings(record=True) as record:
    warnings.simplefilter("always")
    k = ntklayers.ntk(net.apply, params, x1, x2, implementation=implementation)
  assert_rel_close(k, reference_ntk(net.apply, params, x1, x2), TOL64)
  messages = [str(w.message) for w in record]
  assert any(name in m and "hk.custom_getter" in m for m in messages), messages


def test_parameterless_layer_norm_does_not_warn():
  name = _fresh_name("plain_ln")

  def fn(x):
    h = nh.LayerNorm(-1, create_scale=False, create_offset=False, name=name)(
        ntklayers.Linear(6)(x))
    return ntklayers.Linear(2)(h)

  net = hk.without_apply_rng(hk.transform(fn))
  x1, _ = models.make_inputs((5,), jnp.float64)
  params = models.init_params(net.init, jnp.float64, x1)
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    jax.eval_shape(ntklayers.ntk_fn(net.apply), params, x1)
