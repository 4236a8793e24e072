"""Engines: how work units are scheduled; generic over reducers (they know no metric).

* :func:`~fastseg_eval.engine.threads.run_threads`: a local thread pool (numpy and zarr inputs);
* :func:`~fastseg_eval.engine.dask_graph.run_dask`: a dask graph (dask inputs, or ``scheduler=``:
  dask's local schedulers or a dask.distributed cluster, see :mod:`~fastseg_eval.engine.cluster`).

Every engine reads each chunk of every input once, hands each work unit to every reducer of the
run as a :class:`~fastseg_eval.reducers.base.Block` (with the halo the reducer declared), and
merges the per-worker partials into the reducers passed in only when the whole run succeeded.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from fastseg_eval.engine.plan import RunStats, check_workers, default_workers
from fastseg_eval.io.volume import Volume
from fastseg_eval.reducers.base import Reducer

__all__ = ["RunStats", "check_workers", "default_workers", "run_reducers"]


def run_reducers(
    reducers: Sequence[Reducer],
    volumes: tuple[Volume, Volume, Volume | None],
    *,
    workers: int | None = None,
    scheduler: Any = None,
    progress: Callable[[int], None] | None = None,
) -> RunStats:
    """Run every reducer over ``volumes`` = (pred, gt, mask or None) in one pass.

    Dask inputs or a ``scheduler`` run as a dask graph, anything else in a thread pool of
    ``workers`` threads. ``progress`` is called with the voxels of each finished unit. On any
    error the reducers are left as they were.
    """
    pv, gv, mv = volumes
    nworkers = check_workers(workers)
    t0 = time.perf_counter()
    if scheduler is not None or any(v is not None and v.kind == "dask" for v in (pv, gv, mv)):
        from fastseg_eval.engine.dask_graph import run_dask  # dask is imported only when used

        stats = run_dask(reducers, gv, pv, mv, scheduler=scheduler, progress=progress)
    else:
        from fastseg_eval.engine.threads import run_threads

        stats = run_threads(reducers, gv, pv, mv, nworkers, progress, auto=workers is None)
    stats.seconds = time.perf_counter() - t0
    stats.voxels = int(np.prod(gv.spatial_shape, dtype=np.int64))
    return stats
