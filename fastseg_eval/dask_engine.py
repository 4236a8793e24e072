"""Dask engine: one task per block of the common chunk grid, partial accumulators tree-summed.

Used for dask inputs and whenever a ``scheduler`` is given. Each task returns a small
:class:`~fastseg_eval.confusion.ConfusionMatrix` (a few KB pickled), never voxel data; the
partials are merged in the same graph, which is computed once.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from typing import Any

import numpy as np

from .confusion import ConfusionMatrix
from .engine import RunStats, auto_chunks, finish_counter, make_counter
from .sources import Volume


def _as_dask(vol: Volume, like: Any = None) -> Any:
    import dask.array as da

    if vol.kind == "dask":
        return vol.array
    if vol.kind == "zarr":
        return da.from_array(vol.array, chunks=vol.array.chunks, lock=False, asarray=True, inline_array=True)
    chunks = like.chunks if like is not None else auto_chunks(vol.shape)
    return da.from_array(vol.array, chunks=chunks)


def _count_block(
    template: ConfusionMatrix,
    backend: str,
    gt: np.ndarray,
    pred: np.ndarray,
    mask: Any,
    offset: tuple[int, ...],
) -> ConfusionMatrix:
    counter = make_counter(template, backend)
    counter.add_chunk(
        np.asarray(gt), np.asarray(pred), None if mask is None else np.asarray(mask), offset=offset
    )
    return finish_counter(counter)


def _merge_all(*parts: ConfusionMatrix) -> ConfusionMatrix:
    out = parts[0].copy()
    for p in parts[1:]:
        out.merge(p)
    return out


def tree_sum(parts: list[Any], fan_in: int = 8) -> Any:
    """Tree-merge delayed partial accumulators, ``fan_in`` at a time."""
    import dask

    merge = dask.delayed(_merge_all, pure=True)
    while len(parts) > 1:
        parts = [merge(*parts[i : i + fan_in]) for i in range(0, len(parts), fan_in)]
    return parts[0]


def run_dask(
    acc: ConfusionMatrix,
    gv: Volume,
    pv: Volume,
    mv: Volume | None,
    *,
    scheduler: Any = None,
    progress: Callable[[int], None] | None = None,
    backend: str = "cpu",
) -> RunStats:
    import dask
    from dask.array.core import unify_chunks

    like = next((v.array for v in (gv, pv, mv) if v is not None and v.kind == "dask"), None)
    arrays = [_as_dask(v, like) for v in (gv, pv, mv) if v is not None]
    ind = "".join(chr(ord("a") + i) for i in range(len(gv.shape)))
    _, arrays = unify_chunks(*itertools.chain.from_iterable((a, ind) for a in arrays))
    chunks = arrays[0].chunks
    starts = [np.concatenate([[0], np.cumsum(c)[:-1]]).astype(int).tolist() for c in chunks]
    blocks = [a.to_delayed().ravel() for a in arrays]
    template = acc.spawn()
    count = dask.delayed(_count_block, pure=True)
    parts = []
    for i, idx in enumerate(itertools.product(*(range(len(c)) for c in chunks))):
        offset = tuple(starts[a][j] for a, j in enumerate(idx))
        m = blocks[2][i] if mv is not None else None
        parts.append(count(template, backend, blocks[0][i], blocks[1][i], m, offset))
    if not parts:
        return RunStats(engine="dask", workers=0, units=0)
    total = tree_sum(parts)
    kwargs = {} if scheduler is None else {"scheduler": scheduler}
    (result,) = dask.compute(total, **kwargs)
    acc.merge(result)
    if progress is not None:
        progress(int(np.prod(gv.shape, dtype=np.int64)))
    return RunStats(engine="dask", workers=0, units=len(parts))
