"""Dask engine: one counting task per work unit, partial accumulators tree-summed in the graph.

Used for dask inputs and whenever a ``scheduler`` is given (dask's local schedulers, or
dask.distributed: see :mod:`fastseg_eval.engine.cluster` for the accepted forms).

Work units
    With a dask input, a unit is one block of the dask inputs' common chunk grid
    (``unify_chunks``). Otherwise a unit is a chunk, or a small group of chunks, of the *primary*
    zarr input (the one with the largest chunks); when the inputs' chunk grids differ, groups
    are widened to the grids' common period where that stays small, so every chunk of every
    input is decoded exactly once; where it does not, only chunks straddling a unit edge are
    decoded by each unit they touch. numpy-only inputs are cut into slabs.

What travels
    Zarr inputs travel as *locators* (store path or URL, node path, storage options), never as
    voxel data or pickled zarr arrays: each task opens the store on its worker (handles are
    cached per process) and reads its unit's region of every input. Dask inputs travel as their
    own graph. numpy inputs (and files read by region, see io.formats) are read on the client:
    local schedulers get views, a
    distributed cluster gets each unit's slab scattered to a worker. Each counting task returns a
    small list of reducer partials (one per reducer of the run); partials are merged ``fan_in`` at a
    time inside the graph, so only the final accumulator comes back to the client.

Reducers and halos
    Each counting task spawns every reducer of the run, adds its unit and returns the partials;
    merge tasks sum them element by element. When a reducer asks for a halo, each unit's region
    of every input is read once by a task of its own, and the task that counts a unit also takes
    the read tasks of the neighbouring units its grown region overlaps (dask's ``map_overlap``
    idea): chunks are still decoded once, and only halo slices are copied.

Failure
    Every task is a pure function of its arguments (a fresh counter per task, merges copy),
    so when a worker dies dask recomputes what it held and the result stays exact; the
    caller's accumulator is only touched after the whole graph succeeded. Slabs scattered from
    numpy inputs cannot be recomputed by dask: if their worker dies (also while they are being
    scattered) the run is re-submitted, as often as dask itself retries a task whose worker died
    (``distributed.scheduler.allowed-failures``), then fails with one clear message.
"""

from __future__ import annotations

import copy
import itertools
import logging
import math
import time
import uuid
import warnings
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import numpy as np

from fastseg_eval.engine.plan import (
    Region,
    RunStats,
    auto_chunks,
    boundaries,
    core_slices,
    default_workers,
    grow,
    interval_index,
)
from fastseg_eval.errors import BackendError
from fastseg_eval.io.locator import ZarrSource, locate
from fastseg_eval.io.volume import Volume
from fastseg_eval.reducers.base import Block, Reducer

log = logging.getLogger("fastseg_eval")

UNIT_VOXELS = 1 << 22
"""Target voxels per counting task for zarr and numpy inputs (small chunks are grouped up to it)."""
ALIGN_MAX_VOXELS = 1 << 24
"""Largest unit that misaligned chunk grids may be widened to so every chunk is decoded once."""
FAN_IN = 8
"""Partial accumulators merged per merge task."""
NUMPY_RETRIES: int | None = None
"""Re-submissions of a distributed run whose scattered numpy slabs died with their worker
(None: dask's own limit, ``distributed.scheduler.allowed-failures``)."""


class Read:
    """A region of a zarr input, read inside the task that counts it.

    A plain class on purpose: dask unpacks dataclasses found in task arguments, not this.
    """

    __slots__ = ("region", "source")

    def __init__(self, source: ZarrSource, region: Region):
        self.source, self.region = source, region

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        return Read, (self.source, self.region)

    def load(self) -> np.ndarray:
        return self.source[tuple(slice(a, b) for a, b in self.region)]


# ------------------------------------------------------------------------------ the task bodies
def _array(x: Any) -> Any:
    return x.load() if isinstance(x, Read) else None if x is None else np.asarray(x)


