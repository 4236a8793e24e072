"""Metrics: pure numpy over finished counts.

* :mod:`~fastseg_eval.metrics.formulas`: per-class formulas over TP / FP / FN / TN (a registry
  with aliases), means, overall accuracy / MCC / kappa;
* :mod:`~fastseg_eval.metrics.curves`: ROC / PR curves, AUC and AP (with error bounds) from a
  threshold sweep's binned counts;
* :mod:`~fastseg_eval.metrics.instances`: VOI, adapted Rand error, matching, F1 and PQ / SQ / RQ
  from a contingency table.
"""
