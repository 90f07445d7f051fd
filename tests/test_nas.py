"""``ntklayers.nas``: scores on models with known kernels, the weights-only mask
on Haiku, linen and NNX parameter names, O(N) memory of the trace norm, repeats,
a mixed search loop with ``rank``, early rejection and argument errors.

Known kernels: for ``f(x) = x W + b`` with ``O`` outputs, ``Θ = (X Xᵀ + 1) ⊗ I_O``
whatever the initialization, so TE-NAS's kernel (summed logits, ``W`` only) is
``O · X Xᵀ``, ``κ`` of the full kernel is ``κ(X Xᵀ + 1)``, ``tr Θ = O · Σ_n
(‖x_n‖² + 1)`` and the logit-averaged kernel is ``X Xᵀ + 1``.
"""

from __future__ import annotations

import dataclasses
import functools
import warnings

import flax.linen as nn
import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import ntklayers
import ntklayers.flax
import ntklayers.metrics as nm
import ntklayers.nas as nas
from ntklayers.flax import linen as fl
from ntklayers.flax import nnx as fx

N, D, O, W = 6, 8, 3, 8
F64 = jnp.float64
X = jax.random.normal(jax.random.key(0), (N, D), F64)
LABELS = jnp.array([0, 1, 2, 0, 1, 1])


def np_kappa(mat):
  ev = np.linalg.eigvalsh(np.asarray(mat))
  return ev[-1] / ev[0]


def np_alignment(k, labels, centered):
  y = np.eye(int(labels.max()) + 1)[np.asarray(labels)]
  k, t = np.asarray(k), y @ y.T
  if centered:
    h = np.eye(len(k)) - 1 / len(k)
    k, t = h @ k @ h, h @ t @ h
  return np.sum(k * t) / (np.linalg.norm(k) * np.linalg.norm(t))


def dataclass_without_time(result, seconds):
  return dataclasses.replace(result, seconds=seconds)


def selected(mask):
  """Paths ('a/b/w') of the True leaves of a mask (NNX's '.value' dropped)."""
  out = set()
  for path, leaf in jax.tree_util.tree_flatten_with_path(mask)[0]:
    if leaf:
      out.add("/".join(str(k.key) for k in path if isinstance(k, jax.tree_util.DictKey)))
  return out


# ------------------------------------------------------------ weights_only ---


def test_weights_only_haiku_names():
  def fn(x):
    h = ntklayers.Linear(W)(x) + hk.Linear(W)(x)
    h = hk.LayerNorm(-1, True, True)(h)
    h = h + hk.Embed(5, W)(jnp.zeros(x.shape[:1], jnp.int32))
    img = hk.Conv2D(2, 3)(h.reshape(-1, 2, 4, 1))
    att = hk.MultiHeadAttention(2, 4, w_init=hk.initializers.VarianceScaling())(
        h[:, None], h[:, None], h[:, None])
    return img.sum((1, 2)) + att[:, 0, :2]
  with jax.numpy_dtype_promotion("standard"):  # Haiku's norms and attention
    shapes = jax.eval_shape(hk.transform(fn).init, jax.random.key(0), X)
  assert selected(nas.weights_only(shapes)) == {
      "linear/w", "linear_1/w", "conv2_d/w", "multi_head_attention/query/w",
      "multi_head_attention/key/w", "multi_head_attention/value/w",
      "multi_head_attention/linear/w"}


def test_weights_only_linen_names():
  class Net(nn.Module):
    @nn.compact
    def __call__(self, x):
      h = fl.Dense(W)(x) + nn.Dense(W)(x)
      h = nn.BatchNorm(use_running_average=True)(nn.LayerNorm()(h))
      h = h + nn.Embed(5, W)(jnp.zeros(x.shape[:1], jnp.int32))
      img = nn.Conv(2, (3, 3))(h.reshape(-1, 2, 4, 1))
      att = nn.MultiHeadDotProductAttention(2, qkv_features=4)(h[:, None])
      return img.sum((1, 2)) + att[:, 0, :2]
  with jax.numpy_dtype_promotion("standard"):  # Flax's norms and attention
    variables = jax.eval_shape(Net().init, jax.random.key(0), X)
  expected = {"Dense_0/kernel", "Dense_1/kernel", "Conv_0/kernel",
              *(f"MultiHeadDotProductAttention_0/{p}/kernel"
                for p in ("query", "key", "value", "out"))}
  assert selected(nas.weights_only(variables["params"])) == expected
  assert selected(nas.weights_only(variables)) == {f"params/{p}" for p in expected}


