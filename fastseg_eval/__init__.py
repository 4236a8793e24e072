"""fastseg-eval: exact one-pass confusion matrices and metrics for large segmentation volumes."""

from ._version import __version__
from .api import confusion_matrix, evaluate
from .confusion import ConfusionMatrix
from .errors import BackendError, FastSegError, InputError, LabelError, OptionError
from .metrics import METRICS
from .report import EvaluationResult
from .sources import open_volume

__all__ = [
    "__version__",
    "evaluate",
    "confusion_matrix",
    "ConfusionMatrix",
    "EvaluationResult",
    "METRICS",
    "open_volume",
    "FastSegError",
    "InputError",
    "LabelError",
    "OptionError",
    "BackendError",
]
