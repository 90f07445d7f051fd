"""The kernel core: discovery, plan, capture and contraction. Framework-agnostic.

This ``__init__`` is the core's one door: the rest of ntklayers (the public API,
the adapters' interface, blocked kernels, applications) imports from here and
never from the core's private modules (``tests/test_layout.py`` checks it).
Importing the core registers the built-in structure rules.

What goes in and what comes out:

* **In:** :class:`Options` (validated kernel options), ``split_kwargs`` for model
  keyword arguments, input checks (``check_*``).
* **Out:** :func:`prepare` -> a :class:`Setup` (the plan: structured groups,
  fallback leaves, sample mode, fallback route, row proof); :func:`capture_with`
  -> :class:`Factors`; :func:`contract_with_spec` / :func:`contract_unchecked` ->
  kernels; :func:`restrict` and :func:`resolve_trainable` for applications that
  differentiate a subset of the parameters; the row-check helpers
  (:func:`check_cotangent`, :func:`check_tolerance`, :func:`agree`).
* **Entry points:** :func:`ntk_fn`, :func:`ntk`, :func:`nngp_fn`, :func:`kernel_fn`
  (NNGP and NTK in one program; ``get`` and its ``Kernels`` tuples:
  :func:`normalize_get`, :func:`kernels_type`, :func:`nngp_contract`), :func:`summed_logits`,
  :func:`capture`, :func:`contract`, and :func:`make_kernel_fn`, the factory
  every framework's entry point is built with.
* **Extension:** :func:`tap`, :class:`Rule`, :func:`register_rule`, the ops
  (:data:`AFFINE`, :data:`SCALE`, :data:`GATHER`) and config records.
"""

# The built-in rules register themselves on import.
from ntklayers._core import _rules  # noqa: F401
from ntklayers._core import _rules_embed  # noqa: F401
from ntklayers._core._api import inspect
from ntklayers._core._api import kernel_fn
from ntklayers._core._api import nngp_fn
from ntklayers._core._api import ntk
from ntklayers._core._api import ntk_fn
from ntklayers._core._api import summed_logits
from ntklayers._core._axes import OutputSpec
from ntklayers._core._inspect import GroupRoute
from ntklayers._core._inspect import Inspection
from ntklayers._core._plan import SlowRouteWarning
from ntklayers._core._axes import normalize_axes
from ntklayers._core._capture import Factors
from ntklayers._core._capture import Setup
from ntklayers._core._capture import capture
from ntklayers._core._capture import capture_with
from ntklayers._core._capture import prepare
from ntklayers._core._capture import prove_rows
from ntklayers._core._checks import batch_size
from ntklayers._core._checks import check_batch
from ntklayers._core._checks import check_f
from ntklayers._core._checks import check_output
from ntklayers._core._checks import check_pair
from ntklayers._core._checks import check_params
from ntklayers._core._checks import note_failure
from ntklayers._core._contract import all_finite
from ntklayers._core._contract import contract
from ntklayers._core._contract import contract_unchecked
from ntklayers._core._contract import contract_with_spec
from ntklayers._core._contract import report_nonfinite
from ntklayers._core._discovery import discover
from ntklayers._core._discovery import execution_order
from ntklayers._core._fallback import restrict
from ntklayers._core._jax_compat import is_inexact
from ntklayers._core._jax_compat import is_tracer
from ntklayers._core._jax_compat import shard_map
from ntklayers._core._kernel_fn import KernelResult
from ntklayers._core._kernel_fn import checked
from ntklayers._core._kernel_fn import kernel
from ntklayers._core._kernel_fn import make_kernel_fn
from ntklayers._core._kernel_fn import with_kwargs
from ntklayers._core._nngp import KERNELS
from ntklayers._core._nngp import kernels_type
from ntklayers._core._nngp import nngp_contract
from ntklayers._core._nngp import normalize_get
from ntklayers._core._ops import AFFINE
from ntklayers._core._ops import SCALE
from ntklayers._core._ops import Op
from ntklayers._core._options import Options
from ntklayers._core._options import StaticKwargs
from ntklayers._core._options import split_kwargs
from ntklayers._core._plan import collecting_notes
from ntklayers._core._plan import emit_note
from ntklayers._core._plan import resolve_trainable
from ntklayers._core._replay import CHECKED
from ntklayers._core._replay import COUPLED
from ntklayers._core._replay import INDEPENDENT
from ntklayers._core._replay import agree
from ntklayers._core._replay import check_cotangent
from ntklayers._core._replay import check_tolerance
from ntklayers._core._replay import replay
from ntklayers._core._rowproof import why_not as why_rows_not_examples
from ntklayers._core._rule import Description
from ntklayers._core._rule import Rule
from ntklayers._core._rule import register_rule
from ntklayers._core._rules import ConvConfig
from ntklayers._core._rules import DenseConfig
from ntklayers._core._rules import ScaleConfig
from ntklayers._core._rules_embed import GATHER
from ntklayers._core._rules_embed import EmbedConfig
from ntklayers._core._session import capturing
from ntklayers._core._session import declare_coupled
from ntklayers._core._session import interceptors
from ntklayers._core._session import register_interceptor
from ntklayers._core._session import tap

__all__ = (
    "AFFINE", "CHECKED", "COUPLED", "ConvConfig", "DenseConfig", "Description", "EmbedConfig",
    "Factors", "GATHER", "GroupRoute", "INDEPENDENT", "Inspection", "KERNELS", "KernelResult",
    "Op", "Options", "OutputSpec", "Rule", "SCALE", "ScaleConfig", "Setup", "SlowRouteWarning",
    "StaticKwargs", "agree", "all_finite", "batch_size", "capture", "capture_with", "capturing",
    "check_batch", "check_cotangent", "check_f", "check_output", "check_pair", "check_params",
    "check_tolerance", "checked", "collecting_notes", "contract", "contract_unchecked",
    "contract_with_spec", "declare_coupled", "discover", "emit_note", "execution_order", "inspect",
    "interceptors", "is_inexact", "is_tracer", "kernel", "kernel_fn", "kernels_type",
    "make_kernel_fn", "nngp_contract", "nngp_fn", "normalize_axes", "normalize_get",
    "note_failure", "ntk", "ntk_fn", "prepare", "prove_rows", "register_interceptor",
    "register_rule", "replay", "report_nonfinite", "resolve_trainable", "restrict", "shard_map",
    "split_kwargs", "summed_logits", "tap", "why_rows_not_examples", "with_kwargs",
)
