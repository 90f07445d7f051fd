"""GP posteriors of the NNGP, the NTK (infinite-time ensemble) and the NTK-GP."""

from __future__ import annotations

import collections
import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from ntklayers.predict import _checks as C
from ntklayers.predict._layout import Axes, Layout, first_field, get_field, has_field, shape_str
from ntklayers.predict._mse import Factorization

HIGHEST = jax.lax.Precision.HIGHEST
GETS = ("nngp", "ntk", "ntkgp")


class Gaussian(NamedTuple):
  """``(mean, covariance)`` of a Gaussian (neural-tangents' ``predict.Gaussian``).

  Attributes:
    mean: ``[N_test, O]`` (the outputs' layout).
    covariance: ``[N_test, N_test]`` (``trace_axes=(-1,)``) or
      ``[N_test, N_test, O, O]`` (``trace_axes=()``): the kernels' layout.
  """
  mean: Any
  covariance: Any


@functools.lru_cache(maxsize=None)
def gaussians_type(fields: tuple[str, ...]) -> type:
  """The ``Gaussians`` namedtuple with ``fields`` (one class per field tuple)."""
  return collections.namedtuple("Gaussians", fields)


def canonicalize_get(get: Any) -> tuple[bool, tuple[str, ...]]:
  """``(single, gets)``: ``None`` -> both; a string -> one value; a tuple -> a namedtuple."""
  if get is None:
    return False, ("nngp", "ntk")
  single = isinstance(get, str)
  gets = (get,) if single else tuple(get)
  if not gets:
    raise ValueError("`get` must be non-empty.")
  gets = tuple(str(g).lower() for g in gets)
  bad = [g for g in gets if g not in GETS]
  if bad:
    raise ValueError(f"`get` entries must be among {GETS}, got {bad}.")
  if len(set(gets)) < len(gets):
    raise ValueError(f"`get` entries must be unique, got {gets}.")
  return single, gets


def pack(out: dict[str, Any], single: bool, gets: tuple[str, ...]) -> Any:
  if single:
    return out[gets[0]]
  return gaussians_type(gets)(*(out[g] for g in gets))


def square_2d(layout: Layout, k: Any, rows: tuple[int, ...], name: str) -> Any:
  """``[M_test, M_test]`` from a test-test kernel (validated against ``rows``)."""
  shape = tuple(int(s) for s in np.shape(k))
  want = tuple(s for r in rows for s in (r, r))
  if shape != want:
    raise ValueError(f"`{name}` has shape {shape_str(shape)}, expected {shape_str(want)} "
                     f"(test-test kernel of the {rows[0]} test examples; {layout.hint()}).")
  nd = len(shape)
  k = jnp.transpose(jnp.asarray(k), tuple(range(0, nd, 2)) + tuple(range(1, nd, 2)))
  m = int(np.prod(rows))
  return k.reshape(m, m)