def test_weights_only_nnx_state_names_and_kernel():
  class Net(nnx.Module):
    def __init__(self, rngs):
      self.lin = fx.Linear(D, W, param_dtype=F64, rngs=rngs)
      self.plain = nnx.Linear(W, O, param_dtype=F64, rngs=rngs)
      self.norm = nnx.LayerNorm(W, param_dtype=F64, rngs=rngs)
      self.bn = nnx.BatchNorm(W, use_running_average=True, param_dtype=F64, rngs=rngs)
      self.emb = nnx.Embed(5, W, param_dtype=F64, rngs=rngs)
      self.conv = nnx.Conv(1, 1, (3,), param_dtype=F64, rngs=rngs)

    def __call__(self, x):
      h = self.bn(self.norm(jnp.tanh(self.lin(x))))
      h = h + self.emb(jnp.zeros(x.shape[:1], jnp.int32))
      return self.plain(self.conv(h[..., None])[..., 0])

  model = Net(nnx.Rngs(0))
  graphdef, params, *rest = nnx.split(model, nnx.Param, ...)
  mask = nas.weights_only(params)
  assert selected(mask) == {"lin/kernel", "plain/kernel", "conv/kernel"}
  # The mask is accepted by the NNX entry point: the kernel of those leaves only.
  with jax.numpy_dtype_promotion("standard"):  # Flax's norms
    K = fx.ntk_fn(trainable=nas.weights_only)((graphdef, params, *rest), X)
  leaves = jax.tree.leaves(mask)

  def f_weights(ws, x):
    full = jax.tree.unflatten(jax.tree.structure(params), [
        w if m else p for w, m, p in zip(ws, leaves, jax.tree.leaves(params))])
    return nnx.merge(graphdef, full, *rest)(x)
  with jax.numpy_dtype_promotion("standard"):
    jac = jax.jacrev(f_weights)(jax.tree.leaves(params), X)
  flat = jnp.concatenate([j.reshape(N * O, -1) for j, m in zip(jac, leaves) if m], -1)
  np.testing.assert_allclose(nm.flatten(K), flat @ flat.T, rtol=1e-10, atol=1e-12)


# ----------------------------------------------------------- known kernels ---


def test_functional_scores_on_a_linear_layer():
  net = hk.without_apply_rng(hk.transform(lambda x: ntklayers.Linear(O)(x)))
  params = net.init(jax.random.key(1), X)
  gram = X @ X.T
  np.testing.assert_allclose(nas.te_nas_kernel(net.apply, params, X), O * gram, rtol=1e-12)
  np.testing.assert_allclose(nas.te_nas_kappa(net.apply, params, X),
                             np_kappa(O * gram), rtol=1e-8)
  np.testing.assert_allclose(nas.kappa(net.apply, params, X), np_kappa(gram + 1), rtol=1e-8)
  np.testing.assert_allclose(nas.trace_norm(net.apply, params, X),
                             O * float(jnp.sum(X ** 2) + N), rtol=1e-12)
  for centered in (False, True):
    np.testing.assert_allclose(
        nas.label_alignment(net.apply, params, X, LABELS, centered=centered),
        np_alignment(gram + 1, LABELS, centered), rtol=1e-10)


class LinenLinear(nn.Module):
  @nn.compact
  def __call__(self, x):
    return fl.Dense(O, param_dtype=F64)(x)


class NnxLinear(nnx.Module):
  def __init__(self, rngs, features=O):
    self.out = fx.Linear(D, features, param_dtype=F64, rngs=rngs)

  def __call__(self, x):
    return self.out(x)


def _stateful_linear(x):
  count = hk.get_state("count", [], jnp.int32, init=jnp.zeros)
  hk.set_state("count", count + 1)
  return ntklayers.Linear(O)(x)


@pytest.mark.parametrize("candidate,kind,framework", [
    (lambda x: ntklayers.Linear(O)(x), None, "haiku"),
    (hk.transform(lambda x: ntklayers.Linear(O)(x)), None, "haiku"),  # apply takes an rng
    (hk.transform_with_state(_stateful_linear), None, "haiku"),
    (LinenLinear(), None, "linen"),
    (NnxLinear, None, "nnx"),                                      # an nnx.Module class
    (functools.partial(NnxLinear, features=O), None, "nnx"),
    (lambda r: NnxLinear(r), "nnx", "nnx"),                        # no `rngs`: kind given
], ids=["hk_fn", "hk_transformed", "hk_with_state", "linen", "nnx_class", "nnx_partial",
        "nnx_kind"])
