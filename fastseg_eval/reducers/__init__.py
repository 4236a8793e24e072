"""Reducers: the state of one metric family and its per-block work (see :mod:`.base`).

* :mod:`~fastseg_eval.reducers.confusion`: confusion counts on the CPU (dense or diagonal +
  marginals), also for probability maps (:mod:`~fastseg_eval.reducers.probability`);
* :mod:`~fastseg_eval.reducers.cuda`: the same counts on the GPU;
* :mod:`~fastseg_eval.reducers.backends`: which of the two a run uses;
* :mod:`~fastseg_eval.reducers.contingency`: the sparse (gt id, pred id) contingency table of
  instance segmentations.
"""
