"""Guards of the structured path and of the entry points (issue #6's "also fix" list).

The kernels of the five classes of models that used to be silently wrong are
checked for exactness over the shared registry (``models_classes.py``) and by the
fuzzer; this file checks the mechanisms: which parameters leave the structured
path and why, that one plan serves both batches, that the static proof and the
runtime check pick the modes they should, and the entry points' error handling
and caching.
"""

from __future__ import annotations

import warnings

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ntklayers
import ntklayers.adapters
import ntklayers.haiku as nh
from ntklayers._core import _capture
from ntklayers._core import _replay
from reference import TOL64, assert_rel_close, reference_ntk

FALLBACK = r"handled by the exact generic fallback"


def _haiku(fn, d_in=5, seed=0):
  net = hk.without_apply_rng(hk.transform(fn))
  rng = np.random.default_rng(seed)
  x1 = jnp.asarray(rng.normal(size=(3, d_in)))
  x2 = jnp.asarray(rng.normal(size=(2, d_in)))
  params = net.init(jax.random.key(seed), x1)
  params = jax.tree.map(lambda a: a + 0.3 * jnp.asarray(rng.normal(size=a.shape)), params)
  return net.apply, params, x1, x2


def mlp(x):
  return ntklayers.Linear(3)(jnp.tanh(ntklayers.Linear(4)(x)))


def tied(x):
  enc = ntklayers.Linear(4, name="enc")
  h = jnp.tanh(enc(x))
  return h @ enc.params_dict()["enc/w"].T


def prototypes(x):
  """A shared layer applied to 3 learned prototypes (3 == N1, but not N2)."""
  protos = hk.get_parameter("protos", (3, 5), x.dtype, init=hk.initializers.RandomNormal())
  shared = ntklayers.Linear(4, name="shared")
  return jnp.tanh(shared(x)) @ jnp.tanh(shared(protos)).T


def centered(x):
  h = jnp.tanh(ntklayers.Linear(4)(x))
  return ntklayers.Linear(3)(h - h.mean(0, keepdims=True))


def _setup(fn, **kw):
  f, params, x1, x2 = _haiku(fn)
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", UserWarning)
    options = ntklayers.adapters.Options.create(
        independent_samples=kw.get("independent_samples"))
    return _capture.prepare(f, params, (x1, x2), options)


# ------------------------------------------------------------- the modes ---


@pytest.mark.parametrize("fn,mode,check_layers", [
    (mlp, _replay.INDEPENDENT, False),     # proven statically: no check, no cond
    (centered, _replay.CHECKED, True),     # batch reduction: runtime check
])
def test_static_proof_or_runtime_check(fn, mode, check_layers):
  setup = _setup(fn)
  assert (setup.mode, setup.check_layers) == (mode, check_layers)


def test_independent_samples_true_skips_every_check():
  assert _setup(centered, independent_samples=True).mode == _replay.INDEPENDENT


def test_runtime_check_flags_coupled_batch_and_recomputes():
  f, params, x1, _ = _haiku(centered)
  cache = jax.jit(lambda p, x: ntklayers.capture(f, p, x))(params, x1)
  assert cache.meta.mode == _replay.CHECKED and not bool(cache.verified)
  assert_rel_close(ntklayers.contract(cache), reference_ntk(f, params, x1), TOL64)
  f, params, x1, _ = _haiku(lambda x: ntklayers.Linear(3)(jnp.tanh(ntklayers.Linear(4)(x))))
  cache = ntklayers.capture(f, params, x1, independent_samples=None)
  assert bool(cache.verified)


# ------------------------------------------------ parameters used outside ---


def test_tied_decoder_weight_goes_to_fallback_with_one_warning():
  f, params, x1, x2 = _haiku(tied)
  kernel_fn = ntklayers.ntk_fn(f)
  with pytest.warns(UserWarning, match=r"parameter 'w' of layer 'enc'.*used outside"):
    k = kernel_fn(params, x1, x2)
  assert_rel_close(k, reference_ntk(f, params, x1, x2), TOL64)
  setup = _setup(tied)
  (group,) = setup.plan.groups
  assert group.roles == ("b",)  # the bias stays structured
  with warnings.catch_warnings():
    warnings.simplefilter("error")  # once per kernel function, layer and reason
    kernel_fn(params, x1, x2)


