"""Dask engine: one counting task per work unit, partial accumulators tree-summed in the graph.

Used for dask inputs and whenever a ``scheduler`` is given (dask's local schedulers, or
dask.distributed: see :mod:`fastseg_eval.distributed` for the accepted forms).

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
    own graph. numpy inputs already live on the client: local schedulers get views, a
    distributed cluster gets each unit's slab scattered to a worker. Each counting task returns a
    small :class:`~fastseg_eval.confusion.ConfusionMatrix`; partials are merged ``fan_in`` at a
    time inside the graph, so only the final accumulator comes back to the client.

Failure
    Every task is a pure function of its arguments (a fresh counter per task, merges copy),
    so when a worker dies dask recomputes what it held and the result stays exact; the
    caller's accumulator is only touched after the whole graph succeeded. Slabs scattered from
    numpy inputs cannot be recomputed by dask: if their worker dies (also while they are being
    scattered) the run is re-submitted, as often as dask itself retries a task whose worker died
    (``distributed.scheduler.allowed-failures``), then fails with one clear message.
"""

from __future__ import annotations

import itertools
import logging
import math
import os
import threading
import time
import uuid
import warnings
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import numpy as np

from .confusion import ConfusionMatrix
from .engine import RunStats, auto_chunks, boundaries, finish_counter, make_counter
from .errors import BackendError, InputError
from .sources import Volume

log = logging.getLogger("fastseg_eval")

Region = tuple[tuple[int, int], ...]  # (start, stop) per axis

UNIT_VOXELS = 1 << 22
"""Target voxels per counting task for zarr and numpy inputs (small chunks are grouped up to it)."""
ALIGN_MAX_VOXELS = 1 << 24
"""Largest unit that misaligned chunk grids may be widened to so every chunk is decoded once."""
FAN_IN = 8
"""Partial accumulators merged per merge task."""
NUMPY_RETRIES: int | None = None
"""Re-submissions of a distributed run whose scattered numpy slabs died with their worker
(None: dask's own limit, ``distributed.scheduler.allowed-failures``)."""


# ------------------------------------------------------------------------ zarr inputs on workers
@dataclass(frozen=True)
class Locator:
    """Where a zarr array lives, in a form any worker can reopen: never the data itself."""

    store: str  # "local" | "zip" | "fsspec"
    location: str  # directory, zip file or URL of the store root
    path: str  # node path of the array inside the store ("" for a root array)
    storage_options: tuple[tuple[str, Any], ...] = ()

    def open(self) -> Any:
        import zarr
        import zarr.storage

        if self.store == "local":
            store: Any = zarr.storage.LocalStore(self.location, read_only=True)
        elif self.store == "zip":
            store = zarr.storage.ZipStore(self.location, mode="r")
        else:
            store = zarr.storage.FsspecStore.from_url(
                self.location, storage_options=dict(self.storage_options) or None, read_only=True
            )
        return zarr.open_array(store=store, path=self.path or None, mode="r")

    def describe(self) -> str:
        return f"{self.location}" + (f" (node {self.path})" if self.path else "")

    def cache_key(self) -> tuple[str, str, str, str]:
        # storage option values may be unhashable (nested dicts): key on their repr
        return (self.store, self.location, self.path, repr(self.storage_options))


def locate(vol: Volume) -> Locator | None:
    """A :class:`Locator` for a zarr volume, or None when its store cannot be reopened elsewhere
    (an in-memory store, a wrapper store)."""
    import zarr.storage

    arr = vol.array
    store = arr.store
    node = str(arr.path or "")
    if isinstance(store, zarr.storage.LocalStore):
        return Locator("local", os.path.abspath(store.root), node)
    if isinstance(store, zarr.storage.ZipStore):
        return Locator("zip", os.path.abspath(store.path), node)
    if isinstance(store, zarr.storage.FsspecStore):
        remote = vol.url is not None and "://" in vol.url and not vol.url.startswith("file://")
        if remote:
            url, opts = vol.url, dict(vol.storage_options or {})
        else:
            url = store.fs.unstrip_protocol(store.path)
            opts = {k: v for k, v in (store.fs.storage_options or {}).items() if k != "asynchronous"}
        return Locator("fsspec", str(url), node, tuple(sorted(opts.items())))
    return None


_OPEN: dict[tuple[str, str, str, str], Any] = {}
_OPEN_LOCK = threading.Lock()
_OPEN_MAX = 64


