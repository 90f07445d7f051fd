"""Clear errors that name the offending argument (and show shapes where relevant)."""

from __future__ import annotations

import re

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import models
import ntklayers


@pytest.fixture(scope="module")
def mlp():
  return models.build("mlp_relu")  # x: [N, 5] -> [N, 3]


def _x(*shape, dtype=jnp.float64):
  return jnp.asarray(np.random.default_rng(0).normal(size=shape), dtype)


def _linear_f(params, x):
  return x @ params["w"]


# ------------------------------------------------------------ x1 and x2 ---


def test_x1_x2_trailing_shape_mismatch(mlp):
  with pytest.raises(ValueError, match=r"`x1` and `x2`") as e:
    ntklayers.ntk(mlp.f, mlp.params, _x(3, 5), _x(2, 4))
  assert "(3, 5)" in str(e.value) and "(2, 4)" in str(e.value)


def test_x1_x2_structure_mismatch(mlp):
  f = lambda p, x: mlp.f(p, x["a"])
  with pytest.raises(ValueError, match=r"`x1` and `x2` have different structures"):
    ntklayers.ntk(f, mlp.params, {"a": _x(3, 5)}, _x(2, 5))
  with pytest.raises(ValueError, match=r"`x1` and `x2` have different structures"):
    ntklayers.ntk(f, mlp.params, {"a": _x(3, 5)}, {"b": _x(2, 5)})


def test_x1_x2_dtype_mismatch(mlp):
  with pytest.raises(ValueError, match=r"`x1` and `x2`.*dtype") as e:
    ntklayers.ntk(mlp.f, mlp.params, _x(3, 5), _x(2, 5, dtype=jnp.float32))
  assert "float64" in str(e.value) and "float32" in str(e.value)


def test_x1_x2_integer_dtype_mismatch():
  built = models.build("embed_tokens")
  with pytest.raises(ValueError, match=r"`x1` and `x2`.*dtype") as e:
    ntklayers.ntk(built.f, built.params, built.x1, built.x2.astype(jnp.int64))
  assert "int32" in str(e.value) and "int64" in str(e.value)


def test_empty_batch(mlp):
  with pytest.raises(ValueError, match=r"`x1` is an empty batch.*\(0, 5\)"):
    ntklayers.ntk(mlp.f, mlp.params, _x(0, 5))
  with pytest.raises(ValueError, match=r"`x2` is an empty batch.*\(0, 5\)"):
    ntklayers.ntk(mlp.f, mlp.params, _x(3, 5), _x(0, 5))
  with pytest.raises(ValueError, match=r"`x` is an empty batch"):
    ntklayers.capture(mlp.f, mlp.params, _x(0, 5))


def test_inputs_without_batch_axis_or_disagreeing_batch(mlp):
  with pytest.raises(ValueError, match=r"`x1` needs a leading batch axis|leaf of `x1`"):
    ntklayers.ntk(lambda p, x: mlp.f(p, x["a"]), mlp.params,
                  {"a": _x(3, 5), "s": jnp.float64(1.0)})
  with pytest.raises(ValueError, match=r"`x1` disagree in batch size.*\(3, 5\).*\(2, 5\)"):
    ntklayers.ntk(lambda p, x: mlp.f(p, x["a"]), mlp.params,
                  {"a": _x(3, 5), "b": _x(2, 5)})


# ---------------------------------------------------------------- params ---


def test_params_missing_module(mlp):
  params = {k: v for k, v in mlp.params.items() if k != "linear_1"}
  with pytest.raises(ValueError, match=r"`params` matches `f`") as e:
    ntklayers.ntk(mlp.f, params, mlp.x1)
  assert "linear_1" in str(e.value)


def _notes(e) -> str:
  return "\n".join(getattr(e.value, "__notes__", ()))


def test_params_wrong_shape(mlp):
  """The model's own error is re-raised unchanged, with a note naming the shapes."""
  params = dict(mlp.params)
  params["linear"] = {"w": jnp.zeros((4, 16)), "b": jnp.zeros(16)}
  with pytest.raises(ValueError, match=r"linear/w.*\(4, 16\)") as e:
    ntklayers.ntk(mlp.f, params, mlp.x1)
  notes = _notes(e)
  assert "`params` matches `f`" in notes
  assert "(4, 16)" in notes and "(3, 5)" in notes  # params and x shapes