def test_scorer_on_linear_candidates_of_every_kind(candidate, kind, framework):
  scorer = nas.Scorer(X, LABELS, repeats=2)
  result = scorer(candidate, kind=kind)
  assert result.framework == framework and not result.rejected and result.reason == ""
  gram = np.asarray(X @ X.T)
  expected = {"te_nas_kappa": np_kappa(gram), "kappa": np_kappa(gram + 1),
              "trace_norm": O * (np.sum(gram.diagonal()) + N),
              "alignment": np_alignment(gram + 1, LABELS, False),
              "centered_alignment": np_alignment(gram + 1, LABELS, True)}
  assert set(result.values) == set(nas.SCORES)
  for name, value in expected.items():
    assert len(result.values[name]) == 2
    np.testing.assert_allclose(result.values[name], value, rtol=1e-7, err_msg=name)
    np.testing.assert_allclose(result.means[name], value, rtol=1e-7, err_msg=name)
    assert result.stds[name] < 1e-6 * abs(value)


# --------------------------------------------------------------- trace norm ---


def _mlp(layer):
  def fn(x):
    return layer(O)(jnp.tanh(layer(W)(x)))
  return fn


def _mixed(x):
  return hk.Linear(O)(jnp.tanh(ntklayers.Linear(W)(x)))


def _coupled(x):  # batch centering: examples interact
  return _mlp(ntklayers.Linear)(x - jnp.mean(x, axis=0, keepdims=True))


@pytest.mark.parametrize("fn", [_mlp(ntklayers.Linear), _mlp(hk.Linear), _mixed, _coupled],
                         ids=["dropin", "plain", "mixed", "coupled"])
def test_trace_norm_is_the_trace_and_linear_in_memory(fn):
  net = hk.without_apply_rng(hk.transform(fn))
  params = net.init(jax.random.key(2), X)
  np.testing.assert_allclose(nas.trace_norm(net.apply, params, X),
                             nm.trace(ntklayers.ntk(net.apply, params, X)), rtol=1e-10)
  temp = []
  for n in (32, 128):
    x = jax.random.normal(jax.random.key(n), (n, D), F64)
    compiled = jax.jit(lambda p, x: nas.trace_norm(net.apply, p, x)).lower(params, x).compile()
    temp.append(compiled.memory_analysis().temp_size_in_bytes)
  assert temp[1] / temp[0] < 6, temp  # 4x the examples: linear, not 16x


# ----------------------------------------------------- repeats and seeding ---


def test_repeats_are_deterministic_per_seed():
  pool = jax.random.normal(jax.random.key(3), (16, D), F64)
  fn = _mlp(ntklayers.Linear)
  kwargs = dict(scores=("te_nas_kappa", "trace_norm"), repeats=3, batch_size=8)
  a = nas.Scorer(pool, seed=0, **kwargs)(fn)
  b = nas.Scorer(pool, seed=0, **kwargs)(fn)
  c = nas.Scorer(pool, seed=1, **kwargs)(fn)
  assert a == dataclass_without_time(b, a.seconds)
  for name in kwargs["scores"]:
    values = np.array(a.values[name])
    assert values.shape == (3,) and len(set(values)) == 3   # seeds differ per repeat
    assert a.values[name] != c.values[name]
    np.testing.assert_allclose(a.means[name], values.mean(), rtol=1e-12)
    np.testing.assert_allclose(a.stds[name], values.std(ddof=1), rtol=1e-12)


# ------------------------------------------------ search loop, rejections ---


class LinenMLP(nn.Module):
  @nn.compact
  def __call__(self, x):
    return fl.Dense(O, param_dtype=F64)(jnp.tanh(fl.Dense(W, param_dtype=F64)(x)))


class NnxMLP(nnx.Module):
  def __init__(self, rngs):
    self.a = fx.Linear(D, 2 * W, param_dtype=F64, rngs=rngs)
    self.b = fx.Linear(2 * W, O, param_dtype=F64, rngs=rngs)

  def __call__(self, x):
    return self.b(jnp.tanh(self.a(x)))


