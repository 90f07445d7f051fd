"""``check_trainability``: an NTK health check for plain Python training loops.

Also ``ntklayers.check_trainability``. See :func:`check_trainability`.
"""

from ntklayers.trainability._check import TrainabilityError
from ntklayers.trainability._check import TrainabilityReport
from ntklayers.trainability._check import TrainabilityWarning
from ntklayers.trainability._check import check_trainability

__all__ = ("TrainabilityError", "TrainabilityReport", "TrainabilityWarning",
           "check_trainability")