def _add_all(templates: Sequence[Reducer], block: Block) -> list[Any]:
    """Fresh reducers (one per template) fed ``block``; their partials."""
    out = []
    for t in templates:
        r = t.spawn()
        r.add(block.with_halo(int(t.halo)))
        out.append(r.finish())
    return out


def count_unit(
    templates: Sequence[Reducer], shape: tuple[int, ...], offset: tuple[int, ...], gt: Any, pred: Any, mask: Any = None
) -> list[Any]:
    """Every reducer's partial for one unit (a pure function of its arguments)."""
    g, p, m = _array(gt), _array(pred), _array(mask)
    core = tuple(slice(0, n) for n in g.shape)
    return _add_all(templates, Block(gt=g, pred=p, mask=m, origin=tuple(offset), core=core, shape=shape))


def count_grown_unit(
    templates: Sequence[Reducer],
    shape: tuple[int, ...],
    unit: Region,
    grown: Region,
    halo: int,
    parts: Sequence[Sequence[tuple[Region, Any]]],
) -> list[Any]:
    """Every reducer's partial for one unit read with a halo: ``parts`` holds, per input (gt, pred,
    mask), the (region, array) of each neighbouring unit the grown region overlaps."""
    arrays: list[np.ndarray | None] = []
    for pieces in parts:
        if not pieces:
            arrays.append(None)
            continue
        out = None
        for region, piece in pieces:
            a = _array(piece)
            if out is None:
                extra = a.shape[len(grown) :]  # a probability map's channel axis
                out = np.empty(tuple(b - lo for lo, b in grown) + extra, dtype=a.dtype)
            dst = tuple(slice(max(lo, r0) - lo, min(hi, r1) - lo) for (lo, hi), (r0, r1) in zip(grown, region))
            src = tuple(slice(max(lo, r0) - r0, min(hi, r1) - r0) for (lo, hi), (r0, r1) in zip(grown, region))
            out[dst] = a[src]
        arrays.append(out)
    block = Block(
        gt=arrays[0], pred=arrays[1], mask=arrays[2], origin=tuple(a for a, _ in unit),
        core=core_slices(unit, grown), shape=shape, halo=halo,
    )  # fmt: skip
    return _add_all(templates, block)


def load(piece: Any) -> np.ndarray:
    """A unit's region of one input, as a task of its own (shared by the neighbours' halos)."""
    return _array(piece)


def merge_partials(*parts: list[Any]) -> list[Any]:
    """Sum lists of partials element by element into new ones (the inputs are not changed)."""
    out = [copy.deepcopy(p) for p in parts[0]]
    for more in parts[1:]:
        for mine, theirs in zip(out, more):
            mine.merge(theirs)
    return out


def tree_sum(parts: list[Any], fan_in: int = FAN_IN, name: str = "fastseg-merge") -> Any:
    """Tree-merge delayed partial accumulators, ``fan_in`` at a time."""
    import dask

    merge = dask.delayed(merge_partials, pure=True)
    level = 0
    while len(parts) > 1:
        parts = [
            merge(*parts[i : i + fan_in], dask_key_name=f"{name}-{level}-{i // fan_in}")
            for i in range(0, len(parts), fan_in)
        ]
        level += 1
    return parts[0]


