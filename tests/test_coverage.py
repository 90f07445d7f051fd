"""Every public drop-in class is exercised by the shared registry (after Haiku's
``integration/descriptors_test.py``).

The public drop-ins are the classes in ``ntklayers.haiku.__all__``,
``ntklayers.flax.linen.__all__`` and ``ntklayers.flax.nnx.__all__``
(``dropins.py``; a second public name of the same class, ``dropins.ALIASES``, is
checked under its canonical name). Which classes a registry model uses is found
by running it once (abstractly, ``jax.eval_shape``) under a method interceptor
that records the type of every module called:
``hk.intercept_methods`` for Haiku, ``nn.intercept_methods`` for linen. NNX has no
interceptors: the modules of the built model's graph (``nnx.iter_graph``) are
collected instead.

A new drop-in class therefore needs a model in ``tests/models.py`` /
``tests/models_flax.py`` (or ``models_classes.py``) that uses it, so that
``test_registry`` checks its kernel.
"""

from __future__ import annotations

import collections
import functools

import dropins
import flax.linen as nn
import haiku as hk
import jax
import models
import models_flax
import pytest
from flax import nnx

# Classes without a registry model yet: {qualified name: reason}. Run as strict
# xfails, so that adding the model (which makes them pass) forces removing the entry.
NOT_YET_COVERED: dict[str, str] = {}

PUBLIC = dropins.public_classes()
ALIASES = dropins.ALIASES


def _framework(model) -> str:
  return getattr(model, "framework", "haiku")


@functools.cache
def used_classes() -> dict[type, frozenset[str]]:
  """``{module class: names of the registry models that use it}``."""
  used: dict[type, set[str]] = collections.defaultdict(set)
  for model in models.registry():
    fw = _framework(model)
    built = models.build(model.name) if fw == "haiku" else models_flax.build(model.name)

    def spy(next_f, args, kwargs, context, name=model.name):
      used[type(context.module)].add(name)
      return next_f(*args, **kwargs)

    if fw == "nnx":
      for _, node in nnx.iter_graph(built.extra["model"]):
        if isinstance(node, nnx.Module):
          used[type(node)].add(model.name)
      continue
    intercept = hk.intercept_methods if fw == "haiku" else nn.intercept_methods
    # (jit off: a jitted apply traced earlier in this worker would not run its
    # Python, and its modules, again)
    with models.expect_fallback_warning(model), intercept(spy), jax.disable_jit():
      jax.eval_shape(built.f, built.params, built.x1)
  return {k: frozenset(v) for k, v in used.items()}


def test_aliases_are_aliases():
  """The alias exemption is only for a second public name of the same class."""
  for qualified, canonical in ALIASES.items():
    module_name, _, name = qualified.rpartition(".")
    assert qualified in PUBLIC, f"{qualified} is not a public class"
    assert PUBLIC[qualified] is PUBLIC[f"{module_name}.{canonical}"], qualified


def test_spies_see_framework_internals():
  """Sanity check of the spies: stock modules are recorded too."""
  used = used_classes()
  assert hk.Linear in used and nn.Dense in used and nnx.Linear in used


def _class_params():
  out = []
  for qualified in sorted(PUBLIC):
    if qualified in ALIASES:
      continue
    marks = []
    if qualified in NOT_YET_COVERED:
      marks.append(pytest.mark.xfail(strict=True, reason=NOT_YET_COVERED[qualified]))
    out.append(pytest.param(qualified, id=qualified, marks=marks))
  return out


@pytest.mark.parametrize("qualified", _class_params())
def test_public_class_is_exercised_by_the_registry(qualified):
  cls = PUBLIC[qualified]
  users = used_classes().get(cls, frozenset())
  assert users, (f"public drop-in {qualified} is not used by any model of "
                 f"models.registry(): add a model that uses it")

