"""The public interface for framework adapters.

Everything an adapter needs is here, and the Haiku, linen and NNX adapters of
ntklayers use nothing else from the core, so a third party can write one (for
Equinox, say) without private imports. An adapter does three things:

1. **Describe layers.** While an NTK is requested, each annotated layer call
   reports itself with :func:`tap`: its rule ``kind`` and static ``config``
   (:class:`DenseConfig`, :class:`ConvConfig`, :class:`ScaleConfig`,
   :class:`EmbedConfig`, ... or a
   config of a rule registered with :func:`ntklayers.register_rule`), the primal
   the rule needs, the parameter arrays it read (exactly as stored in the
   model's parameters) and its output. :func:`tap` returns the output through a
   structure tag, which survives ``scan``, ``remat``, ``jit`` and lifted
   transforms; outside an NTK request it returns the output untouched.
   Modules that make examples interact (BatchNorm in training mode) call
   :func:`declare_coupled`.
2. **Intercept calls.** If the framework has method interceptors, register a
   context-manager factory once with :func:`register_interceptor`; it is entered
   around the model only while the model is traced for an NTK (so annotated
   layers cost nothing otherwise). Adapters without interceptors check
   :func:`capturing` in the layer's ``__call__``.
3. **Offer a kernel entry point.** Build an :class:`Options` from the user's
   keyword options (:meth:`Options.create` validates them, once), write
   ``f(params, x)`` for the framework's model, and inside ``jax.jit`` return
   :func:`kernel` ``(f, params, x1, x2, options)``; outside, pass its result to
   :func:`checked` with a ``set`` owned by the kernel function (fallback
   warnings are given once per kernel function). Extra model arguments go
   through :func:`split_kwargs`.

Example (a toy adapter for a function with one weight matrix):
  >>> import jax, jax.numpy as jnp
  >>> from ntklayers import adapters
  >>> def layer(w, x):
  ...   return adapters.tap(kind="dense", config=adapters.DenseConfig(), name="toy",
  ...                       params={"w": w}, primal=x, out=x @ w)
  >>> options = adapters.Options.create(trace_axes=(-1,))
  >>> x = jnp.ones((3, 2))
  >>> k = adapters.checked(jax.jit(lambda w, x: adapters.kernel(layer, w, x, None,
  ...                                                            options))(jnp.ones((2, 4)), x))
  >>> k.shape
  (3, 3)
"""

from ntklayers._api import checked
from ntklayers._api import kernel
from ntklayers._checks import check_pair
from ntklayers._options import Options
from ntklayers._options import split_kwargs
from ntklayers._rules import ConvConfig
from ntklayers._rules import DenseConfig
from ntklayers._rules import Description
from ntklayers._rules import ScaleConfig
from ntklayers._rules_embed import EmbedConfig
from ntklayers._axes import normalize_axes
from ntklayers._session import capturing
from ntklayers._session import declare_coupled
from ntklayers._session import register_interceptor
from ntklayers._session import tap

__all__ = (
    "ConvConfig",
    "DenseConfig",
    "Description",
    "EmbedConfig",
    "Options",
    "ScaleConfig",
    "capturing",
    "check_pair",
    "checked",
    "declare_coupled",
    "kernel",
    "normalize_axes",
    "register_interceptor",
    "split_kwargs",
    "tap",
)
