"""The engine is generic over reducers, with halos: a conformance suite for ``run_reducers``.

Two test-only reducers go through every engine (threads with 1 and 4 workers, dask synchronous,
dask threads, a dask.distributed ``LocalCluster`` in-process, and one with worker processes) on
zarr v3 stores whose chunk grids disagree between pred, gt and mask, numpy arrays, dask arrays
and mixes of them:

* :class:`EdgeChanges` (halo 1) counts, per axis, the pairs of 6-neighbours whose gt labels
  differ, whose pred labels differ, and both; the neighbour of a core voxel may lie in the halo.
  It must equal :func:`edge_reference` (numpy on the whole arrays) exactly: a block handed the
  wrong halo, a voxel counted twice or never, a mask applied to the wrong region, or gt and pred
  swapped all change a count.
* :class:`Probe` (halo 0, 1 or 3) checksums each block in ``add()``, keeps a copy of it, and
  re-checks in ``finish()``; the tests then check that the cores tile the volume exactly once,
  that every block's arrays are the volume at the core grown by the halo (clipped at the edges),
  and that ``block.core`` selects the core.

Several reducers share one run; the threads engine decodes every zarr chunk once (at halo 0,
and with halos 1 and 3 too); a reducer that fails in ``add()`` (or ``finish()``) leaves every
reducer passed in untouched.

The first tests check the test reducers themselves (against a brute-force loop and a hand-made
tiling), so that a failure further down points at the engine, not at the probe.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import math
import os
import pickle
import threading
from dataclasses import dataclass
from typing import Any

import dask.array as da
import numpy as np
import pytest
from conftest import write_zarr

# The order of the ``volumes`` tuple that ``run_reducers`` takes, by role (one place to change).
VOLUME_ORDER = ("pred", "gt", "mask")

SHAPE = (37, 41, 29)  # chunked inputs: many units, whatever the planner's target size
BIG_SHAPE = (70, 66, 50)  # numpy-only inputs: large enough to be cut into several units
ROLES = ("pred", "gt", "mask")
AXES = 3


# ============================================================================ test reducers
def _spatial(a: np.ndarray, ndim: int) -> tuple[int, ...]:
    return tuple(a.shape[:ndim])


class EdgeChanges:
    """Per-axis counts of 6-neighbour pairs whose labels differ (gt, pred, both), plus voxel counts.

    A pair is (v, v + e_axis) with v in the block's core and both ends inside the volume and not
    masked out (mask == 0). The + neighbour of a core voxel on the core's last plane lies in the
    halo; a block whose arrays stop there although the volume goes on is an engine error.
    """

    def __init__(self, halo: int = 1):
        assert halo >= 1
        self.halo = halo
        self.gt = np.zeros(AXES, np.int64)  # pairs whose gt labels differ
        self.pred = np.zeros(AXES, np.int64)  # pairs whose pred labels differ
        self.both = np.zeros(AXES, np.int64)  # pairs where both differ
        self.pairs = np.zeros(AXES, np.int64)  # pairs counted (both ends inside and kept)
        self.voxels = 0  # core voxels
        self.kept = 0  # core voxels not masked out
        self.blocks = 0

    def spawn(self) -> EdgeChanges:
        return EdgeChanges(self.halo)

    def add(self, block: Any) -> None:
        g, p, m, core = block.gt, block.pred, block.mask, block.core
        nd = len(core)
        if _spatial(p, nd) != g.shape or (m is not None and m.shape != g.shape):
            shapes = f"gt {g.shape}, pred {p.shape}, mask {None if m is None else m.shape}"
            raise ValueError(f"block at {block.origin}: {shapes}")
        keep = np.ones(g.shape, bool) if m is None else (m != 0)
        self.voxels += math.prod(block.core_shape)
        self.kept += int(keep[core].sum())
        self.blocks += 1
        for a in range(nd):
            start, stop = core[a].start, core[a].stop
            n = g.shape[a]
            end_in_volume = block.origin[a] - start + n  # where the arrays stop, in volume coordinates
            if n <= stop and end_in_volume < block.shape[a]:
                raise ValueError(
                    f"block at {block.origin} (core {_fmt(core)}, arrays {g.shape}): no halo after the core "
                    f"on axis {a} although the volume goes on to {block.shape[a]}"
                )
            last = min(stop + 1, n)  # neighbours exist for core positions start .. last - 2
            lo, hi = list(core), list(core)
            lo[a] = slice(start, last - 1)
            hi[a] = slice(start + 1, last)
            lo_t, hi_t = tuple(lo), tuple(hi)
            k = keep[lo_t] & keep[hi_t]
            gd = (g[lo_t] != g[hi_t]) & k
            pd = (p[lo_t] != p[hi_t]) & k
            self.gt[a] += int(gd.sum())
            self.pred[a] += int(pd.sum())
            self.both[a] += int((gd & pd).sum())
            self.pairs[a] += int(k.sum())

    def finish(self) -> EdgeChanges:
        return self

    def merge(self, other: EdgeChanges) -> EdgeChanges:
        self.gt += other.gt
        self.pred += other.pred
        self.both += other.both
        self.pairs += other.pairs
        self.voxels += other.voxels
        self.kept += other.kept
        self.blocks += other.blocks
        return self

    def counts(self) -> dict[str, Any]:
        return {
            "gt": self.gt.tolist(),
            "pred": self.pred.tolist(),
            "both": self.both.tolist(),
            "pairs": self.pairs.tolist(),
            "voxels": self.voxels,
            "kept": self.kept,
        }


def edge_reference(gt: np.ndarray, pred: np.ndarray, mask: np.ndarray | None) -> dict[str, Any]:
    """What :class:`EdgeChanges` must count, with numpy on the whole arrays."""
    keep = np.ones(gt.shape, bool) if mask is None else (mask != 0)
    out: dict[str, Any] = {"gt": [], "pred": [], "both": [], "pairs": []}
    for a in range(gt.ndim):
        lo = [slice(None)] * gt.ndim
        hi = [slice(None)] * gt.ndim
        lo[a], hi[a] = slice(0, -1), slice(1, None)
        lo_t, hi_t = tuple(lo), tuple(hi)
        k = keep[lo_t] & keep[hi_t]
        gd = (gt[lo_t] != gt[hi_t]) & k
        pd = (pred[lo_t] != pred[hi_t]) & k
        out["gt"].append(int(gd.sum()))
        out["pred"].append(int(pd.sum()))
        out["both"].append(int((gd & pd).sum()))
        out["pairs"].append(int(k.sum()))
    out["voxels"] = int(gt.size)
    out["kept"] = int(keep.sum())
    return out


def _digest(*arrays: np.ndarray | None, extra: Any = ()) -> str:
    h = hashlib.blake2b(digest_size=16)
    for a in arrays:
        if a is None:
            h.update(b"<none>")
            continue
        h.update(f"{a.dtype.str}{a.shape}".encode())
        h.update(np.ascontiguousarray(a).tobytes())
    h.update(repr(extra).encode())
    return h.hexdigest()


def _fmt(region: Any) -> str:
    return "[" + ", ".join(f"{s.start}:{s.stop}" for s in region) + "]"


class Probe:
    """Keeps a checksummed copy of every block it is handed, for the tests to inspect.

    ``add()`` checksums the block's arrays (with origin and core), copies them, and checksums the
    live arrays again before returning (another thread reusing the buffer mid-``add`` shows up);
    ``finish()`` re-checks the copies against the checksums. Problems go to ``errors``.
    """

    def __init__(self, halo: int = 0):
        self.halo = halo
        self.records: list[dict[str, Any]] = []
        self.errors: list[str] = []

    def spawn(self) -> Probe:
        return Probe(self.halo)

    def add(self, block: Any) -> None:
        core = tuple(block.core)
        key = (tuple(int(o) for o in block.origin), tuple((s.start, s.stop) for s in core))
        before = _digest(block.gt, block.pred, block.mask, extra=key)
        rec = {
            "origin": key[0],
            "core": core,
            "core_shape": tuple(int(c) for c in block.core_shape),
            "shape": tuple(int(s) for s in block.shape),
            "block_halo": int(block.halo),
            "gt": np.array(block.gt, copy=True),
            "pred": np.array(block.pred, copy=True),
            "mask": None if block.mask is None else np.array(block.mask, copy=True),
            "core_gt": np.array(block.gt[core], copy=True),
            "digest": before,
            "pid": os.getpid(),
            "thread": threading.get_ident(),
        }
        self.records.append(rec)
        if _digest(block.gt, block.pred, block.mask, extra=key) != before:
            self.errors.append(f"block at {key[0]}: its arrays changed while add() ran")

    def finish(self) -> Probe:
        for r in self.records:
            key = (r["origin"], tuple((s.start, s.stop) for s in r["core"]))
            if _digest(r["gt"], r["pred"], r["mask"], extra=key) != r["digest"]:
                self.errors.append(f"block at {r['origin']}: the copy made in add() changed before finish()")
        return self

    def merge(self, other: Probe) -> Probe:
        self.records.extend(other.records)
        self.errors.extend(other.errors)
        return self


def check_probe(probe: Probe, gt: np.ndarray, pred: np.ndarray, mask: np.ndarray | None) -> None:
    """The blocks a probe saw tile the volume once and hold the volume's voxels at the right place."""
    h = probe.halo
    assert not probe.errors, probe.errors[:5]
    assert probe.records, f"Probe({h}) was handed no block"
    shape = gt.shape
    cover = np.zeros(shape, np.int32)
    problems: list[str] = []
    for r in probe.records:
        o, cs = r["origin"], r["core_shape"]
        where = f"Probe({h}) block at origin {o}, core shape {cs}"
        if r["shape"] != shape:
            problems.append(f"{where}: block.shape {r['shape']} != volume shape {shape}")
            continue
        if r["block_halo"] != h:
            problems.append(f"{where}: block.halo {r['block_halo']} != the reducer's halo {h}")
        if any(c <= 0 for c in cs) or any(oo < 0 or oo + c > n for oo, c, n in zip(o, cs, shape)):
            problems.append(f"{where}: the core is empty or leaves the volume {shape}")
            continue
        cover[tuple(slice(oo, oo + c) for oo, c in zip(o, cs))] += 1
        lo = tuple(max(0, oo - h) for oo in o)
        hi = tuple(min(n, oo + c + h) for oo, c, n in zip(o, cs, shape))
        region = tuple(slice(a, b) for a, b in zip(lo, hi))
        want_core = tuple(slice(oo - a, oo - a + c) for oo, a, c in zip(o, lo, cs))
        if r["core"] != want_core:
            problems.append(f"{where}: block.core {_fmt(r['core'])}, expected {_fmt(want_core)}")
        if r["gt"].shape != tuple(b - a for a, b in zip(lo, hi)):
            problems.append(
                f"{where}: arrays of shape {r['gt'].shape}, expected the region {_fmt(region)} "
                f"(core grown by {h}, clipped)"
            )
            continue
        if not np.array_equal(r["gt"], gt[region]):
            problems.append(f"{where}: gt differs from the volume's gt at {_fmt(region)}")
        if not np.array_equal(r["pred"], pred[region]):
            problems.append(f"{where}: pred differs from the volume's pred at {_fmt(region)}")
        if (r["mask"] is None) != (mask is None):
            problems.append(f"{where}: block.mask is {'None' if r['mask'] is None else 'an array'}")
        elif mask is not None and not np.array_equal(r["mask"] != 0, mask[region] != 0):
            problems.append(f"{where}: mask differs from the volume's mask at {_fmt(region)}")
        core_region = tuple(slice(oo, oo + c) for oo, c in zip(o, cs))
        if not np.array_equal(r["core_gt"], gt[core_region]):
            problems.append(f"{where}: gt[block.core] is not the volume's gt at the core {_fmt(core_region)}")
    assert not problems, f"{len(problems)} problems, first ones:\n" + "\n".join(problems[:8])
    gaps, overlaps = int((cover == 0).sum()), int((cover > 1).sum())
    assert gaps == 0 and overlaps == 0, (
        f"Probe({h}): cores do not tile the volume: {gaps} voxels in no core, {overlaps} in several "
        f"(first: {np.argwhere(cover != 1)[:3].tolist()}); core voxels {int(cover.sum())}, volume {gt.size}"
    )
    assert sum(math.prod(r["core_shape"]) for r in probe.records) == gt.size


