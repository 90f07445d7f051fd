"""Canonical weights: generated once per model, mapped onto every framework's tree.

A model's canonical weights are a flat dict ``{"module/leaf": np.ndarray}`` (layouts
in ``plain.py``). Their keys and shapes come from the model's Haiku form (its
``init`` under ``jax.eval_shape``: parameters, and BatchNorm moving averages as
``module/mean`` and ``module/var``); their values are NumPy random numbers seeded
by the key, so every form of a model, in every framework and in
neural-tangents' environment, gets the same weights without shipping them:

* ``w``: ``N(0, 1 / fan_in)``; ``b``, ``offset``: ``N(0, 0.1^2)``; ``scale``:
  ``1 + N(0, 0.1^2)``; moving ``mean``: ``N(0, 0.1^2)``, ``var``: ``1 + U(0, 0.5)``;
  ``embeddings``: ``N(0, 1)``; ``pos``: ``N(0, 0.5^2)``.

Per framework, each leaf of the framework's own tree is *looked up* by its
canonical key (so a leaf without a canonical twin, or a canonical key used twice
or never, is an error) and reshaped or transposed into the framework's layout:
linen/NNX name ``kernel``/``bias``/``embedding`` and attention's output projection
``out``; Equinox stores ``weight [out, in]`` (conv ``[O, I, H, W]``) and names
attention's projections ``query_proj`` ... ``output_proj``.

``save`` / ``load``: the ``.npz`` exchange with ``nt_side.py`` (canonical
weights, the inputs, the reference outputs).
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np

Canonical = dict[str, np.ndarray]
_VECTORS = ("scale", "offset", "mean", "var")  # per-channel leaves, canonical [C]


def _normal(key: str, seed: int) -> np.random.RandomState:
  return np.random.RandomState(zlib.crc32(f"{seed}:{key}".encode()))


def generate(shapes: dict[str, tuple[int, ...]], dtype: Any, seed: int = 0) -> Canonical:
  """Deterministic values for canonical ``{key: shape}`` (see the module docstring)."""
  out = {}
  for key, shape in sorted(shapes.items()):
    leaf = key.rsplit("/", 1)[-1]
    rng = _normal(key, seed)
    z = rng.standard_normal(shape)
    if leaf == "w":
      v = z / np.sqrt(max(1, int(np.prod(shape[:-1]))))
    elif leaf == "scale":
      v = 1.0 + 0.1 * z
    elif leaf == "var":
      v = 1.0 + 0.5 * rng.uniform(size=shape)
    elif leaf == "embeddings":
      v = z
    elif leaf == "pos":
      v = 0.5 * z
    else:  # b, offset, mean, anything else
      v = 0.1 * z
    out[key] = np.asarray(v, dtype)
  return out


# ------------------------------------------------------------------ Haiku ---


def haiku_shapes(params: Any, state: Any) -> dict[str, tuple[int, ...]]:
  """Canonical ``{key: shape}`` of Haiku ``params`` and BatchNorm ``state``."""
  shapes = {}
  for module, leaves in params.items():
    for name, leaf in leaves.items():
      shape = tuple(leaf.shape)
      shapes[f"{module}/{name}"] = (int(np.prod(shape)),) if name in _VECTORS else shape
  for module, leaves in (state or {}).items():
    stat = _haiku_stat(module)
    if stat is not None:
      shapes[f"{module.rsplit('/~/', 1)[0]}/{stat}"] = (int(np.prod(leaves["average"].shape)),)
  return shapes


def _haiku_stat(module: str) -> str | None:
  for suffix, stat in (("/~/mean_ema", "mean"), ("/~/var_ema", "var")):
    if module.endswith(suffix):
      return stat
  return None


def to_haiku(canon: Canonical, params: Any, state: Any,
             convert: Callable[[np.ndarray], Any] = np.asarray) -> tuple[Any, Any]:
  """Haiku ``(params, state)`` with the canonical values (shapes of the templates).

  ``state`` leaves other than the moving averages (``hidden``, ``counter``) keep
  zeros (unused in inference); ``convert`` makes the arrays (``jnp.asarray``).
  """
  used: set[str] = set()

  def take(key, like):
    used.add(key)
    return convert(_reshaped(canon, key, like.shape))

  new_params = {m: {n: take(f"{m}/{n}", v) for n, v in leaves.items()}
                for m, leaves in params.items()}
  new_state = {}
  for module, leaves in (state or {}).items():
    stat = _haiku_stat(module)
    new_state[module] = {k: convert(np.zeros(v.shape, v.dtype)) for k, v in leaves.items()}
    if stat is not None:
      key = f"{module.rsplit('/~/', 1)[0]}/{stat}"
      new_state[module]["average"] = take(key, leaves["average"])
  _all_used(canon, used)
  return new_params, new_state


# ------------------------------------------------------------ Flax, eqx ---


def _reshaped(canon: Canonical, key: str, shape: tuple[int, ...]) -> np.ndarray:
  if key not in canon:
    raise KeyError(f"no canonical weight {key!r} (have {sorted(canon)[:8]}...)")
  v = canon[key]
  if v.size != int(np.prod(shape)):
    raise ValueError(f"{key}: canonical shape {v.shape} does not fit {tuple(shape)}")
  return v.reshape(shape)


def _all_used(canon: Canonical, used: set[str]) -> None:
  unused = sorted(set(canon) - used)
  if unused:
    raise ValueError(f"canonical weights not used by the framework's tree: {unused}")


_FLAX_MODULES = {"out": "linear"}
_FLAX_LEAVES = {"kernel": "w", "embedding": "embeddings"}


def flax_key(canon: Canonical, path: Iterable[str]) -> str:
  """The canonical key of a Flax (linen or NNX) leaf at ``path`` (collection
  name excluded): module names joined by ``/``, ``out`` -> ``linear``; ``kernel`` ->
  ``w``; ``bias`` -> ``b`` (dense, conv) or ``offset`` (norms)."""
  *modules, leaf = [str(p) for p in path]
  if modules:
    modules[-1] = _FLAX_MODULES.get(modules[-1], modules[-1])
  module = "/".join(modules)
  if leaf == "bias":
    leaf = "b" if f"{module}/b" in canon else "offset"
  return f"{module}/{_FLAX_LEAVES.get(leaf, leaf)}"


def to_linen(canon: Canonical, template: Any,
             convert: Callable[[np.ndarray], Any] = np.asarray) -> dict:
  """Linen ``variables`` (``params``, ``batch_stats``) shaped like ``template``."""
  used: set[str] = set()

  def fill(tree, path):
    if isinstance(tree, dict) or hasattr(tree, "items"):
      return {k: fill(v, path + (k,)) for k, v in tree.items()}
    key = flax_key(canon, path)
    used.add(key)
    return convert(_reshaped(canon, key, tree.shape))

  out = {col: fill(tree, ()) for col, tree in template.items()}
  _all_used(canon, used)
  return out


_EQX_MODULES = {"query_proj": "query", "key_proj": "key", "value_proj": "value",
                "output_proj": "linear"}


def eqx_value(canon: Canonical, path: list[str], shape: tuple[int, ...]) -> tuple[str, np.ndarray]:
  """``(canonical key, value in Equinox's layout)`` of the leaf at ``path``
  (``["layers", "b0_attn", "query_proj", "weight"]``; the container's name first)."""
  *modules, leaf = path
  modules = [_EQX_MODULES.get(m, m) for m in modules[1:]]
  module = "/".join(modules)
  if leaf == "weight" and f"{module}/w" in canon:
    w = canon[f"{module}/w"]
    return f"{module}/w", (w.T if w.ndim == 2 else np.transpose(w, (3, 2, 0, 1)))
  if leaf == "weight":
    key = f"{module}/embeddings" if f"{module}/embeddings" in canon else f"{module}/scale"
  elif leaf == "bias":
    key = f"{module}/b" if f"{module}/b" in canon else f"{module}/offset"
  else:
    key = f"{module}/{leaf}"
  return key, _reshaped(canon, key, shape)


def fill_paths(canon: Canonical, leaves: list[tuple[list[str], Any]],
               value: Callable[[Canonical, list[str], tuple[int, ...]], tuple[str, np.ndarray]]
               ) -> list[np.ndarray]:
  """Canonical values for ``[(path, leaf)]`` by ``value``; every key used once."""
  used: set[str] = set()
  out = []
  for path, leaf in leaves:
    key, v = value(canon, path, tuple(leaf.shape))
    if key in used:
      raise ValueError(f"canonical weight {key!r} read twice")
    used.add(key)
    if v.shape != tuple(leaf.shape):
      raise ValueError(f"{key}: {v.shape} vs the framework's {tuple(leaf.shape)}")
    out.append(v)
  _all_used(canon, used)
  return out


def path_names(path: tuple) -> list[str]:
  """A ``jax.tree_util`` key path as plain strings."""
  return [str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path]


# ------------------------------------------------------------------ files ---


def save(path: str, canon: Canonical, x: np.ndarray, out: np.ndarray, **meta: Any) -> None:
  """Writes canonical weights (``w:`` keys), inputs, reference outputs and metadata."""
  arrays = {f"w:{k}": v for k, v in canon.items()}
  arrays.update({"x": np.asarray(x), "out": np.asarray(out)})
  arrays.update({f"meta:{k}": np.asarray(v) for k, v in meta.items()})
  np.savez(path, **arrays)


def load(path: str) -> tuple[Canonical, np.ndarray, np.ndarray, dict[str, Any]]:
  """``(canonical weights, x, reference outputs, metadata)`` from :func:`save`'s file."""
  with np.load(path) as data:
    canon = {k[2:]: data[k] for k in data.files if k.startswith("w:")}
    meta = {k[5:]: data[k].item() if data[k].ndim == 0 else data[k]
            for k in data.files if k.startswith("meta:")}
    return canon, data["x"], data["out"], meta
