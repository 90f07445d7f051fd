"""The ``nn.intercept_methods`` interceptor that reports linen layers to a capture."""

from __future__ import annotations

from typing import Any

import flax.linen as nn

from ntklayers import adapters
from ntklayers.flax import _linen_layers as L


def _describer(module: nn.Module):
  cls = type(module)
  describe = cls.__dict__.get("_ntk_describe")
  if describe is not None:
    layer: Any = cls  # an annotated class (declares _ntk_roles)
    return describe.__func__ if hasattr(describe, "__func__") else describe, layer._ntk_roles
  parent = module.parent
  if isinstance(parent, nn.Module) and getattr(type(parent), "_ntk_children", False):
    return L.CHILD_DESCRIBERS.get(cls)
  return None


def _module_name(module: nn.Module) -> str:
  path = module.path
  return "/".join(str(p) for p in path) if path else (module.name or type(module).__name__)


def _training(module: nn.Module, args, kwargs) -> Any:
  use_running = kwargs.get("use_running_average", args[1] if len(args) > 1 else None)
  if use_running is None:
    use_running = module.use_running_average
  return not (isinstance(use_running, bool) and use_running)


def interceptor(next_fun, args, kwargs, context):
  """linen interceptor: taps annotated layers, flags batch-coupling modules."""
  if context.method_name != "__call__":
    return next_fun(*args, **kwargs)
  module = context.module
  if isinstance(module, nn.BatchNorm) and _training(module, args, kwargs):
    # Stock and drop-in BatchNorm alike: batch statistics make samples interact.
    adapters.declare_coupled(_module_name(module))
  found = _describer(module)
  if found is None:
    return next_fun(*args, **kwargs)
  describe, roles = found
  out = next_fun(*args, **kwargs)
  kind, config, primal, unsupported = describe(module, *args, **kwargs)
  variables = module.variables.get("params", {})
  params = {role: variables[leaf] for role, leaf in roles.items() if leaf in variables}
  return adapters.tap(kind=kind, config=config, name=_module_name(module), params=params,
                      primal=primal, out=out, unsupported=unsupported,
                      inputs=(args, kwargs))


def intercept():
  """The linen interceptor as a context manager (entered only during capture)."""
  return nn.intercept_methods(interceptor)