# ------------------------------------------------------------------------------------- planning
def plan_units(
    shape: Sequence[int],
    chunk_shapes: Sequence[Sequence[int]],
    target: int = UNIT_VOXELS,
    align_max: int | None = None,
) -> list[Region]:
    """Units over ``shape``: groups of chunks of ``chunk_shapes[0]`` (the primary input).

    Per axis the group is widened to the common period of all chunk grids (their lcm) while a
    unit stays within ``align_max`` voxels (default :data:`ALIGN_MAX_VOXELS`), then grown
    towards ``target`` voxels in steps of that period (trailing axes first).
    """
    align_max = ALIGN_MAX_VOXELS if align_max is None else align_max
    ndim = len(shape)
    primary = [max(1, int(c)) for c in chunk_shapes[0]]
    extent = [max(1, int(s)) for s in shape]
    period = [1] * ndim
    for ax in range(ndim):
        p = math.lcm(*(max(1, int(c[ax])) for c in chunk_shapes))
        period[ax] = p // primary[ax]
    group = [1] * ndim

    def size(g: list[int]) -> int:
        return math.prod(min(g[a] * primary[a], extent[a]) for a in range(ndim))

    step = [1] * ndim
    for ax in reversed(range(ndim)):  # align where it stays small
        trial = list(group)
        trial[ax] = period[ax]
        if period[ax] > 1 and size(trial) <= align_max:
            group, step[ax] = trial, period[ax]
    for ax in reversed(range(ndim)):  # then grow small units towards the target
        while group[ax] * primary[ax] < extent[ax]:
            trial = list(group)
            trial[ax] += step[ax]
            if size(trial) > target:
                break
            group = trial
    unit = [group[a] * primary[a] for a in range(ndim)]
    per_axis = [list(zip(b[:-1], b[1:])) for b in boundaries(shape, unit)]
    return [tuple(u) for u in itertools.product(*per_axis)]


def _unit_grid(units: list[Region]) -> list[list[int]]:
    """Per-axis boundaries of units that form a product grid in C order (as the planners make)."""
    ndim = len(units[0])
    bounds = [sorted({u[a][0] for u in units} | {u[a][1] for u in units}) for a in range(ndim)]
    expected = math.prod(len(b) - 1 for b in bounds)
    if expected != len(units):  # pragma: no cover - the planners only make product grids
        raise AssertionError("work units do not form a grid")
    return bounds


def _units_overlapping(bounds: list[list[int]], region: Region) -> list[int]:
    """Indices (C order) of the grid's units that overlap ``region``."""
    ranges = [range(interval_index(b, lo), interval_index(b, hi - 1) + 1) for b, (lo, hi) in zip(bounds, region)]
    dims = [len(b) - 1 for b in bounds]
    return [int(np.ravel_multi_index(idx, dims)) for idx in itertools.product(*ranges)]