def test_x_wrong_shape_for_f(mlp):
  with pytest.raises(ValueError) as e:
    ntklayers.ntk(mlp.f, mlp.params, _x(3, 7))
  assert re.search(r"(?s)calling f\(params, x\) failed.*x shapes: \(3, 7\)", _notes(e))


def test_jax_errors_inside_f_keep_their_type(mlp):
  """Python control flow on a traced value: JAX's own error, not a re-created one."""
  def f(p, x):
    h = mlp.f(p, x)
    if h.sum() > 0:
      return h
    return -h

  with pytest.raises(jax.errors.TracerBoolConversionError) as e:
    ntklayers.ntk(f, mlp.params, mlp.x1)
  assert "calling f(params, x) failed" in _notes(e)


def test_one_dimensional_x_needs_a_batch_axis(mlp):
  with pytest.raises(ValueError, match=r"leading batch axis"):
    ntklayers.ntk(lambda p, x: mlp.f(p, x[None])[0], mlp.params, mlp.x1[0])


def test_non_floating_params_leaf_not_masked():
  params = {"dense": {"w": _x(5, 3)}, "meta": {"step": jnp.zeros((), jnp.int32)}}
  f = lambda p, x: _linear_f(p["dense"], x)
  with pytest.raises(TypeError, match=r"`params` has non-floating leaves.*meta.*trainable"):
    ntklayers.ntk(f, params, _x(3, 5))
  # Masked out, it is fine.
  k = ntklayers.ntk(f, params, _x(3, 5), trainable={"dense": True, "meta": False})
  assert k.shape == (3, 3, 3, 3)


def test_params_without_leaves():
  with pytest.raises(ValueError, match=r"`params` has no leaves"):
    ntklayers.ntk(lambda p, x: x, {}, _x(3, 5))


def test_params_non_array_leaf():
  with pytest.raises(TypeError, match=r"`params` leaves must be arrays"):
    ntklayers.capture(lambda p, x: x * p["s"], {"s": 2.0}, _x(3, 5))


def test_everything_masked_out(mlp):
  with pytest.raises(ValueError, match=r"No trainable parameters.*`trainable`"):
    ntklayers.ntk(mlp.f, mlp.params, mlp.x1, trainable=False)


# --------------------------------------------------------------------- f ---


def test_non_callable_f(mlp):
  with pytest.raises(TypeError, match=r"`f` must be callable"):
    ntklayers.ntk_fn(mlp.params)
  with pytest.raises(TypeError, match=r"`f` must be callable"):
    ntklayers.capture("not a function", mlp.params, mlp.x1)


def test_f_returning_tuple(mlp):
  f = lambda p, x: (mlp.f(p, x), mlp.f(p, x))
  with pytest.raises(TypeError, match=r"`f` must return a single array"):
    ntklayers.ntk(f, mlp.params, mlp.x1)


def test_f_output_without_batch_axis(mlp):
  with pytest.raises(ValueError,
                     match=r"output of `f` must lead with the batch axis of `x` \(size 3\)"):
    ntklayers.ntk(lambda p, x: jnp.sum(mlp.f(p, x)), mlp.params, mlp.x1)
  with pytest.raises(ValueError, match=r"\(size 2\); got output shape \(3, 2\)"):
    ntklayers.ntk(lambda p, x: mlp.f(p, x).T, mlp.params, mlp.x2)


def test_f_integer_output(mlp):
  with pytest.raises(TypeError, match=r"output of `f` must be floating"):
    ntklayers.ntk(lambda p, x: jnp.argmax(mlp.f(p, x), axis=-1), mlp.params, mlp.x1)


# ---------------------------------------------------------------- options ---


def test_unknown_implementation(mlp):
  with pytest.raises(ValueError, match=r"`implementation` must be one of.*'fast'"):
    ntklayers.ntk_fn(mlp.f, implementation="fast")
  with pytest.raises(ValueError, match=r"`implementation`"):
    ntklayers.capture(mlp.f, mlp.params, mlp.x1, implementation="jvp")


