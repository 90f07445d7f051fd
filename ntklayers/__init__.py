"""ntklayers: exact finite-width Neural Tangent Kernels from cached layer factors.

Swap ``hk.Linear`` for :class:`ntklayers.Linear` (and convolutions, attention and
LayerNorm for their ``ntklayers.haiku`` counterparts), then::

    kernel_fn = ntklayers.ntk_fn(apply_fn)
    K = kernel_fn(params, x1, x2)          # [N1, N2, O, O]

NNGP kernels (``nngp_fn``, or both from one program with ``kernel_fn``), the
linearized model (``linearize``, ``taylor_expand``), predictions
(``ntklayers.predict``), and neural-tangents' names in
``ntklayers.compat.neural_tangents``.

Parameters of layers that are not annotated are still counted exactly.
"""

from ntklayers import init
from ntklayers import metrics
from ntklayers import predict
from ntklayers._core import ConvConfig
from ntklayers._core import DenseConfig
from ntklayers._core import EmbedConfig
from ntklayers._core import Factors
from ntklayers._core import GroupRoute
from ntklayers._core import Inspection
from ntklayers._core import Rule
from ntklayers._core import ScaleConfig
from ntklayers._core import SlowRouteWarning
from ntklayers._core import capture
from ntklayers._core import contract
from ntklayers._core import inspect
from ntklayers._core import kernel_fn
from ntklayers._core import nngp_fn
from ntklayers._core import ntk
from ntklayers._core import ntk_fn
from ntklayers._core import register_rule
from ntklayers._core import summed_logits
from ntklayers._core import tap
from ntklayers._large import InteractingExamplesError
from ntklayers._large import MemoryBudgetError
from ntklayers._large import StoreError
from ntklayers._large import ntk_blocked
from ntklayers._large import ntk_trace
from ntklayers.taylor import linearize
from ntklayers.taylor import taylor_expand
from ntklayers.trainability import TrainabilityError
from ntklayers.trainability import TrainabilityReport
from ntklayers.trainability import TrainabilityWarning
from ntklayers.trainability import check_trainability

__version__ = "0.1.0"

__all__ = (
    "ConvConfig",
    "DenseConfig",
    "EmbedConfig",
    "Factors",
    "GroupRoute",
    "Inspection",
    "InteractingExamplesError",
    "Linear",
    "MemoryBudgetError",
    "Rule",
    "ScaleConfig",
    "SlowRouteWarning",
    "StoreError",
    "TrainabilityError",
    "TrainabilityReport",
    "TrainabilityWarning",
    "capture",
    "check_trainability",
    "contract",
    "init",
    "inspect",
    "kernel_fn",
    "linearize",
    "metrics",
    "nngp_fn",
    "ntk",
    "ntk_blocked",
    "ntk_fn",
    "ntk_trace",
    "predict",
    "register_rule",
    "summed_logits",
    "tap",
    "taylor_expand",
)


def __getattr__(name: str):
  # `ntklayers.Linear` is the Haiku drop-in; Haiku is an optional extra.
  if name == "Linear":
    from ntklayers.haiku import Linear  # pylint: disable=g-import-not-at-top
    return Linear
  raise AttributeError(f"module 'ntklayers' has no attribute {name!r}")
