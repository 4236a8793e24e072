"""The reducer protocol: what the engine hands every reducer of a run, and what it asks back.

A **reducer** holds the state one metric family needs (count tables, a contingency table,
surface samples) and knows how to fill it from one block of voxels. The engine is generic over
reducers: it reads each chunk of every input once, cuts the volume into work units, and hands
every reducer of the run the unit as one or more :class:`Block` objects whose cores tile it (with
the halo that reducer declared; at halo 0 a unit over misaligned chunk grids may come as several
blocks, one per piece, so that no voxel is copied); several reducers therefore share one pass.

Life of a reducer in a run::

    worker = reducer.spawn()        # an empty copy per worker (thread, dask task); picklable
    worker.add(block)               # for each block of the units the worker takes
    partial = worker.finish()       # what goes back (picklable, small)
    reducer.merge(partial)          # the engine merges every partial into the caller's reducer,
                                    # only after the whole run succeeded

``merge`` must be associative (partials are tree-summed in any order). A reducer never keeps a
reference to a block's arrays after ``add`` returns: the engine reuses their buffers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import numpy as np


@dataclass(frozen=True)
class Block:
    """One work unit's voxels, with context around it.

    ``gt``, ``pred`` and ``mask`` (None without a mask) cover the unit's *core* region grown by
    ``halo`` voxels on every side, clipped at the volume's edges. ``core`` selects the core inside
    these arrays; ``origin`` is the position of the core's first voxel in the volume and ``shape``
    the volume's shape. Every voxel of the volume lies in exactly one block's core: a reducer that
    counts only core voxels (and uses the halo as read-only context) counts each voxel once.
    Probability maps carry their channel axis last in ``pred``.
    """

    gt: np.ndarray
    pred: np.ndarray
    mask: np.ndarray | None
    origin: tuple[int, ...]
    core: tuple[slice, ...]
    shape: tuple[int, ...]
    halo: int = 0

    @property
    def core_shape(self) -> tuple[int, ...]:
        return tuple(s.stop - s.start for s in self.core)

    def with_halo(self, halo: int) -> Block:
        """The same block with at most ``halo`` voxels of context (views, no copies)."""
        if halo >= self.halo:
            return self
        cut = []
        for s, n in zip(self.core, self.gt.shape):
            lo = max(0, s.start - halo)
            hi = min(n, s.stop + halo)
            cut.append(slice(lo, hi))
        cut_t = tuple(cut)
        core = tuple(slice(s.start - c.start, s.stop - c.start) for s, c in zip(self.core, cut_t))
        return Block(
            gt=self.gt[cut_t],
            pred=self.pred[cut_t],
            mask=None if self.mask is None else self.mask[cut_t],
            origin=self.origin,
            core=core,
            shape=self.shape,
            halo=halo,
        )


@runtime_checkable
class Reducer(Protocol):
    """State + per-block work; see the module docstring for the life of a reducer in a run."""

    halo: int
    """Voxels of context the reducer needs around each block's core (0 for counting)."""

    # Optional: ``accepts_constant = True`` tells an engine that the reducer takes blocks whose
    # arrays may be read-only broadcasts of one value (all strides 0: a chunk the store does not
    # hold, read as its fill value without decoding). Without it (the default), blocks hold
    # ordinary arrays.

    def spawn(self) -> Any:
        """An empty reducer with the same options, for one worker."""

    def add(self, block: Block) -> None:
        """Add one block (only its core voxels count; the halo is context)."""

    def finish(self) -> Any:
        """The partial result of a spawned reducer, to be merged into the caller's reducer."""

    def merge(self, other: Any) -> Any:
        """Add a partial (from :meth:`finish`) into this reducer; returns ``self``."""