def gp_inference(k_train_train: Any, y_train: Any, diag_reg: float = 0.,
                 diag_reg_absolute_scale: bool = False, trace_axes: Axes = (-1,)) -> Any:
  r"""Posterior mean and covariance of the NNGP / NTK / NTK-GP on a test set.

  neural-tangents' ``predict.gp_inference`` for kernels given as arrays. With
  ``A = K_td (K + diag_reg I)⁻¹``: the mean is ``A y``; the covariance is
  ``K_tt - A K_tdᵀ`` for ``"nngp"`` (NNGP kernels) and ``"ntkgp"`` (NTK kernels),
  and for ``"ntk"`` (the infinite-time ensemble of networks trained with gradient
  flow) ``K_tt^nngp + A K^nngp Aᵀ - (A K_td^nngpᵀ + K_td^nngp Aᵀ)`` with ``A``
  from the NTK, which needs both kernels. One Cholesky factorization per kernel
  is computed on first use and cached.

  Args:
    k_train_train: train-train kernel ``[N_train, N_train]`` (or
      ``[N_train, N_train, O, O]`` with ``trace_axes=()``): an array (used for every
      ``get``), or a namedtuple / dict with ``nngp`` and/or ``ntk`` fields.
    y_train: targets ``[N_train, O]`` (any ``[N_train, ...]``).
    diag_reg: ``>= 0``, added to the train-train kernel's diagonal.
    diag_reg_absolute_scale: ``True``: absolute; ``False``: times the mean diagonal.
    trace_axes: axes of ``y_train`` that the kernels lack (never 0).

  Returns:
    ``predict_fn(get=None, k_test_train=None, k_test_test=None)``. ``get``:
    ``"nngp"``, ``"ntk"``, ``"ntkgp"`` (one result) or a tuple of them (a
    namedtuple ``Gaussians`` with those fields); ``None`` = ``("nngp", "ntk")``.
    ``k_test_train`` ``[N_test, N_train(, O, O)]`` (``None``: the train set, whose
    posterior is ``N(y_train, 0)``); ``k_test_test`` ``[N_test, N_test(, O, O)]``
    (the NNGP's for ``"nngp"`` / ``"ntk"``, the NTK's for ``"ntkgp"``): with it,
    each result is a :class:`Gaussian`, without it the mean ``[N_test, O]``.

  Raises:
    ValueError: mismatched shapes, a missing ``nngp`` / ``ntk`` kernel, a bad
      ``get``; ``NotPositiveSemidefiniteError`` for an indefinite or singular
      train-train kernel (use ``diag_reg``).

  Example:
    >>> import jax.numpy as jnp, ntklayers.predict as npr
    >>> k = jnp.array([[2., 1.], [1., 2.]])
    >>> y = jnp.array([[1.], [-1.]])
    >>> predict_fn = npr.gp_inference(k, y)
    >>> k_td, k_tt = jnp.array([[1., 0.5]]), jnp.array([[1.]])
    >>> mean, cov = predict_fn("nngp", k_td, k_tt)
    >>> mean, cov
    (Array([[0.5]], dtype=float64), Array([[0.5]], dtype=float64))
  """
  reg = C.check_diag_reg(diag_reg)
  y_train = C.check_array(y_train, "y_train")
  layout = Layout(y_train.shape, trace_axes)
  first = C.check_array(first_field(k_train_train, "k_train_train"), "k_train_train")
  dtype = C.float_dtype(first.dtype)
  y = jnp.asarray(y_train).astype(dtype)
  y2 = layout.targets_2d(y)
  absolute = bool(diag_reg_absolute_scale)
  cache: dict[str, Any] = {}

  def train_2d(g: str) -> Any:
    key = "k2_" + g
    if key not in cache:
      name = "k_train_train" if isinstance(k_train_train, (np.ndarray, jax.Array)) else (
          f"k_train_train.{g}")
      k = C.check_array(get_field(k_train_train, g, "k_train_train"), name)
      k2 = jnp.asarray(layout.kernel_2d(k, name, square=True), dtype)
      C.check_symmetric(k2, name)
      cache[key] = k2
      cache["fact_" + g] = Factorization(k2, reg, absolute, name)
    return cache[key]

  def solve(g: str, b2: Any) -> Any:
    train_2d(g)
    return cache["fact_" + g].solve(b2)

  def k_inv_y(g: str) -> Any:
    if "kinvy_" + g not in cache:
      with jax.ensure_compile_time_eval():
        cache["kinvy_" + g] = solve(g, y2)
    return cache["kinvy_" + g]

  def test_2d(k: Any, g: str, name: str) -> tuple[Any, tuple[int, ...]]:
    sub = name if isinstance(k, (np.ndarray, jax.Array)) else f"{name}.{g}"
    kg = C.check_array(get_field(k, g, name), sub)
    rows = layout.check_kernel(kg, sub, square=False)
    return jnp.asarray(layout.kernel_2d(kg, sub), dtype), rows

  def predict_fn(get: Any = None, k_test_train: Any = None, k_test_test: Any = None) -> Any:
    single, gets = canonicalize_get(get)
    out: dict[str, Any] = {}
    for g in gets:
      kk = "ntk" if g == "ntkgp" else g
      train_2d(kk)  # validates the train kernel of this `get`
      if k_test_train is None:
        mean = y
        rows = layout.kept_shape
      else:
        ktd2, rows = test_2d(k_test_train, kk, "k_test_train")
        mean = layout.outputs(jnp.matmul(ktd2, k_inv_y(kk), precision=HIGHEST), rows)
      if k_test_test is None:
        out[g] = mean
        continue
      if k_test_train is None:
        out[g] = Gaussian(mean, jnp.zeros(np.shape(get_field(k_train_train, kk, "")), dtype))
        continue
      if g == "ntk" and not (has_field(k_train_train, "nngp") and
                             has_field(k_test_train, "nngp")):
        raise ValueError(
            "The NTK posterior covariance (`get` with 'ntk' and `k_test_test` given) needs "
            "both NTK and NNGP kernels: pass `k_train_train` and `k_test_train` as "
            "namedtuples / dicts with `nngp` and `ntk` fields (and the NNGP as "
            "`k_test_test`).")
      g_init = "ntk" if g == "ntkgp" else "nngp"
      ktd_init2, _ = test_2d(k_test_train, g_init, "k_test_train")
      ktt_name = "k_test_test" if isinstance(k_test_test, (np.ndarray, jax.Array)) else (
          f"k_test_test.{g_init}")
      ktt2 = jnp.asarray(square_2d(layout, get_field(k_test_test, g_init, "k_test_test"),
                                   rows, ktt_name), dtype)
      b = solve(kk, ktd_init2.T)  # K⁻¹ K_td_initᵀ [M, M_test]
      cross = jnp.matmul(ktd2, b, precision=HIGHEST)
      if g in ("nngp", "ntkgp"):
        cov2 = ktt2 - cross
      else:
        a_t = solve(kk, ktd2.T)  # Aᵀ [M, M_test]
        knngp = train_2d("nngp")
        cov2 = jnp.matmul(a_t.T, jnp.matmul(knngp, a_t, precision=HIGHEST), precision=HIGHEST)
        cov2 = cov2 - cross - cross.T + ktt2
      out[g] = Gaussian(mean, layout.covariance(cov2, rows))
    return pack(out, single, gets)

  return predict_fn
