"""Work units over chunk grids, worker counts, and what a run reports about itself.

Shared by the engines (:mod:`~fastseg_eval.engine.threads`, :mod:`~fastseg_eval.engine.dask_graph`):
a *region* is a ``(start, stop)`` pair per axis; a *unit* is the region one task or thread takes
at a time, cut along the inputs' chunk grids so that each chunk is decoded once.
"""

from __future__ import annotations

import bisect
import itertools
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from fastseg_eval.errors import OptionError

Region = tuple[tuple[int, int], ...]  # (start, stop) per axis


@dataclass
class RunStats:
    """What a run did: used for the report's ``timing`` and for tests of the decode-once rule."""

    engine: str = "threads"
    workers: int = 1
    seconds: float = 0.0
    voxels: int = 0
    units: int = 0
    chunks_decoded: dict[str, int] = field(default_factory=dict)
    chunks_total: dict[str, int] = field(default_factory=dict)


def default_workers() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - not on Linux
        return max(1, os.cpu_count() or 1)


def check_workers(workers: Any) -> int:
    if workers is None:
        return default_workers()
    if isinstance(workers, bool) or not isinstance(workers, (int, np.integer)) or workers < 1:
        raise OptionError(f"workers must be a positive integer, got {workers!r}")
    return int(workers)


def auto_chunks(shape: Sequence[int], target: int) -> tuple[int, ...]:
    """Chunk shape of about ``target`` voxels, cutting leading axes first (keeps rows whole)."""
    c = [max(1, int(s)) for s in shape]
    for ax in range(len(c)):
        while math.prod(c) > target and c[ax] > 1:
            c[ax] = (c[ax] + 1) // 2
    return tuple(c)


def boundaries(shape: Sequence[int], chunks: Sequence[int]) -> list[list[int]]:
    """Chunk start offsets plus the end, per axis."""
    return [[*range(0, n, c), n] if n else [0] for n, c in zip(shape, chunks)]


def interval_index(bounds: list[int], x: int) -> int:
    """Index of the interval of ``bounds`` that contains ``x``."""
    return bisect.bisect_right(bounds, x) - 1


def grow(region: Region, halo: int, shape: Sequence[int]) -> Region:
    """``region`` grown by ``halo`` voxels on every side, clipped to the volume."""
    return tuple((max(0, a - halo), min(n, b + halo)) for (a, b), n in zip(region, shape))


def core_slices(core: Region, grown: Region) -> tuple[slice, ...]:
    """Where ``core`` lies inside an array holding ``grown``."""
    return tuple(slice(a - ga, b - ga) for (a, b), (ga, _) in zip(core, grown))


def product_units(bounds: Sequence[Sequence[int]]) -> list[Region]:
    """Every unit of the grid given by per-axis boundaries, in C order."""
    per_axis = [list(zip(b[:-1], b[1:])) for b in bounds]
    return [tuple(u) for u in itertools.product(*per_axis)]
