"""fastseg-eval: exact one-pass confusion matrices and metrics for large segmentation volumes.

Words used throughout the package:

- **backend**: where a block is counted: ``cpu`` (numba) or ``cuda`` (numba-cuda).
- **engine**: how blocks are scheduled: a local thread pool, a dask graph, dask.distributed.
- **reducer**: the state one metric family needs and its per-block work: ``spawn()``,
  ``add(block)``, ``finish()``, ``merge(other)``, and the ``halo`` it needs around a block.
- **block**: pred, gt and mask arrays of one work unit (its core region plus the halo) and
  where the core lies in the volume.

Layers (imports point down only; ``pyproject.toml`` states them as import-linter contracts)::

    cli, api, demo        thin shells: parse options, build reducers, run, print / write
    dataset               many cases: match, run in parallel, resume; over api.evaluate
    report/               EvaluationResult, table, plots
    metrics/              formulas over finished counts, threshold-sweep curves
    engine/               plan units over chunk grids; threads | dask graph | dask.distributed
    reducers/             confusion counts (CPU, CUDA), probability maps; the reducer protocol
    labels/               the label space: fixed or discovered, ignore label, LUT + hash
    kernels/  io/         numba loops (CPU, CUDA)  |  open inputs, read chunks, write outputs
    errors, memory, ...   leaves
"""

from fastseg_eval._version import __version__
from fastseg_eval.api import ConfusionMatrix, confusion_matrix, contingency, evaluate
from fastseg_eval.dataset import evaluate_dataset
from fastseg_eval.errors import BackendError, FastSegError, InputError, LabelError, OptionError
from fastseg_eval.io.volume import open_volume
from fastseg_eval.metrics.formulas import METRICS
from fastseg_eval.reducers.contingency import ContingencyTable
from fastseg_eval.report.dataset import DatasetResult
from fastseg_eval.report.result import EvaluationResult

__all__ = [
    "__version__",
    "evaluate",
    "evaluate_dataset",
    "confusion_matrix",
    "contingency",
    "ContingencyTable",
    "ConfusionMatrix",
    "EvaluationResult",
    "DatasetResult",
    "METRICS",
    "open_volume",
    "FastSegError",
    "InputError",
    "LabelError",
    "OptionError",
    "BackendError",
]
