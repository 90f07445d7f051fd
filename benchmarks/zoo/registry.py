"""Zoo models by name, framework and form, all on the same canonical weights.

``build(arch, framework, form, size)`` returns a :class:`ZooModel`: the model as
``apply(params, x) -> [N, O]`` on the tree its framework's kernel entry point
differentiates, the batch, and ``kernel_fn(implementation)``, the framework's
public kernel function as ``(params, x) -> [N, N, O, O]``:

* ``haiku``: ``ntklayers.ntk_fn(apply)`` with ``apply = net.apply(p, state, x)[0]``
  (BatchNorm statistics held fixed);
* ``linen``: ``ntklayers.flax.ntk_fn(module)`` on ``{"params": p, "batch_stats": ...}``;
* ``nnx``: ``ntklayers.flax.nnx.ntk_fn()`` on ``(graphdef, params, *rest)``;
* ``eqx``: ``ntklayers.ntk_fn`` of ``jax.vmap(eqx.combine(params, static))`` with the
  inexact-array leaves of the model (``eqx.partition``) as a dict by path (the
  Equinox entry point, when ``ntklayers.equinox`` exists, is form ``entry``);
* ``plain``: ``ntklayers.ntk_fn`` of ``plain.apply`` on the trainable canonical
  weights (the model neural-tangents runs).

Forms: ``dropin`` (ntklayers' annotated layers) and ``stock`` (the framework's
own layers, or plain ``jax.numpy``).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

import ntklayers

from . import hk_models
from . import plain
from . import weights as W

# Frameworks and forms per zoo model (those that are natural or cheap).
_ALL = ("haiku", "linen", "plain")
FRAMEWORKS: dict[str, tuple[str, ...]] = {
    "mlp": _ALL + ("nnx", "eqx"), "cnn": _ALL + ("nnx",), "transformer": _ALL + ("eqx",),
    "resnet": _ALL + ("nnx",), "resnet18": _ALL, "wrn": _ALL, "vit": _ALL + ("eqx",),
    "mixer": _ALL + ("nnx", "eqx"), "gpt": _ALL + ("eqx",), "hk_resnet18": ("haiku",)}
DESCRIPTIONS = {
    "mlp": "ReLU MLP", "cnn": "CNN, 3 convs + dense", "transformer": "pre-LN transformer block",
    "resnet": "small CIFAR ResNet (BN inference)", "resnet18": "CIFAR ResNet-18 (BN inference)",
    "wrn": "WideResNet, pre-activation (BN inference)", "vit": "ViT (patches, pre-LN, MLP head)",
    "mixer": "MLP-Mixer", "gpt": "small GPT (RMSNorm, causal, tied decoder)",
    "hk_resnet18": "Haiku's own hk.nets.ResNet18, unmodified (BN inference)"}


def forms(arch: str, framework: str) -> tuple[str, ...]:
  """The forms of ``arch`` in ``framework``."""
  if framework == "plain":
    return ("stock",)
  if framework == "eqx":
    return ("stock", "entry") if _eqx_entry() is not None else ("stock",)
  return ("dropin", "stock")


@dataclasses.dataclass
class ZooModel:
  """One form of one zoo model, ready to time."""

  arch: str
  framework: str
  form: str
  size: str
  cfg: Any
  apply: Callable[[Any, Any], jax.Array]
  params: Any
  x: Any
  kernel_factory: Callable[[str], Callable[[Any, Any], Any]]
  canon: W.Canonical

  @property
  def name(self) -> str:
    return f"{self.arch}/{self.framework}/{self.form}"

  @property
  def num_params(self) -> int:
    return sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(self.params))

  @property
  def description(self) -> str:
    return f"{DESCRIPTIONS[self.arch]}: {self.cfg}, N={self.x.shape[0]}"

  def kernel_fn(self, implementation: str = "auto") -> Callable[[Any, Any], Any]:
    """The framework's public kernel function, ``(params, x) -> kernel``."""
    return self.kernel_factory(implementation)


@functools.lru_cache(maxsize=None)
def canonical(arch: str, size: str = "default", dtype: str = "float32",
              seed: int = 0) -> tuple[Any, W.Canonical, np.ndarray]:
  """``(config, canonical weights, inputs)`` of a zoo model (deterministic)."""
  cfg, n = plain.SIZES[arch][size]
  x = plain.make_input(cfg, n, np.dtype(dtype))
  params, state = hk_models.templates(cfg, jnp.asarray(x))
  return cfg, W.generate(W.haiku_shapes(params, state), np.dtype(dtype), seed), x


def trainable(canon: W.Canonical) -> dict[str, np.ndarray]:
  """The canonical weights a kernel differentiates (not BatchNorm statistics)."""
  return {k: v for k, v in canon.items() if k.rsplit("/", 1)[-1] not in ("mean", "var")}


