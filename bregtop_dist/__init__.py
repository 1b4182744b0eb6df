"""bregtop_dist: the BregTop family of Kronecker-factored optimizers for PyTorch."""

from bregtop_dist.config import METHODS, PRESETS, BregTopConfig
from bregtop_dist.core.precondition import kron_precondition
from bregtop_dist.core.stats import kron_stats
from bregtop_dist.core.validate import ArgumentTypeError
from bregtop_dist.grouping import param_groups
from bregtop_dist.optimizer import BregTop, NonFiniteGradientError, NonFiniteStepError
from bregtop_dist.state_format import IncompleteStateDictWarning

__all__ = [
    "ArgumentTypeError",
    "BregTop",
    "BregTopConfig",
    "IncompleteStateDictWarning",
    "METHODS",
    "NonFiniteGradientError",
    "NonFiniteStepError",
    "PRESETS",
    "kron_precondition",
    "kron_stats",
    "param_groups",
]
__version__ = "0.1.0"
