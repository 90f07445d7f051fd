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
   keyword options (:meth:`Options.create` validates them, once) and pass it to
   :func:`make_kernel_fn` with two functions: ``split(model) -> (key, params,
   rest)`` (outside ``jax.jit``: a hashable static key, the pytree to
   differentiate and other state) and ``build(key, rest, model_kwargs) -> f``
   (inside: the framework's model as ``f(params, x)``). The factory checks the
   inputs, traces array model kwargs, compiles one kernel per key, options and
   shapes, and warns once per kernel function. (The lower-level :func:`kernel`
   and :func:`checked` are the two halves of its body.)

New layer kinds: a :class:`Rule` over an :class:`Op` (:data:`AFFINE`,
:data:`SCALE`, :data:`GATHER`, or a new one) registered with
:func:`register_rule`; ``Rule.on_vmap`` says how its config changes when the
layer is written per example and batched with ``jax.vmap``.

Example (a toy adapter for a function with one weight matrix):
  >>> import jax, jax.numpy as jnp
  >>> from ntklayers import adapters
  >>> def layer(w, x):
  ...   return adapters.tap(kind="dense", config=adapters.DenseConfig(), name="toy",
  ...                       params={"w": w}, primal=x, out=x @ w)
  >>> options = adapters.Options.create(trace_axes=(-1,))
  >>> kernel_fn = adapters.make_kernel_fn(lambda key, rest, kw: layer,
  ...                                     lambda w: ("toy", w, None), options, "toy kernel")
  >>> kernel_fn(jnp.ones((2, 4)), jnp.ones((3, 2))).shape
  (3, 3)
"""

from ntklayers._core import AFFINE
from ntklayers._core import GATHER
from ntklayers._core import SCALE
from ntklayers._core import ConvConfig
from ntklayers._core import DenseConfig
from ntklayers._core import Description
from ntklayers._core import EmbedConfig
from ntklayers._core import Op
from ntklayers._core import Options
from ntklayers._core import Rule
from ntklayers._core import ScaleConfig
from ntklayers._core import capturing
from ntklayers._core import check_pair
from ntklayers._core import checked
from ntklayers._core import declare_coupled
from ntklayers._core import kernel
from ntklayers._core import make_kernel_fn
from ntklayers._core import normalize_axes
from ntklayers._core import register_interceptor
from ntklayers._core import register_rule
from ntklayers._core import split_kwargs
from ntklayers._core import tap

__all__ = (
    "AFFINE",
    "GATHER",
    "SCALE",
    "ConvConfig",
    "DenseConfig",
    "Description",
    "EmbedConfig",
    "Op",
    "Options",
    "Rule",
    "ScaleConfig",
    "capturing",
    "check_pair",
    "checked",
    "declare_coupled",
    "kernel",
    "make_kernel_fn",
    "normalize_axes",
    "register_interceptor",
    "register_rule",
    "split_kwargs",
    "tap",
)
