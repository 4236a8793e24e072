"""The label space (see :mod:`~fastseg_eval.labels.space`), shared by the CPU and CUDA counters."""