def test_warnings_are_per_model_not_per_layer_name():
  # A batched convolution under vmap has no rule (its parameters go to the fallback).
  def model_a(x):
    conv = nh.Conv1D(2, 1, name="inner")
    return hk.vmap(lambda h: conv(h[None, :, None]), split_rng=False)(x).reshape(3, -1)

  def model_b(x):
    conv = nh.Conv1D(2, 2, name="inner")
    return hk.vmap(lambda h: conv(jnp.tanh(h)[None, :, None]),
                   split_rng=False)(x).reshape(3, -1)

  for fn in (model_a, model_b):
    f, params, x1, _ = _haiku(fn)
    with pytest.warns(UserWarning, match=r"layer 'inner' is handled"):
      ntklayers.ntk(f, params, x1)


def test_outer_layer_sharing_a_stacked_layers_name_stays_structured():
  def fn(x):
    x = jnp.tanh(ntklayers.Linear(5, name="stacked")(x))
    x = hk.layer_stack(2)(lambda h: jnp.tanh(ntklayers.Linear(5, name="stacked")(h)))(x)
    return ntklayers.Linear(2)(x)

  f, params, x1, x2 = _haiku(fn)
  cache = ntklayers.capture(f, params, x1)  # both structured: no warning
  assert "stacked" in cache.layer_names
  assert not cache.meta.plan.fallback
  assert_rel_close(ntklayers.ntk(f, params, x1, x2), reference_ntk(f, params, x1, x2),
                   TOL64)


# ------------------------------------------------------- one plan, x1/x2 ---


def test_rows_equal_to_n1_but_not_n2_share_one_plan():
  f, params, x1, x2 = _haiku(prototypes)
  with pytest.warns(UserWarning, match=FALLBACK):
    k = ntklayers.ntk(f, params, x1, x2)
  assert_rel_close(k, reference_ntk(f, params, x1, x2), TOL64)


# ------------------------------------------------------------ entry points ---


def test_jitted_f_is_unwrapped_and_still_structured():
  f, params, x1, x2 = _haiku(mlp)
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    cache = ntklayers.capture(jax.jit(f), params, x1)
    k = ntklayers.ntk(jax.jit(f), params, x1, x2)
  assert len(cache.layer_names) == 2 and not cache.meta.plan.fallback
  assert_rel_close(k, reference_ntk(f, params, x1, x2), TOL64)


def test_ntk_and_fresh_ntk_fn_compile_once():
  f, params, x1, x2 = _haiku(mlp)
  traces = [0]

  def counted(p, x):
    traces[0] += 1
    return f(p, x)

  ntklayers.ntk(counted, params, x1, x2, trace_axes=(-1,))
  first = traces[0]
  for _ in range(3):
    ntklayers.ntk(counted, params, x1 + 1.0, x2, trace_axes=(-1,))
    ntklayers.ntk_fn(counted, trace_axes=[-1])(params, x1, x2)
  assert traces[0] == first


@pytest.mark.parametrize("value", ["yes", 3, None])
def test_trainable_values_must_be_bools(value):
  f, params, x1, _ = _haiku(mlp)
  mask = {"linear": value, "linear_1": True}
  if value is None:  # None is an empty subtree (optax convention), not a value
    with pytest.raises(ValueError, match="`trainable` must be a pytree of bools"):
      ntklayers.ntk(f, params, x1, trainable={"linear": {"w": None}, "linear_1": True})
    return
  with pytest.raises(TypeError, match=r"trainable\['linear'\]"):
    ntklayers.ntk(f, params, x1, trainable=mask)


def test_trace_and_diagonal_overlap_refused_when_built():
  with pytest.raises(ValueError, match="both traced and diagonal"):
    ntklayers.ntk_fn(lambda p, x: x, trace_axes=(1,), diagonal_axes=1)


def test_non_floating_leaf_error_names_the_leaf_path():
  params = {"dense": {"w": jnp.ones((5, 3))}, "meta": {"step": jnp.zeros((), jnp.int32)}}
  f = lambda p, x: x @ p["dense"]["w"]
  with pytest.raises(TypeError, match=r"params\['meta'\]\['step'\] \(int32\)"):
    ntklayers.ntk(f, params, jnp.ones((2, 5)))