def build(arch: str, framework: str = "haiku", form: str = "dropin", size: str = "default",
          dtype: str = "float32", seed: int = 0) -> ZooModel:
  """One form of a zoo model (see the module docstring)."""
  if framework not in FRAMEWORKS[arch]:
    raise ValueError(f"{arch} has no {framework} form (has {FRAMEWORKS[arch]})")
  if form not in forms(arch, framework):
    raise ValueError(f"{arch}/{framework} has no form {form!r} (has {forms(arch, framework)})")
  cfg, canon, x_np = canonical(arch, size, dtype, seed)
  x = jnp.asarray(x_np)
  make = {"haiku": _haiku, "linen": _linen, "nnx": _nnx, "eqx": _eqx, "plain": _plain}
  apply, params, factory = make[framework](cfg, form, canon, x)
  return ZooModel(arch, framework, form, size, cfg, apply, params, x, factory, canon)


def _ntk_factory(apply: Callable) -> Callable[[str], Callable]:
  return lambda impl: ntklayers.ntk_fn(apply, implementation=impl)


def _haiku(cfg, form, canon, x):
  net = hk_models.transform(cfg, form)
  params_t, state_t = hk_models.templates(cfg, x)
  params, state = W.to_haiku(canon, params_t, state_t, convert=jnp.asarray)

  def apply(p, x):
    return net.apply(p, state, x)[0]

  return apply, params, _ntk_factory(apply)


def _linen(cfg, form, canon, x):
  import ntklayers.flax  # pylint: disable=g-import-not-at-top
  from . import linen_models  # pylint: disable=g-import-not-at-top
  module = linen_models.Model(cfg, form)
  template = jax.eval_shape(module.init, jax.random.key(0), x)
  variables = W.to_linen(canon, template, convert=jnp.asarray)
  rest = {k: v for k, v in variables.items() if k != "params"}

  def apply(p, x):
    return module.apply({"params": p, **rest}, x)

  def factory(impl):
    kernel_fn = ntklayers.flax.ntk_fn(module, implementation=impl)
    return lambda p, x: kernel_fn({"params": p, **rest}, x)

  return apply, variables["params"], factory


def _nnx(cfg, form, canon, x):
  from . import nnx_models  # pylint: disable=g-import-not-at-top
  return nnx_models.build(cfg, form, canon, x)


def _eqx_entry():
  """``ntklayers.equinox`` if it exists (another engineer's work in progress)."""
  try:
    import ntklayers.equinox as ntk_eqx  # pylint: disable=g-import-not-at-top
  except ImportError:
    return None
  return ntk_eqx if hasattr(ntk_eqx, "ntk_fn") else None


def _eqx(cfg, form, canon, x):
  import equinox as eqx  # pylint: disable=g-import-not-at-top
  from . import eqx_models  # pylint: disable=g-import-not-at-top
  model = eqx_models.Model(cfg, jax.random.key(0))
  flat, treedef = jax.tree_util.tree_flatten_with_path(model)
  arrays = [(W.path_names(p), leaf) for p, leaf in flat if eqx.is_inexact_array(leaf)]
  values = iter(W.fill_paths(canon, arrays, W.eqx_value))
  leaves = [jnp.asarray(next(values)) if eqx.is_inexact_array(leaf) else leaf
            for _, leaf in flat]
  model = jax.tree.unflatten(treedef, leaves)
  dynamic, static = eqx.partition(model, eqx.is_inexact_array)
  flat_dyn, dyn_treedef = jax.tree_util.tree_flatten_with_path(dynamic)
  keys = ["/".join(W.path_names(p)[1:]) for p, _ in flat_dyn]
  params = {k: v for k, (_, v) in zip(keys, flat_dyn)}

  def apply(p, x):
    m = eqx.combine(jax.tree.unflatten(dyn_treedef, [p[k] for k in keys]), static)
    return jax.vmap(m)(x)

  if form == "entry":  # ntklayers.equinox: kernel_fn(model, x), the model rebuilt per call
    ntk_eqx = _eqx_entry()

    def factory(impl):
      kernel_fn = ntk_eqx.ntk_fn(implementation=impl)
      return lambda p, x: kernel_fn(
          eqx.combine(jax.tree.unflatten(dyn_treedef, [p[k] for k in keys]), static), x)

    return apply, params, factory
  return apply, params, _ntk_factory(apply)


def _plain(cfg, form, canon, x):
  del form
  stats = {k: jnp.asarray(v) for k, v in canon.items() if k not in trainable(canon)}
  params = {k: jnp.asarray(v) for k, v in trainable(canon).items()}

  def apply(p, x):
    return plain.apply(cfg, {**p, **stats}, x)

  return apply, params, _ntk_factory(apply)


def reference_output(arch: str, size: str = "default", dtype: str = "float32",
                     seed: int = 0) -> np.ndarray:
  """The Haiku stock form's output on the zoo inputs (what ``nt_side.py`` checks)."""
  m = build(arch, "haiku", "stock", size, dtype, seed)
  return np.asarray(jax.jit(m.apply)(m.params, m.x))


def num_outputs(m: ZooModel) -> int:
  out = jax.eval_shape(m.apply, m.params, m.x)
  return math.prod(out.shape[1:])