class Fail(Exception):
    """The injected failure (module level: picklable for dask.distributed)."""


class FailsOn:
    """Counts blocks; raises in ``add()`` (or ``finish()``) for the block whose core holds ``voxel``."""

    def __init__(self, voxel: tuple[int, ...], where: str = "add", halo: int = 0):
        self.voxel, self.where, self.halo = voxel, where, halo
        self.blocks = 0
        self.armed = False

    def spawn(self) -> FailsOn:
        return FailsOn(self.voxel, self.where, self.halo)

    def add(self, block: Any) -> None:
        self.blocks += 1
        hit = all(o <= v < o + c for o, c, v in zip(block.origin, block.core_shape, self.voxel))
        if hit and self.where == "add":
            raise Fail(f"injected failure in add() at the block holding {self.voxel}")
        self.armed = self.armed or hit

    def finish(self) -> FailsOn:
        if self.armed and self.where == "finish":
            raise Fail(f"injected failure in finish() of the partial holding {self.voxel}")
        return self

    def merge(self, other: FailsOn) -> FailsOn:
        self.blocks += other.blocks
        return self


# ==================================================================================== data
def blobs(shape: tuple[int, ...], n: int, cell: int, rng: np.random.Generator) -> np.ndarray:
    """Piecewise-constant labels 0..n-1: coarse random cells of about ``cell`` voxels, offset."""
    coarse = rng.integers(0, n, [s // cell + 2 for s in shape])
    idx = [(np.arange(s) + int(rng.integers(0, cell))) // cell for s in shape]
    return coarse[np.ix_(*idx)]


def make_data(shape: tuple[int, ...], seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """pred (uint8), gt (uint16) with blob structure, pred = shifted gt in places + noise; bool mask."""
    rng = np.random.default_rng(seed)
    gt = blobs(shape, 5, 6, rng).astype(np.uint16)
    pred = gt.copy()
    moved = blobs(shape, 2, 9, rng) == 1
    pred[moved] = np.roll(gt, (1, -2, 1), axis=(0, 1, 2))[moved]
    noise = rng.random(shape) < 0.03
    pred[noise] = rng.integers(0, 5, int(noise.sum()))
    pred = pred.astype(np.uint8)
    mask = blobs(shape, 4, 7, rng) != 0
    mask[rng.random(shape) < 0.02] = False
    return pred, gt, mask


@dataclass
class Case:
    name: str
    arrays: dict[str, np.ndarray | None]  # numpy truth, by role
    inputs: dict[str, Any]  # what open_volume gets, by role
    chunked: bool  # some input has a chunk grid: several units whatever the planner's target
    has_dask: bool


# role -> ("zarr", chunks) | ("dask", chunks) | ("numpy",) | None
LAYOUTS: dict[str, tuple[tuple[int, ...], dict[str, Any]]] = {
    "zarr-misaligned": (
        SHAPE,
        {"pred": ("zarr", (8, 16, 29)), "gt": ("zarr", (10, 7, 12)), "mask": ("zarr", (16, 16, 16))},
    ),
    "zarr-aligned": (
        SHAPE,
        {"pred": ("zarr", (16, 16, 16)), "gt": ("zarr", (16, 16, 16)), "mask": ("zarr", (16, 16, 16))},
    ),
    "numpy": (BIG_SHAPE, {"pred": ("numpy",), "gt": ("numpy",), "mask": ("numpy",)}),
    "dask-mixed": (
        SHAPE,
        {"pred": ("zarr", (8, 16, 29)), "gt": ("dask", (12, 20, 15)), "mask": ("numpy",)},
    ),
    "numpy-zarr-nomask": (SHAPE, {"pred": ("numpy",), "gt": ("zarr", (10, 7, 12)), "mask": None}),
}
ENGINE_CASES = ["zarr-misaligned", "numpy", "dask-mixed", "numpy-zarr-nomask"]


@pytest.fixture(scope="module")
def cases(tmp_path_factory) -> dict[str, Case]:
    root = tmp_path_factory.mktemp("seam")
    data = {SHAPE: make_data(SHAPE, 20260611), BIG_SHAPE: make_data(BIG_SHAPE, 20260612)}
    out = {}
    for name, (shape, layout) in LAYOUTS.items():
        arrays = dict(zip(ROLES, data[shape]))
        inputs: dict[str, Any] = {}
        for role in ROLES:
            how = layout[role]
            if how is None:
                arrays[role] = None
                inputs[role] = None
            elif how[0] == "zarr":
                path = root / f"{name}-{role}.zarr"
                write_zarr(path, arrays[role], how[1], zarr_format=3)
                inputs[role] = str(path)
            elif how[0] == "dask":
                inputs[role] = da.from_array(arrays[role], chunks=how[1])
            else:
                inputs[role] = arrays[role]
        kinds = [layout[r][0] for r in ROLES if layout[r] is not None]
        out[name] = Case(name, arrays, inputs, "zarr" in kinds or "dask" in kinds, "dask" in kinds)
    return out


# ================================================================================= engines
@dataclass
class Engine:
    name: str
    workers: int | None
    scheduler: Any


ENGINES = [
    "threads-1",
    "threads-4",
    "dask-sync",
    "dask-threads",
    "distributed-inproc",
    pytest.param("distributed-procs", marks=pytest.mark.slow),
]


def _local_cluster(processes: bool, n_workers: int, threads: int):
    distributed = pytest.importorskip("distributed")
    cluster = distributed.LocalCluster(
        n_workers=n_workers,
        threads_per_worker=threads,
        processes=processes,
        memory_limit="1GiB" if processes else "auto",
        dashboard_address=":0",
        scheduler_kwargs={"dashboard": False},
    )
    client = distributed.Client(cluster, set_as_default=False)
    return cluster, client


@pytest.fixture(scope="module")
def inproc_client():
    cluster, client = _local_cluster(processes=False, n_workers=2, threads=2)
    with cluster, client:
        yield client


@pytest.fixture(scope="module")
def procs_client():
    cluster, client = _local_cluster(processes=True, n_workers=2, threads=1)
    with cluster, client:
        yield client


@pytest.fixture(params=ENGINES)
def engine(request) -> Engine:
    name = request.param
    if name == "threads-1":
        return Engine(name, 1, None)
    if name == "threads-4":
        return Engine(name, 4, None)
    if name == "dask-sync":
        return Engine(name, None, "synchronous")
    if name == "dask-threads":
        return Engine(name, 2, "threads")
    if name == "distributed-inproc":
        return Engine(name, None, request.getfixturevalue("inproc_client"))
    return Engine(name, None, request.getfixturevalue("procs_client"))


@pytest.fixture
def small_units(monkeypatch):
    """Small dask units, not widened to the grids' common period: many blocks, so halos cross units.

    (The dask planner's default target makes these small test volumes one unit; the threads engine
    cuts along the primary zarr input's chunks, and numpy-only inputs into slabs, either way.)
    """
    from fastseg_eval.engine import dask_graph

    monkeypatch.setattr(dask_graph, "UNIT_VOXELS", 2048)
    monkeypatch.setattr(dask_graph, "ALIGN_MAX_VOXELS", 1)


def run(reducers: list, case: Case, engine: Engine) -> Any:
    from fastseg_eval.engine import run_reducers
    from fastseg_eval.io.volume import open_volume

    vols = {r: None if case.inputs[r] is None else open_volume(case.inputs[r], r) for r in ROLES}
    stats = run_reducers(
        reducers, tuple(vols[r] for r in VOLUME_ORDER), workers=engine.workers, scheduler=engine.scheduler
    )
    if engine.scheduler is not None:
        want = "distributed" if engine.name.startswith("distributed") else "dask"
        assert stats.engine == want, f"scheduler={engine.scheduler!r} ran on the {stats.engine!r} engine"
    elif not case.has_dask:
        assert stats.engine == "threads", f"numpy / zarr inputs without a scheduler ran on {stats.engine!r}"
    return stats


def check_edges(red: EdgeChanges, case: Case, stats: Any, *, many: bool = True) -> None:
    a = case.arrays
    want = edge_reference(a["gt"], a["pred"], a["mask"])
    assert red.counts() == want, f"{case.name}: EdgeChanges {red.counts()} != numpy {want}"
    if many and case.chunked:
        assert red.blocks > 1, f"{case.name}: one block only, the halo was never exercised"
    # a unit may reach a reducer as several blocks (the threads engine hands halo-0 reducers one
    # block per cell of the grids' intersection), never as fewer
    assert red.blocks >= stats.units, (
        f"{red.blocks} blocks handed to EdgeChanges, stats.units = {stats.units}"
    )


# ================================================================= the test reducers themselves
def edge_brute_force(gt, pred, mask) -> dict[str, Any]:
    out: dict[str, Any] = {k: [0] * AXES for k in ("gt", "pred", "both", "pairs")}
    keep = (lambda v: True) if mask is None else (lambda v: bool(mask[v]))
    for v in itertools.product(*map(range, gt.shape)):
        for a in range(AXES):
            w = list(v)
            w[a] += 1
            w = tuple(w)
            if w[a] >= gt.shape[a] or not (keep(v) and keep(w)):
                continue
            g, p = gt[v] != gt[w], pred[v] != pred[w]
            out["pairs"][a] += 1
            out["gt"][a] += int(g)
            out["pred"][a] += int(p)
            out["both"][a] += int(g and p)
    out["voxels"] = int(gt.size)
    out["kept"] = int(gt.size if mask is None else np.count_nonzero(mask))
    return out


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("with_mask", [True, False])
def test_edge_reference_matches_a_brute_force_loop(seed, with_mask):
    shape = [(5, 6, 4), (1, 7, 3), (4, 1, 1), (6, 5, 2)][seed]
    pred, gt, mask = make_data(shape, seed)
    mask = mask if with_mask else None
    assert edge_reference(gt, pred, mask) == edge_brute_force(gt, pred, mask)


def test_data_has_structure():
    pred, gt, mask = make_data(SHAPE, 20260611)
    ref = edge_reference(gt, pred, mask)
    for k in ("gt", "pred", "both"):
        assert all(0 < c < p // 2 for c, p in zip(ref[k], ref["pairs"])), (k, ref)  # blobs, not noise
    assert ref["gt"] != ref["pred"]  # a swap of gt and pred shows up
    assert 0.5 < mask.mean() < 0.9


def hand_blocks(gt, pred, mask, cuts, halo):
    """A hand-made engine: cells of the grid ``cuts`` (boundaries per axis), grown by ``halo``."""
    from fastseg_eval.reducers.base import Block

    for cell in itertools.product(*[list(zip(c[:-1], c[1:])) for c in cuts]):
        lo = [max(0, a - halo) for a, _ in cell]
        hi = [min(n, b + halo) for (_, b), n in zip(cell, gt.shape)]
        region = tuple(slice(a, b) for a, b in zip(lo, hi))
        yield Block(
            gt=gt[region],
            pred=pred[region],
            mask=None if mask is None else mask[region],
            origin=tuple(a for a, _ in cell),
            core=tuple(slice(a - low, b - low) for (a, b), low in zip(cell, lo)),
            shape=gt.shape,
            halo=halo,
        )


def _hand_run(reducers, arrays, cuts):
    """spawn / add / finish / pickle / merge as an engine would, one worker per block row."""
    for red in reducers:
        workers = [red.spawn() for _ in range(3)]
        blocks = hand_blocks(arrays["gt"], arrays["pred"], arrays["mask"], cuts, red.halo)
        for i, b in enumerate(blocks):
            workers[i % 3].add(b)
        for w in workers:
            red.merge(pickle.loads(pickle.dumps(w.finish())))


CUTS = [[0, 5, 16, 30, 37], [0, 1, 20, 41], [0, 12, 13, 29]]  # uneven, with 1-voxel cells


@pytest.mark.parametrize("with_mask", [True, False])
def test_test_reducers_on_a_hand_made_tiling(with_mask):
    pred, gt, mask = make_data(SHAPE, 7)
    arrays = {"pred": pred, "gt": gt, "mask": mask if with_mask else None}
    reds = [EdgeChanges(), EdgeChanges(3), Probe(0), Probe(1), Probe(3)]
    _hand_run(reds, arrays, CUTS)
    for e in reds[:2]:
        assert e.counts() == edge_reference(gt, pred, arrays["mask"])
        assert e.blocks == 4 * 3 * 3
    for p in reds[2:]:
        check_probe(p, gt, pred, arrays["mask"])
    assert reds[0].counts() != edge_reference(pred, gt, arrays["mask"])  # gt and pred swapped shows


def test_test_reducers_catch_a_wrong_engine():
    pred, gt, mask = make_data(SHAPE, 8)
    # halo 0 handed to a halo-1 reducer: the missing neighbours are an error, not a silent miss
    blocks = list(hand_blocks(gt, pred, mask, CUTS, 0))
    with pytest.raises(ValueError, match="no halo after the core"):
        e = EdgeChanges()
        for b in blocks:
            e.add(b)
    # a missing block, a duplicated block, a block handed a halo of 2 instead of 3, a stale buffer
    for damage in ("drop", "duplicate", "halo", "stale"):
        p = Probe(3)
        blocks = list(hand_blocks(gt, pred, mask, CUTS, 3 if damage != "halo" else 2))
        if damage == "drop":
            blocks.pop(5)
        if damage == "duplicate":
            blocks.append(blocks[5])
        if damage == "stale":
            b = blocks[5]
            blocks[5] = dataclasses.replace(b, gt=blocks[4].gt)  # a buffer from another read
        for b in blocks:
            p.add(b)
        p.finish()
        with pytest.raises(AssertionError):
            check_probe(p, gt, pred, mask)


def test_test_reducers_pickle():
    pred, gt, mask = make_data((9, 8, 7), 3)
    for red in (EdgeChanges(), Probe(1), FailsOn((0, 0, 0), "finish")):
        b = next(hand_blocks(gt, pred, mask, [[0, 4, 9], [0, 8], [0, 7]], red.halo))
        red.add(b)
        back = pickle.loads(pickle.dumps(red))
        assert type(back) is type(red) and back.halo == red.halo
    assert back.spawn().blocks == 0


# ============================================================================ through engines
@pytest.mark.parametrize("planning", ["default-units", "small-units"])
@pytest.mark.parametrize("case_name", ENGINE_CASES)
def test_edge_changes_equal_numpy(engine, cases, case_name, planning, request):
    if planning == "small-units":
        request.getfixturevalue("small_units")
    case = cases[case_name]
    red = EdgeChanges()
    stats = run([red], case, engine)
    check_edges(red, case, stats, many=planning == "small-units" or engine.scheduler is None)


@pytest.mark.parametrize("case_name", ENGINE_CASES)
def test_several_reducers_share_one_pass(engine, cases, case_name, small_units):
    case = cases[case_name]
    a = case.arrays
    reds = [EdgeChanges(), Probe(0), Probe(3)]
    stats = run(reds, case, engine)
    check_edges(reds[0], case, stats)
    for p in reds[1:]:
        check_probe(p, a["gt"], a["pred"], a["mask"])
        assert len(p.records) >= stats.units
    if engine.name == "distributed-procs":
        pids = {r["pid"] for r in reds[1].records}
        assert os.getpid() not in pids, "distributed with processes=True ran the blocks in the client process"


@pytest.mark.parametrize("halo", [0, 1, 3])
def test_probe_sees_the_volume_at_every_halo(engine, cases, halo, small_units):
    case = cases["zarr-misaligned"]
    a = case.arrays
    probe = Probe(halo)
    stats = run([probe], case, engine)
    check_probe(probe, a["gt"], a["pred"], a["mask"])
    assert len(probe.records) >= stats.units


@pytest.mark.parametrize("halo", [0, 1, 3])
@pytest.mark.parametrize("case_name", ["zarr-aligned", "zarr-misaligned"])
@pytest.mark.parametrize("workers", [1, 4])
def test_threads_decode_every_chunk_once(cases, case_name, workers, halo):
    """At halo 0 (the brief's rule), and with halos too: the threads engine keeps this today."""
    case = cases[case_name]
    a = case.arrays
    reds = [Probe(0), Probe(halo)]
    stats = run(reds, case, Engine(f"threads-{workers}", workers, None))
    for p in reds:
        check_probe(p, a["gt"], a["pred"], a["mask"])
    zarr_roles = {r for r in ROLES if LAYOUTS[case_name][1][r] and LAYOUTS[case_name][1][r][0] == "zarr"}
    assert set(stats.chunks_total) == zarr_roles, stats.chunks_total
    for r in zarr_roles:
        chunks = LAYOUTS[case_name][1][r][1]
        assert stats.chunks_total[r] == math.prod(math.ceil(s / c) for s, c in zip(SHAPE, chunks))
    assert stats.chunks_decoded == stats.chunks_total


@pytest.mark.parametrize("where", ["add", "finish"])
def test_a_failing_reducer_leaves_every_reducer_untouched(engine, cases, where, small_units):
    case = cases["zarr-misaligned"]
    edges, probe = EdgeChanges(), Probe(1)
    failing = FailsOn((20, 20, 15), where)
    with pytest.raises(Exception) as info:
        run([edges, probe, failing], case, engine)
    chain, e = [], info.value
    while e is not None and len(chain) < 10:
        chain.append(f"{type(e).__name__}: {e}")
        e = e.__cause__ or e.__context__
    assert any("injected failure" in c for c in chain), chain
    assert edges.counts() == EdgeChanges().counts() and edges.blocks == 0
    assert probe.records == [] and probe.errors == []
    assert failing.blocks == 0
    # and the same reducers still work in a later run
    stats = run([edges, probe], case, engine)
    check_edges(edges, case, stats)
    check_probe(probe, case.arrays["gt"], case.arrays["pred"], case.arrays["mask"])
