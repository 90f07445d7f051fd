"""neural-tangents' ``monte_carlo_kernel_fn``: empirical kernels averaged over random
initializations, with neural-tangents' keys (so the same ``init_fn`` and ``key``
draw the same networks, given the same PRNG implementation).

Sample ``n`` (from 1): ``key, split = split(key)``; ``init_key, dropout_key =
split(split)``; ``params = init_fn(init_key, input shapes)[1]``; its kernels are
those of ``empirical_kernel_fn`` (or of ``batch`` of it when ``batch_size > 0``)
called with ``rng=dropout_key``; the estimate after ``n`` samples is their mean.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any

import jax

from ntklayers.compat import _batch
from ntklayers.compat import _empirical


def canonicalize_n_samples(n_samples: Any) -> tuple[frozenset[int], bool]:
  """``(sample counts to report, whether to yield them)``."""
  if isinstance(n_samples, int) and not isinstance(n_samples, bool):
    if n_samples < 1:
      raise ValueError(f"`n_samples` must be a positive int, got {n_samples}.")
    return frozenset({n_samples}), False
  if isinstance(n_samples, Iterable) and not isinstance(n_samples, str):
    counts = frozenset(int(n) for n in n_samples)
    if not counts or min(counts) < 1:
      raise ValueError(f"`n_samples` must be positive ints, got {n_samples!r}.")
    return counts, True
  raise TypeError(f"`n_samples` must be an int or an iterable of ints, got {n_samples!r}.")


def monte_carlo(init_fn: Callable, emp: _empirical.Empirical, key: Any, n_samples: Any,
                batch_size: int, store_on_device: bool) -> Callable:
  """``kernel_fn(x1, x2=None, get=None, **apply_fn_kwargs)`` (module docstring)."""
  if not callable(init_fn):
    raise TypeError(f"`init_fn` must be callable as init_fn(key, input_shape), got "
                    f"{type(init_fn).__name__}.")
  counts, generator = canonicalize_n_samples(n_samples)

  def one(x1: Any, x2: Any, get: Any, k: Any, kwargs: dict[str, Any]) -> Any:
    init_key, dropout_key = jax.random.split(k, 2)
    _, params = init_fn(init_key, jax.tree.map(lambda a: a.shape, x1))
    kwargs = {**kwargs, "rng": dropout_key}
    if batch_size:
      return _batch.blocked(emp, get, x1, x2, params, kwargs, batch_size, store_on_device)
    return emp(get, x1, x2, params, kwargs)

  def samples(x1: Any, x2: Any, get: Any, kwargs: dict[str, Any]) -> Iterator[tuple[int, Any]]:
    k, total = key, None
    for n in range(1, max(counts) + 1):
      k, split = jax.random.split(k)
      sample = one(x1, x2, get, split, kwargs)
      total = sample if total is None else jax.tree.map(lambda a, b: a + b, total, sample)
      if n in counts:
        yield n, jax.tree.map(lambda a, n=n: a / n, total)

  if generator:
    def kernel_fn_generator(x1: Any, x2: Any = None, get: Any = None,
                            **apply_fn_kwargs: Any) -> Iterator[Any]:
      return (estimate for _, estimate in samples(x1, x2, get, apply_fn_kwargs))
    return kernel_fn_generator

  def kernel_fn(x1: Any, x2: Any = None, get: Any = None, **apply_fn_kwargs: Any) -> Any:
    last = None
    for _, last in samples(x1, x2, get, apply_fn_kwargs):  # noqa: B007  (the last is kept)
      pass
    return last

  return kernel_fn
