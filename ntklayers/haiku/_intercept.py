"""The Haiku method interceptor that reports annotated layers to a capture.

It is installed (``hk.intercept_methods``) only while ntklayers captures
factors, so ordinary ``apply`` calls run the stock Haiku code path untouched.
"""

from __future__ import annotations

from typing import Any

import haiku as hk
from ntklayers import adapters
from ntklayers.haiku import _compat


def _is_false(value: Any) -> bool:
  return isinstance(value, bool) and not value


def interceptor(next_fun, args, kwargs, ctx: hk.MethodContext):
  """Haiku interceptor: taps annotated layers, flags batch-coupling modules."""
  if ctx.method_name != "__call__":
    return next_fun(*args, **kwargs)
  module = ctx.module
  if isinstance(module, hk.BatchNorm) and ctx.orig_class is hk.BatchNorm:
    # Stock and drop-in BatchNorm alike: batch statistics make samples interact.
    training = args[1] if len(args) > 1 else kwargs.get("is_training")
    local = kwargs.get("test_local_stats", args[2] if len(args) > 2 else False)
    if not (_is_false(training) and _is_false(local)):
      adapters.declare_coupled(module.module_name)
  describe = getattr(module, "_ntk_describe", None)
  if describe is None or ctx.orig_class is not module._ntk_base:  # pylint: disable=protected-access
    return next_fun(*args, **kwargs)
  out = next_fun(*args, **kwargs)
  kind, config, primal, unsupported = describe(*args, **kwargs)
  if _compat.custom_getters_active():  # factors would pair with other values
    unsupported = "its parameters pass through hk.custom_getter (e.g. mixed precision)"
  prefix = module.module_name + "/"
  params = {k[len(prefix):]: v for k, v in module.params_dict().items()
            if k.startswith(prefix) and "/" not in k[len(prefix):]}
  params = {role: params[leaf] for role, leaf in module._ntk_roles.items()  # pylint: disable=protected-access
            if leaf in params}
  return adapters.tap(kind=kind, config=config, name=module.module_name,
                      params=params, primal=primal, out=out, unsupported=unsupported,
                      inputs=(args, kwargs))


def intercept():
  """The Haiku interceptor as a context manager (entered only during capture)."""
  return hk.intercept_methods(interceptor)