def test_search_loop_and_rank_with_rejections():
  scorer = nas.Scorer(X, repeats=2, scores=("te_nas_kappa", "trace_norm"))
  candidates = {"haiku": _mlp(ntklayers.Linear), "linen": LinenMLP(),
                "nnx": lambda rngs: NnxMLP(rngs),
                "nan": lambda x: ntklayers.Linear(O)(x) * jnp.nan}
  results = {}
  for key, candidate in candidates.items():          # a plain search loop
    results[key] = scorer(candidate)
  assert [results[k].framework for k in candidates] == ["haiku", "linen", "nnx", "haiku"]
  assert results["nan"].rejected and "non-finite outputs" in results["nan"].reason
  assert all(np.isnan(v) for v in results["nan"].means.values())
  ranked = scorer.rank(candidates, by="trace_norm", progress=True)
  assert [r.key for r in ranked][-1] == "nan"
  traces = [r.result.means["trace_norm"] for r in ranked[:3]]
  assert traces == sorted(traces, reverse=True)                # higher is better
  assert [r.result for r in ranked[:3]] == [dataclass_without_time(results[r.key],
                                                                   r.result.seconds)
                                            for r in ranked[:3]]
  by_kappa = sorted(results, key=lambda k: results[k].sort_key("te_nas_kappa"))
  kappas = [results[k].means["te_nas_kappa"] for k in by_kappa[:3]]
  assert kappas == sorted(kappas) and by_kappa[-1] == "nan"   # lower is better


def test_rejection_on_kappa_and_on_nonfinite_gradients():
  scorer = nas.Scorer(X, repeats=3, max_kappa=1.0 + 1e-9)
  result = scorer(_mlp(ntklayers.Linear))
  assert result.rejected and "max_kappa" in result.reason
  assert len(result.values["te_nas_kappa"]) == 1 and result.values["kappa"] == ()
  assert np.isnan(result.means["kappa"])

  def nan_gradients(x):
    out = ntklayers.Linear(O)(x)
    return out + jnp.sqrt(jnp.abs(out) * 0)          # finite outputs, NaN gradients
  result = nas.Scorer(X, repeats=2)(nan_gradients)
  assert result.rejected and "non-finite te_nas kernel" in result.reason


def test_plain_layers_are_recognized_and_exact():
  scores = ("te_nas_kappa", "kappa")
  plain, dropin = _mlp(hk.Linear), _mlp(ntklayers.Linear)
  with warnings.catch_warnings():
    warnings.simplefilter("error")  # stock hk.Linear: recognized, no fallback warning
    result = nas.Scorer(X, repeats=1, scores=scores)(plain)
  expected = nas.Scorer(X, repeats=1, scores=scores)(dropin)   # same names, same init
  for name in scores:
    np.testing.assert_allclose(result.values[name], expected.values[name], rtol=1e-9)


def test_unrecognized_layers_warn_once():
  scores = ("te_nas_kappa", "kappa")

  def custom(x):  # a parameter transformed before use: no pattern, the fallback
    w = hk.get_parameter("w", (x.shape[-1], O), x.dtype, init=hk.initializers.RandomNormal())
    return jnp.tanh(x) @ jnp.sin(w)

  scorer = nas.Scorer(X, repeats=1, scores=scores)
  with pytest.warns(nas.FallbackWarning, match=r"\['~'\]"):
    result = scorer(custom)
  assert not result.rejected, result.reason
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    again = scorer(custom)                            # once per scorer
  for name in scores:
    assert np.all(np.isfinite(result.values[name]))
    np.testing.assert_allclose(result.values[name], again.values[name], rtol=1e-12)


# ------------------------------------------------------------------- errors ---


def test_argument_errors():
  with pytest.raises(TypeError, match="`candidate` must be .* got int"):
    nas.Scorer(X)(42)
  with pytest.raises(TypeError, match="constructor"):
    nas.Scorer(X)(NnxMLP(nnx.Rngs(0)))
  with pytest.raises(TypeError, match="pass an instance"):
    nas.Scorer(X)(LinenMLP)
  with pytest.raises(ValueError, match="unknown score.*'kapa'"):
    nas.Scorer(X, scores=("kapa",))
  with pytest.raises(ValueError, match="`repeats` must be an int >= 1"):
    nas.Scorer(X, repeats=0)
  with pytest.raises(ValueError, match="need labels"):
    nas.Scorer(X, scores=("alignment",))
  with pytest.raises(ValueError, match="`y_probe`"):
    nas.Scorer(X, LABELS[:3])
  with pytest.raises(ValueError, match="`batch_size`"):
    nas.Scorer(X, batch_size=N + 1)
  with pytest.raises(ValueError, match="`kind`"):
    nas.Scorer(X)(LinenMLP(), kind="torch")
  with pytest.raises(ValueError, match="`by` must be one of the computed scores"):
    nas.Scorer(X, scores=("trace_norm",)).rank([], by="kappa")