class ZarrSource:
    """A zarr input as tasks see it: the locator, the expected shape and dtype, and (only in
    the process that made it) the already-open array. Pickles to the locator alone."""

    def __init__(self, vol: Volume, locator: Locator | None):
        self.role, self.source, self.locator = vol.role, vol.source, locator
        self.shape, self.dtype = vol.shape, vol.dtype  # of the stored array, to check a reopened one
        self.chunks = vol.spatial_chunks  # the grid units are planned on (no channel axis)
        self.channel_axis = vol.channel_axis
        self._array = vol.array

    def __getstate__(self) -> dict[str, Any]:
        st = dict(self.__dict__)
        if self.locator is not None:
            st["_array"] = None  # reopened by path on the other side
        return st

    def __setstate__(self, st: dict[str, Any]) -> None:
        self.__dict__.update(st)

    def _open(self, fresh: bool = False) -> Any:
        if self._array is not None and not fresh:
            return self._array
        loc = self.locator
        assert loc is not None
        with _OPEN_LOCK:
            arr = None if fresh else _OPEN.get(loc.cache_key())
        if arr is None:
            try:
                arr = loc.open()
            except Exception as e:
                raise InputError(
                    f"{self.role} ({self.source}): cannot open {loc.describe()} on worker {_worker_name()}: "
                    f"{type(e).__name__}: {e}. The store must be reachable from every worker "
                    "(a shared filesystem path, or an object-store URL with storage options)"
                ) from e
            with _OPEN_LOCK:
                if len(_OPEN) >= _OPEN_MAX:
                    _OPEN.pop(next(iter(_OPEN)))
                _OPEN[loc.cache_key()] = arr
        if tuple(arr.shape) != self.shape or np.dtype(arr.dtype) != self.dtype:
            if not fresh:
                return self._open(fresh=True)  # a stale handle of a rewritten store
            raise InputError(
                f"{self.role} ({self.source}): on worker {_worker_name()} the array has shape "
                f"{tuple(arr.shape)} and dtype {arr.dtype}, not {self.shape} {self.dtype} as on the "
                "client; the store changed during the run or the worker sees a different copy"
            )
        return arr

    def __getitem__(self, region: tuple[slice, ...]) -> np.ndarray:
        """Voxels of ``region`` (a tuple of slices) as a numpy array."""
        arr = self._open()
        ax = self.channel_axis
        try:
            if ax is None:
                return np.asarray(arr[region])
            # a probability map: every channel, channel axis last (as Volume.read)
            return np.moveaxis(np.asarray(arr[region[:ax] + (slice(None),) + region[ax:]]), ax, -1)
        except Exception as e:  # a codec or store error: name the input and the region
            where = ", ".join(f"{s.start}:{s.stop}" for s in region)
            raise InputError(
                f"{self.role} ({self.source}): cannot read voxels [{where}] on worker {_worker_name()}: "
                f"{type(e).__name__}: {e}. The chunk file may be truncated or corrupted."
            ) from e


def _worker_name() -> str:
    try:
        from distributed import get_worker

        return str(get_worker().address)
    except (ImportError, ValueError):
        return "(local)"


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
def count_unit(
    template: ConfusionMatrix,
    backend: str,
    offset: tuple[int, ...],
    gt: Any,
    pred: Any,
    mask: Any = None,
) -> ConfusionMatrix:
    """Count one unit into a fresh accumulator (a pure function of its arguments)."""
    arrays = [
        x.load() if isinstance(x, Read) else None if x is None else np.asarray(x) for x in (gt, pred, mask)
    ]
    counter = make_counter(template, backend)
    counter.add_chunk(arrays[0], arrays[1], arrays[2], offset=offset)
    return finish_counter(counter)


def merge_partials(*parts: ConfusionMatrix) -> ConfusionMatrix:
    """Sum partial accumulators into a new one (the inputs are not changed)."""
    out = parts[0].copy()
    for p in parts[1:]:
        out.merge(p)
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
    template: ConfusionMatrix,
    gv: Volume,
    pv: Volume,
    mv: Volume | None,
    *,
    backend: str = "cpu",
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
    shape = gv.shape
    locators = {v.role: locate(v) for v in vols if v.kind == "zarr"}
    # zarr arrays that cannot be reopened elsewhere are read on the client, like numpy arrays
    here = {
        v.role for v in vols
        if v.kind == "numpy" or (v.kind == "zarr" and locators[v.role] is None and client is not None)
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

    count = dask.delayed(count_unit, pure=True)
    parts, voxels = [], {}
    pieces: list[list[Any]] = [[piece(v, i, u) for v in vols] for i, u in enumerate(units)]
    scattered = False
    if client is not None and here:
        flat = [(i, j) for i in range(len(units)) for j, v in enumerate(vols) if v.role in here]
        futures = client.scatter([pieces[i][j] for i, j in flat], hash=False)
        for (i, j), f in zip(flat, futures):
            pieces[i][j] = f
        scattered = True
    for i, (unit, args) in enumerate(zip(units, pieces)):
        key = f"fastseg-count-{run}-{i}"
        offset = tuple(a for a, _ in unit)
        mask_arg = args[2] if mv is not None else None
        parts.append(count(template, backend, offset, args[0], args[1], mask_arg, dask_key_name=key))
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


def _compute_local(graph: Graph, scheduler: Any, progress: Callable[[int], None] | None) -> ConfusionMatrix:
    import dask

    cm = _local_progress(graph.voxels, progress) if progress is not None else nullcontext()
    kwargs = {} if scheduler is None else {"scheduler": scheduler}
    with cm:
        (result,) = dask.compute(graph.total, optimize_graph=False, **kwargs)
    return result


def _compute_client(client: Any, graph: Graph, progress: Callable[[int], None] | None) -> ConfusionMatrix:
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
    acc: ConfusionMatrix,
    gv: Volume,
    pv: Volume,
    mv: Volume | None,
    *,
    scheduler: Any = None,
    progress: Callable[[int], None] | None = None,
    backend: str = "cpu",
    target: int | None = None,
) -> RunStats:
    """Count ``gt`` / ``pred`` / ``mask`` with a dask graph and merge the result into ``acc``.

    ``scheduler`` is anything :func:`fastseg_eval.distributed.resolve_scheduler` accepts.
    ``progress`` receives the voxel count of each counting task as it finishes (once per
    task, also when a lost task had to be recomputed). ``acc`` changes only on success.
    """
    from .distributed import connect, resolve_scheduler

    spec = resolve_scheduler(scheduler)
    template = acc.spawn()
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
                graph = build_graph(template, gv, pv, mv, backend=backend, client=client, target=target)
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

            from .engine import default_workers

            nworkers = int(dask.config.get("num_workers", None) or default_workers())
    acc.merge(result)
    if progress is not None and attempt > 0:
        progress(max(0, math.prod(gv.shape) - reported))
    return RunStats(
        engine=session.label,
        workers=nworkers,
        units=len(graph.units),
        chunks_decoded=graph.chunks_decoded,
        chunks_total=graph.chunks_total,
    )
