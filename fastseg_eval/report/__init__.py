"""Reports: the evaluation result and how it is shown.

* :mod:`~fastseg_eval.report.result`: :class:`EvaluationResult` (per-class arrays, means,
  warnings), JSON and CSV;
* :mod:`~fastseg_eval.report.table`: the plain-text table; :mod:`~fastseg_eval.report.plot`: figures;
* :mod:`~fastseg_eval.report.dataset`: :class:`DatasetResult` (per case, over cases, pooled), its
  JSON / tidy CSV / nnU-Net summary.json and table.
"""