def _chunks_touched(region: Region, chunks: Sequence[int]) -> int:
    return math.prod((b - 1) // c - a // c + 1 for (a, b), c in zip(region, chunks))


def _dask_units(vols: list[Volume]) -> tuple[list[Any], list[Region]]:
    """Unify the dask inputs' chunk grids over the spatial axes; one unit per block.

    A probability map's channel axis becomes one chunk, moved last (as ``Volume.read`` does).
    """
    import dask.array as da
    from dask.array.core import unify_chunks

    ndim = len(vols[0].spatial_shape)
    ind = "".join(chr(ord("a") + i) for i in range(ndim))
    args: list[Any] = []
    for v in vols:
        a, ax = v.array, v.channel_axis
        if ax is None:
            args += [a, ind]
        else:
            args += [da.moveaxis(a.rechunk({ax: -1}), ax, -1), ind + "z"]
    with warnings.catch_warnings():  # a finer common grid is the point here, not a mistake
        warnings.simplefilter("ignore", da.PerformanceWarning)
        _, arrays = unify_chunks(*args)
    starts = [np.concatenate([[0], np.cumsum(c)]).astype(int).tolist() for c in arrays[0].chunks[:ndim]]
    per_axis = [list(zip(s[:-1], s[1:])) for s in starts]
    return arrays, [tuple(u) for u in itertools.product(*per_axis)]


# ------------------------------------------------------------------------------------ the graph
@dataclass
class Graph:
    """The delayed counting tasks of a run, their voxel counts, and the merged total."""

    total: Any
    parts: list[Any]
    voxels: dict[str, int]
    units: list[Region]
    chunks_decoded: dict[str, int]
    chunks_total: dict[str, int]
    scattered: bool = False


def build_graph(
    templates: Sequence[Reducer],
    gv: Volume,
    pv: Volume,
    mv: Volume | None,
    *,
    client: Any = None,
    target: int | None = None,
) -> Graph:
    """The counting graph for ``gt`` / ``pred`` / ``mask`` (see the module docstring).

    With a ``client``, numpy inputs (and zarr arrays in stores a worker cannot reopen) are
    scattered to the workers slab by slab; everything else stays where it is.
    """
    import dask

    target = UNIT_VOXELS if target is None else target
    vols = [v for v in (gv, pv, mv) if v is not None]
    run = uuid.uuid4().hex[:12]
    shape = tuple(gv.shape)
    halo = max((int(t.halo) for t in templates), default=0)
    locators = {v.role: locate(v) for v in vols if v.kind == "zarr"}
    # zarr arrays that cannot be reopened elsewhere are read on the client, like numpy arrays
    here = {
        v.role for v in vols
        if v.kind in ("numpy", "file") or (v.kind == "zarr" and locators[v.role] is None and client is not None)
    }  # fmt: skip
    sources = {
        v.role: ZarrSource(v, locators[v.role]) for v in vols if v.kind == "zarr" and v.role not in here
    }
    dask_vols = [v for v in vols if v.kind == "dask"]
    blocks: dict[str, Any] = {}
    if dask_vols:
        unified, units = _dask_units(dask_vols)
        for v, a in zip(dask_vols, unified):
            blocks[v.role] = a.to_delayed().ravel()
    else:
        zarrs = sorted(sources.values(), key=lambda s: (-math.prod(s.chunks), s.role != "gt"))
        if zarrs:
            units = plan_units(shape, [s.chunks for s in zarrs], target)
        else:
            units = plan_units(shape, [auto_chunks(shape, target)], target)
    if not units:  # an empty volume: nothing to count
        return Graph(None, [], {}, [], {}, {})
    for role, src in sources.items():
        if not src.locator:
            log.info(
                "%s (%s): its store cannot be reopened on a worker; the array object travels instead",
                role,
                src.source,
            )
    if any(v.role in here for v in vols) and client is not None:
        log.info("scattering the slabs of %s to the workers", ", ".join(sorted(here)))

    def piece(v: Volume, i: int, region: Region) -> Any:
        if v.role in blocks:
            return blocks[v.role][i]
        if v.role in sources:
            return Read(sources[v.role], region)
        return v.read(tuple(slice(a, b) for a, b in region))

    parts, voxels = [], {}
    pieces: list[list[Any]] = [[piece(v, i, u) for v in vols] for i, u in enumerate(units)]
    scattered = False
    if client is not None and here:
        flat = [(i, j) for i in range(len(units)) for j, v in enumerate(vols) if v.role in here]
        futures = client.scatter([pieces[i][j] for i, j in flat], hash=False)
        for (i, j), f in zip(flat, futures):
            pieces[i][j] = f
        scattered = True
    if halo == 0:  # each unit read inside the task that counts it
        count = dask.delayed(count_unit, pure=True)
        for i, (unit, args) in enumerate(zip(units, pieces)):
            key = f"fastseg-count-{run}-{i}"
            offset = tuple(a for a, _ in unit)
            mask_arg = args[2] if mv is not None else None
            parts.append(count(templates, shape, offset, args[0], args[1], mask_arg, dask_key_name=key))
            voxels[key] = math.prod(b - a for a, b in unit)
    else:  # each unit read once as a task of its own; a unit's task also takes its neighbours'
        loader = dask.delayed(load, pure=True)
        loaded = [
            [p if not isinstance(p, Read) else loader(p, dask_key_name=f"fastseg-read-{run}-{i}-{j}")
             for j, p in enumerate(args)]
            for i, args in enumerate(pieces)
        ]  # fmt: skip
        grid = _unit_grid(units)
        count = dask.delayed(count_grown_unit, pure=True)
        for i, unit in enumerate(units):
            key = f"fastseg-count-{run}-{i}"
            grown = grow(unit, halo, shape)
            near = _units_overlapping(grid, grown)
            per_input = [[(units[k], loaded[k][j]) for k in near] for j in range(len(vols))]
            if mv is None:
                per_input.append([])
            parts.append(count(templates, shape, unit, grown, halo, per_input, dask_key_name=key))
            voxels[key] = math.prod(b - a for a, b in unit)
    decoded = {r: sum(_chunks_touched(u, s.chunks) for u in units) for r, s in sources.items()}
    total_chunks = {r: math.prod(len(b) - 1 for b in boundaries(shape, s.chunks)) for r, s in sources.items()}
    total = tree_sum(parts, name=f"fastseg-merge-{run}") if parts else None
    return Graph(total, parts, voxels, units, decoded, total_chunks, scattered)


# ------------------------------------------------------------------------------------ executing
def _local_progress(voxels: dict[str, int], progress: Callable[[int], None]) -> Any:
    """A dask local-scheduler callback that reports each finished counting task's voxels."""
    from dask.callbacks import Callback

    def posttask(key: Any, result: Any, dsk: Any, state: Any, worker_id: Any) -> None:
        n = voxels.get(key) if isinstance(key, str) else None
        if n is not None:
            progress(n)

    return Callback(posttask=posttask)


def _compute_local(graph: Graph, scheduler: Any, progress: Callable[[int], None] | None) -> list[Any]:
    import dask

    cm = _local_progress(graph.voxels, progress) if progress is not None else nullcontext()
    kwargs = {} if scheduler is None else {"scheduler": scheduler}
    with cm:
        (result,) = dask.compute(graph.total, optimize_graph=False, **kwargs)
    return result


def _compute_client(client: Any, graph: Graph, progress: Callable[[int], None] | None) -> list[Any]:
    from distributed import as_completed

    if progress is None:
        future = client.compute(graph.total, optimize_graph=False)
        try:
            return future.result()
        except BaseException:  # an error or an interrupt: a shared cluster must not keep computing
            _cancel(client, [future])
            raise
        finally:
            future.release()
    futures = client.compute([graph.total, *graph.parts], optimize_graph=False)
    total, parts = futures[0], futures[1:]
    try:
        done = as_completed(parts, loop=client.loop)
        del parts, futures
        for f in done:
            if f.status != "finished":
                break  # erred or cancelled: total.result() raises why
            progress(graph.voxels[f.key])
            # dropping ``f`` releases the partial (the merge that needs it keeps it alive)
        return total.result()
    except BaseException:
        _cancel(client, [total])
        raise


def _cancel(client: Any, futures: list[Any]) -> None:
    """Cancel ``futures`` (and what only they need) on the cluster; never raises."""
    try:
        client.cancel(futures)
    except Exception as e:  # the cluster may be gone already
        log.debug("cancelling the run's futures: %s: %s", type(e).__name__, e)


def _is_lost_data(e: BaseException) -> bool:
    """A run that failed because scattered data died with its worker: dask cancels what needed it,
    or the scatter itself lost its connection to a worker that died."""
    names = {type(x).__name__ for x in (e, e.__cause__, e.__context__) if x is not None}
    return bool(names & {"FutureCancelledError", "CancelledError", "CommClosedError", "StreamClosedError"})


def _numpy_retries() -> int:
    """Re-submissions of a run with scattered numpy slabs: :data:`NUMPY_RETRIES`, else dask's own
    limit on a task's lost workers (``distributed.scheduler.allowed-failures``, 3 by default)."""
    if NUMPY_RETRIES is not None:
        return int(NUMPY_RETRIES)
    import dask

    try:
        return max(0, int(dask.config.get("distributed.scheduler.allowed-failures", 3)))
    except (TypeError, ValueError):
        return 3


def _cluster_error(e: Exception) -> Exception:
    """``e``, or for dask's ``KilledWorker`` (a task whose workers kept dying) one clear message."""
    if type(e).__name__ != "KilledWorker":
        return e
    import dask

    limit = dask.config.get("distributed.scheduler.allowed-failures", 3)
    return BackendError(
        f"dask workers kept dying while running a counting task ({e}); dask gave up after "
        f"{limit} lost workers (distributed.scheduler.allowed-failures). Check the workers' logs "
        "and memory limit"
    )


def run_dask(
    reducers: Sequence[Reducer],
    gv: Volume,
    pv: Volume,
    mv: Volume | None,
    *,
    scheduler: Any = None,
    progress: Callable[[int], None] | None = None,
    target: int | None = None,
) -> RunStats:
    """Run ``reducers`` over ``gt`` / ``pred`` / ``mask`` as a dask graph; merge the results into them.

    ``scheduler`` is anything :func:`fastseg_eval.engine.cluster.resolve_scheduler` accepts.
    ``progress`` receives the voxel count of each counting task as it finishes (once per
    task, also when a lost task had to be recomputed). The reducers change only on success.
    """
    from fastseg_eval.engine.cluster import connect, resolve_scheduler

    spec = resolve_scheduler(scheduler)
    templates = [r.spawn() for r in reducers]  # empty and picklable: they travel in every task
    with connect(spec) as session:
        client = session.client
        attempts = 1 + (_numpy_retries() if client is not None else 0)
        reported = 0

        def report(n: int) -> None:
            nonlocal reported
            reported += n
            progress(n)  # type: ignore[misc]

        for attempt in range(attempts):
            graph = None
            try:
                graph = build_graph(templates, gv, pv, mv, client=client, target=target)
                if graph.total is None:
                    return RunStats(engine=session.label, workers=0, units=0)
                # a re-submitted run reports only what the failed attempt did not, at the end
                tick = report if progress is not None and attempt == 0 else None
                if client is not None:
                    result = _compute_client(client, graph, tick)
                else:
                    result = _compute_local(graph, session.local, tick)
            except Exception as e:
                # scattered numpy slabs died with their worker (or a worker died while they were
                # being scattered): dask cannot recompute them, the run is sent again
                scattering = client is not None and (graph is None or graph.scattered)
                if not (scattering and _is_lost_data(e)):
                    raise _cluster_error(e) from e
                if attempt + 1 < attempts:
                    log.warning(
                        "a worker holding scattered numpy data died (%s: %s); re-submitting the run (%d of %d)",
                        type(e).__name__, e, attempt + 1, attempts - 1,
                    )  # fmt: skip
                    time.sleep(min(0.25 * (attempt + 1), 1.0))  # let the nanny bring the worker back
                    continue
                raise BackendError(
                    f"dask workers holding the scattered numpy inputs kept dying: the run was sent "
                    f"{attempts} times ({attempts - 1} re-submissions, dask's distributed.scheduler."
                    f"allowed-failures) and failed each time; last: {type(e).__name__}: {e}. Check the "
                    "workers' logs and memory limit, or pass zarr paths, which workers reread themselves"
                ) from e
            break
        if client is not None:
            nworkers = sum(client.nthreads().values())
        elif session.local == "sync":
            nworkers = 1
        else:
            import dask

            nworkers = int(dask.config.get("num_workers", None) or default_workers())
    for r, part in zip(reducers, result):
        r.merge(part)
    if progress is not None and attempt > 0:
        progress(max(0, math.prod(gv.shape) - reported))
    return RunStats(
        engine=session.label,
        workers=nworkers,
        units=len(graph.units),
        chunks_decoded=graph.chunks_decoded,
        chunks_total=graph.chunks_total,
    )
