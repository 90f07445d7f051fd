"""ntklayers: exact finite-width Neural Tangent Kernels from cached layer factors.

Swap ``hk.Linear`` for :class:`ntklayers.Linear` (and convolutions, attention and
LayerNorm for their ``ntklayers.haiku`` counterparts), then::

    kernel_fn = ntklayers.ntk_fn(apply_fn)
    K = kernel_fn(params, x1, x2)          # [N1, N2, O, O]

Parameters of layers that are not annotated are still counted exactly.
"""

from ntklayers import init
from ntklayers import metrics
from ntklayers._api import ntk
from ntklayers._api import ntk_fn
from ntklayers._api import summed_logits
from ntklayers._blocked import ntk_blocked
from ntklayers._blocked import ntk_trace
from ntklayers._blocked_exec import InteractingExamplesError
from ntklayers._budget import MemoryBudgetError
from ntklayers._contract import contract
from ntklayers._capture import Factors
from ntklayers._capture import capture
from ntklayers._rules import ConvConfig
from ntklayers._rules import DenseConfig
from ntklayers._rules_embed import EmbedConfig
from ntklayers._rules import Rule
from ntklayers._rules import ScaleConfig
from ntklayers._rules import register_rule
from ntklayers._session import tap
from ntklayers._trainability import TrainabilityError
from ntklayers._trainability import TrainabilityReport
from ntklayers._trainability import TrainabilityWarning
from ntklayers._trainability import check_trainability

__version__ = "0.1.0"

__all__ = (
    "ConvConfig",
    "DenseConfig",
    "EmbedConfig",
    "Factors",
    "InteractingExamplesError",
    "MemoryBudgetError",
    "Linear",
    "Rule",
    "ScaleConfig",
    "TrainabilityError",
    "TrainabilityReport",
    "TrainabilityWarning",
    "capture",
    "check_trainability",
    "contract",
    "init",
    "metrics",
    "ntk",
    "ntk_blocked",
    "ntk_fn",
    "ntk_trace",
    "register_rule",
    "summed_logits",
    "tap",
)


def __getattr__(name: str):
  # `ntklayers.Linear` is the Haiku drop-in; Haiku is an optional extra.
  if name == "Linear":
    from ntklayers.haiku import Linear  # pylint: disable=g-import-not-at-top
    return Linear
  raise AttributeError(f"module 'ntklayers' has no attribute {name!r}")