def test_trace_axes_out_of_range(mlp):
  with pytest.raises(ValueError, match=r"`trace_axes`.*out of range.*rank 2"):
    ntklayers.ntk(mlp.f, mlp.params, mlp.x1, trace_axes=(2,))
  with pytest.raises(ValueError, match=r"`diagonal_axes`.*out of range"):
    ntklayers.ntk(mlp.f, mlp.params, mlp.x1, diagonal_axes=(-3,))


def test_trace_axes_wrong_type(mlp):
  with pytest.raises(TypeError, match=r"`trace_axes` must be an int or a sequence of ints"):
    ntklayers.ntk_fn(mlp.f, trace_axes="-1")
  with pytest.raises(TypeError, match=r"`diagonal_axes` must be an int or a sequence"):
    ntklayers.ntk_fn(mlp.f, diagonal_axes=(0.5,))


def test_trace_axes_repeated(mlp):
  with pytest.raises(ValueError, match=r"`trace_axes`.*repeats an axis"):
    ntklayers.ntk(mlp.f, mlp.params, mlp.x1, trace_axes=(1, -1))


def test_trace_and_diagonal_overlap(mlp):
  with pytest.raises(ValueError, match=r"both traced and diagonal.*trace_axes.*diagonal_axes"):
    ntklayers.ntk(mlp.f, mlp.params, mlp.x1, trace_axes=(-1,), diagonal_axes=(1,))


@pytest.mark.parametrize("option", ["diagonal_axes", "trace_axes"])
def test_batch_axis_option_needs_equal_batch_sizes(mlp, option):
  with pytest.raises(ValueError, match=r"N1=3 \(`x1`\) and N2=2 \(`x2`\)"):
    ntklayers.ntk(mlp.f, mlp.params, mlp.x1, mlp.x2, **{option: (0,)})


def test_layerwise_and_independent_samples_types(mlp):
  with pytest.raises(TypeError, match=r"`layerwise` must be a bool"):
    ntklayers.ntk_fn(mlp.f, layerwise=1)
  with pytest.raises(TypeError, match=r"`independent_samples` must be None or a bool"):
    ntklayers.ntk_fn(mlp.f, independent_samples="no")


# -------------------------------------------------------------- trainable ---


def test_bad_trainable_structure(mlp):
  bad = {"linear": True, "not_a_module": False}
  with pytest.raises(ValueError, match=r"`trainable` must be a pytree of bools"):
    ntklayers.ntk(mlp.f, mlp.params, mlp.x1, trainable=bad)


def test_bad_trainable_callable_result(mlp):
  with pytest.raises(ValueError, match=r"`trainable`"):
    ntklayers.ntk(mlp.f, mlp.params, mlp.x1, trainable=lambda p: [True, False])


# --------------------------------------------------------------- contract ---


def test_contract_caches_from_different_models():
  a, b = models.build("mlp_relu"), models.build("mlp_tanh_nobias")
  c1 = ntklayers.capture(a.f, a.params, a.x1)
  c2 = ntklayers.capture(b.f, b.params, b.x1)
  with pytest.raises(ValueError, match=r"`cache1` and `cache2` were captured with different"):
    ntklayers.contract(c1, c2)


def test_contract_caches_with_different_options():
  a = models.build("mlp_relu")
  c1 = ntklayers.capture(a.f, a.params, a.x1)
  c2 = ntklayers.capture(a.f, a.params, a.x2, trainable=lambda p: hk.data_structures.map(
      lambda m, n, v: n == "w", p))
  with pytest.raises(ValueError, match=r"`cache1` and `cache2`"):
    ntklayers.contract(c1, c2)


def test_contract_non_cache(mlp):
  c = ntklayers.capture(mlp.f, mlp.params, mlp.x1)
  with pytest.raises(TypeError, match=r"`cache2` must come from ntklayers.capture"):
    ntklayers.contract(c, np.zeros((3, 3)))
  with pytest.raises(TypeError, match=r"`cache1` must come from ntklayers.capture"):
    ntklayers.contract(jnp.zeros((3, 3)))


def test_error_messages_show_shapes_not_values(mlp):
  """Errors print shapes like ``(3, 5)``, not array contents."""
  with pytest.raises(ValueError) as e:
    ntklayers.ntk(mlp.f, mlp.params, _x(3, 5), _x(2, 4))
  assert not re.search(r"Array\(|\d\.\d{4}", str(e.value)), str(e.value)
