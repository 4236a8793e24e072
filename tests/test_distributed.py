"""The dask engine on dask.distributed: exact results, scheduler forms, no voxel data to the
client, and exact results after a worker dies mid-run.

One ``LocalCluster`` (2 single-threaded worker processes, 1 GiB each) is shared by the module;
the tests that kill a worker run last and wait for the nanny to bring it back. Every matrix is
compared with ``np.bincount`` (``strategies.reference_confusion``) and with the local thread
engine on the same inputs.
"""

from __future__ import annotations

import collections
import logging
import math
import os
import pickle
import signal
import time

import hypothesis.strategies as st
import numpy as np
import pytest
import zarr
from hypothesis import given, settings
from strategies import reference_confusion

import fastseg_eval as fse
from fastseg_eval import ConfusionMatrix
from fastseg_eval.engine import dask_graph as dask_engine
from fastseg_eval.engine.cluster import VALID_FORMS, SchedulerSpec, resolve_scheduler
from fastseg_eval.errors import LabelError, OptionError
from fastseg_eval.io import locator
from fastseg_eval.io.volume import open_volume

distributed = pytest.importorskip("distributed")
from distributed.diagnostics.plugin import SchedulerPlugin  # noqa: E402

pytestmark = pytest.mark.slow

SHAPE = (37, 41, 29)
IGNORE = 9
# chunk shapes of (gt, pred, mask). "misaligned": the grids' common period (24, 16, 16) is small,
# so units are widened to it and every chunk is still decoded once; "straddling": the same grids
# with that widening switched off, so chunks straddling unit edges are read by every unit they touch.
LAYOUTS = {
    "aligned": ((16, 16, 16), (16, 16, 16), (16, 16, 16)),
    "misaligned": ((8, 8, 8), (12, 4, 8), (6, 16, 16)),
    "straddling": ((8, 8, 8), (12, 4, 8), (6, 16, 16)),
}


# ------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def cluster():
    """One LocalCluster for the module: ``(cluster, client)``."""
    with (
        distributed.LocalCluster(
            n_workers=2,
            threads_per_worker=1,
            processes=True,
            memory_limit="1GiB",
            dashboard_address=":0",
            scheduler_kwargs={"dashboard": False},
        ) as cl,
        distributed.Client(cl, set_as_default=False) as client,
    ):
        client.register_plugin(ExecutionCount())
        yield cl, client


@pytest.fixture(scope="module")
def client(cluster):
    return cluster[1]


@pytest.fixture(scope="module")
def volumes():
    """gt (uint16, with ignore-label voxels), pred (uint8, 70 % agreement) and a bool mask."""
    rng = np.random.default_rng(20260611)
    gt = rng.integers(0, 6, SHAPE).astype(np.uint16)
    gt[rng.random(SHAPE) < 0.05] = IGNORE
    pred = np.where(rng.random(SHAPE) < 0.7, gt % 6, rng.integers(0, 6, SHAPE)).astype(np.uint8)
    mask = rng.random(SHAPE) < 0.8
    return gt, pred, mask


def write(path, data, chunks, zarr_format=3, **kw):
    arr = zarr.create_array(
        store=str(path), shape=data.shape, chunks=chunks, dtype=data.dtype, fill_value=0,
        zarr_format=zarr_format, overwrite=True, **kw,
    )  # fmt: skip
    arr[...] = data
    return str(path)


@pytest.fixture(scope="module")
def stores(tmp_path_factory, volumes):
    """``stores[(zarr_format, layout)] = (gt_path, pred_path, mask_path)``."""
    root = tmp_path_factory.mktemp("stores")
    out = {}
    for fmt in (2, 3):
        for layout, chunks in LAYOUTS.items():
            if layout == "straddling":
                out[fmt, layout] = out[fmt, "misaligned"]
                continue
            out[fmt, layout] = tuple(
                write(root / f"{name}-v{fmt}-{layout}.zarr", data, ch, fmt)
                for name, data, ch in zip(("gt", "pred", "mask"), volumes, chunks)
            )
    return out


@pytest.fixture
def small_units(monkeypatch):
    """Units of about 2048 voxels, so the small test volumes make many tasks and a merge tree."""
    monkeypatch.setattr(dask_engine, "UNIT_VOXELS", 2048)


class ExecutionCount(SchedulerPlugin):
    """Counts, on the scheduler, how often each task finished computing (processing -> memory)."""

    name = "fastseg-execution-count"

    def __init__(self):
        self.counts = collections.Counter()

    def transition(self, key, start, finish, *args, **kwargs):
        if start == "processing" and finish == "memory":
            self.counts[str(key)] += 1


def execution_counts(client) -> dict[str, int]:
    return client.run_on_scheduler(
        lambda dask_scheduler: dict(dask_scheduler.plugins[ExecutionCount.name].counts)
    )


def expected(volumes, *, masked=True, ignore=True):
    gt, pred, mask = volumes
    return reference_confusion(
        pred, gt, mask=mask if masked else None, ignore_label=IGNORE if ignore else None
    )


# ---------------------------------------------------------------------------- scheduler forms
@pytest.mark.parametrize(
    ("value", "kind", "detail"),
    [
        (None, "default", None),
        ("threads", "local", "threads"),
        ("Threading", "local", "threads"),
        ("processes", "local", "processes"),
        ("synchronous", "local", "sync"),
        ("single-threaded", "local", "sync"),
        ("local:3", "local-cluster", 3),
        ("tcp://10.1.2.3:8786", "address", "tcp://10.1.2.3:8786"),
        ("tls://scheduler.example.org:8786", "address", "tls://scheduler.example.org:8786"),
        ("distributed", "current", None),
    ],
)
def test_resolve_scheduler_forms(value, kind, detail, caplog):
    with caplog.at_level(logging.INFO, logger="fastseg_eval"):
        spec = resolve_scheduler(value)
    assert spec == SchedulerSpec(kind, detail)
    assert any("scheduler" in r.getMessage() and repr(value) in r.getMessage() for r in caplog.records)


def test_resolve_scheduler_local_without_count_uses_one_worker_per_core():
    from fastseg_eval.engine import default_workers

    assert resolve_scheduler("local") == SchedulerSpec("local-cluster", default_workers())


def test_resolve_scheduler_client_and_cluster(cluster):
    cl, client = cluster
    assert resolve_scheduler(client) == SchedulerSpec("client", client)
    assert resolve_scheduler(cl) == SchedulerSpec("cluster", cl)


@pytest.mark.parametrize("value", ["thread", "local:0", "local:two", "http://host:8786", "", 42, 3.5])
def test_resolve_scheduler_rejects_unknown(value):
    with pytest.raises(OptionError) as info:
        resolve_scheduler(value)
    msg = str(info.value)
    assert repr(value) in msg
    for form in VALID_FORMS:
        assert form in msg


# ---------------------------------------------------------------------------- planning, purity
@settings(max_examples=60)
@given(
    shape=st.lists(st.integers(0, 40), min_size=1, max_size=3).map(tuple),
    data=st.data(),
    target=st.integers(1, 5000),
    align_max=st.sampled_from([1, 1 << 24]),
)
def test_units_tile_the_volume_on_the_primary_grid(shape, data, target, align_max):
    grids = data.draw(
        st.lists(st.tuples(*(st.integers(1, 12) for _ in shape)), min_size=1, max_size=3), label="chunks"
    )
    units = dask_engine.plan_units(shape, grids, target, align_max)
    cover = np.zeros(shape, dtype=np.int64)
    for unit in units:
        cover[tuple(slice(a, b) for a, b in unit)] += 1
        # whole chunks of the primary input; of every input when the grids' period fits
        for grid in grids if align_max > 40**3 else grids[:1]:
            for (a, b), c, n in zip(unit, grid, shape):
                assert a % c == 0 and (b % c == 0 or b == n)
    assert (cover == 1).all()  # every voxel in exactly one unit


def test_tasks_are_pure_functions(volumes):
    """Counting and merging never change their inputs, so dask may run any task again."""
    gt, pred, mask = volumes
    template = ConfusionMatrix(ignore_label=IGNORE)
    before = pickle.dumps(template)
    halves = [(slice(0, 20),), (slice(20, None),)]
    shape = gt.shape
    parts = [  # each task returns one partial per reducer of the run: here one
        dask_engine.count_unit([template], shape, (h[0].start, 0, 0), gt[h], pred[h], mask[h]) for h in halves
    ]
    (again,) = dask_engine.count_unit(
        [template], shape, (0, 0, 0), gt[halves[0]], pred[halves[0]], mask[halves[0]]
    )
    assert pickle.dumps(template) == before
    np.testing.assert_array_equal(again.counts, parts[0][0].counts)
    snapshots = [pickle.dumps(p) for p in parts]
    (total,) = dask_engine.merge_partials(*parts)
    assert [pickle.dumps(p) for p in parts] == snapshots
    assert dask_engine.merge_partials(*parts)[0].counts.tolist() == total.counts.tolist()
    np.testing.assert_array_equal(total.counts, expected(volumes)[0])


# -------------------------------------------------------------------- exactness on the cluster
@pytest.mark.parametrize("masked", [True, False], ids=["mask+ignore", "plain"])
@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("zarr_format", [2, 3], ids=["zarr-v2", "zarr-v3"])
def test_cluster_matches_thread_engine(
    client, stores, volumes, zarr_format, layout, masked, small_units, monkeypatch
):
    if layout == "straddling":
        monkeypatch.setattr(dask_engine, "ALIGN_MAX_VOXELS", 1)
    gt_path, pred_path, mask_path = stores[zarr_format, layout]
    opts = dict(mask=mask_path, ignore_label=IGNORE) if masked else {}
    ref, labels = expected(volumes, masked=masked, ignore=masked)

    local = fse.evaluate(pred_path, gt_path, workers=2, **opts)
    res = fse.evaluate(pred_path, gt_path, scheduler=client, **opts)

    np.testing.assert_array_equal(res.confusion_matrix, ref)
    np.testing.assert_array_equal(res.confusion_matrix, local.confusion_matrix)
    assert [int(x) for x in res.labels] == labels
    assert res.to_dict()["n_ignored"] == local.to_dict()["n_ignored"]
    timing = res.to_dict()["timing"]
    assert timing["engine"] == "distributed"
    assert timing["workers"] == 2
    assert timing["units"] > dask_engine.FAN_IN  # a real merge tree, not one task
    decoded, total = timing["chunks_decoded"], timing["chunks_total"]
    if layout == "straddling":
        assert all(decoded[r] >= total[r] for r in total)
        assert any(decoded[r] > total[r] for r in total)  # straddling chunks read more than once
    else:  # units follow the grids' common period: every chunk of every input read once
        assert decoded == total


def test_cluster_dask_and_numpy_inputs(client, stores, volumes, small_units):
    import dask.array as da

    gt, pred, mask = volumes
    ref, labels = expected(volumes, masked=True, ignore=False)
    gt_path = stores[3, "misaligned"][0]
    # a dask prediction (odd blocks) against a zarr ground truth read on the workers
    res = fse.evaluate(da.from_array(pred, chunks=(10, 17, 29)), gt_path, mask=mask, scheduler=client)
    np.testing.assert_array_equal(res.confusion_matrix, ref)
    assert res.to_dict()["timing"]["units"] == 4 * 3
    # numpy inputs only: slabs scattered to the workers
    res = fse.evaluate(pred, gt, mask=mask, scheduler=client)
    np.testing.assert_array_equal(res.confusion_matrix, ref)
    assert [int(x) for x in res.labels] == labels


def test_store_kinds_zip_and_fsspec_url(client, tmp_path, volumes, small_units):
    """A zip store and an fsspec URL (with storage options) reopened on the workers."""
    gt, pred, _ = volumes
    write(tmp_path / "gt.zarr", gt, (8, 8, 8))
    with zarr.storage.ZipStore(tmp_path / "gt.zip", mode="w") as zs:
        arr = zarr.create_array(store=zs, name="seg", shape=gt.shape, chunks=(8, 8, 8), dtype=gt.dtype)
        arr[...] = gt
    write(tmp_path / "pred.zarr", pred, (12, 4, 8), 2)
    url = "local://" + str(tmp_path / "pred.zarr")
    pv = open_volume(url, "pred", storage_options={"auto_mkdir": False})
    loc = locator.locate(pv)
    assert (loc.store, loc.location, dict(loc.storage_options)) == ("fsspec", url, {"auto_mkdir": False})
    assert locator.locate(open_volume(str(tmp_path / "gt.zip/seg"), "gt")).store == "zip"

    res = fse.evaluate(
        url, str(tmp_path / "gt.zip/seg"), scheduler=client, storage_options={"auto_mkdir": False}
    )
    np.testing.assert_array_equal(res.confusion_matrix, reference_confusion(pred, gt)[0])


def test_progress_reports_every_voxel_once(client, stores, volumes, small_units):
    gt_path, pred_path, mask_path = stores[3, "aligned"]
    for scheduler in (client, "threads", "synchronous"):
        calls = []
        res = fse.evaluate(pred_path, gt_path, mask=mask_path, scheduler=scheduler, progress=calls.append)
        assert sum(calls) == math.prod(SHAPE)
        assert len(calls) == res.to_dict()["timing"]["units"] > 1


def test_label_error_on_a_worker_reaches_the_client(client, tmp_path, volumes, small_units):
    gt, pred, _ = volumes
    bad = (pred % 4).astype(np.uint8)
    bad[20, 30, 5] = 7
    pred_path = write(tmp_path / "bad.zarr", bad, (8, 8, 8))
    gt_path = write(tmp_path / "gt.zarr", (gt % 4).astype(np.uint8), (8, 8, 8))
    with pytest.raises(LabelError) as info:
        fse.evaluate(pred_path, gt_path, num_classes=4, scheduler=client)
    e = info.value
    assert (e.role, e.value, e.position) == ("pred", 7, (20, 30, 5))
    assert "num_classes=4" in str(e)


def _client_ids(dask_scheduler):
    return sorted(dask_scheduler.clients)


def test_address_form_connects_and_disconnects(client, stores, volumes):
    gt_path, pred_path, mask_path = stores[2, "misaligned"]
    before = client.run_on_scheduler(_client_ids)
    seen = []
    res = fse.evaluate(
        pred_path, gt_path, mask=mask_path, ignore_label=IGNORE, scheduler=client.scheduler.address,
        progress=lambda n: seen.append(client.run_on_scheduler(_client_ids)),
    )  # fmt: skip
    np.testing.assert_array_equal(res.confusion_matrix, expected(volumes)[0])
    assert len(seen[0]) == len(before) + 1  # a client of its own during the run ...
    for _ in range(200):  # the scheduler learns of the close asynchronously
        if client.run_on_scheduler(_client_ids) == before:
            break
        time.sleep(0.05)
    assert client.run_on_scheduler(_client_ids) == before  # ... closed afterwards
    assert len(client.nthreads()) == 2  # the cluster reached by address is left running


def test_local_n_starts_and_closes_a_cluster(stores, volumes, monkeypatch):
    started = []

    class Spy(distributed.LocalCluster):
        def __init__(self, *args, **kwargs):
            started.append((self, kwargs))
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(distributed, "LocalCluster", Spy)
    gt_path, pred_path, mask_path = stores[3, "misaligned"]
    res = fse.evaluate(pred_path, gt_path, mask=mask_path, ignore_label=IGNORE, scheduler="local:1")
    np.testing.assert_array_equal(res.confusion_matrix, expected(volumes)[0])
    ((cl, kwargs),) = started
    assert kwargs["n_workers"] == 1 and kwargs["processes"] is True
    assert cl.status.name == "closed"


def test_current_client_is_used_for_dask_inputs_and_by_name(client, volumes):
    import dask.array as da

    gt, pred, _ = volumes
    ref = reference_confusion(pred, gt)[0]
    with client.as_current():
        res = fse.evaluate(da.from_array(pred, chunks=(20, 41, 29)), gt)  # scheduler=None: dask's default
        assert res.to_dict()["timing"]["engine"] == "distributed"
        np.testing.assert_array_equal(res.confusion_matrix, ref)
        res = fse.evaluate(pred, gt, scheduler="distributed")
        assert res.to_dict()["timing"]["engine"] == "distributed"
        np.testing.assert_array_equal(res.confusion_matrix, ref)


def test_unreachable_scheduler_or_no_current_client_is_a_clear_error(volumes, monkeypatch):
    from fastseg_eval.engine import cluster as fdist
    from fastseg_eval.errors import BackendError

    gt, pred, _ = volumes
    monkeypatch.setattr(fdist, "CONNECT_TIMEOUT", "1s")
    with pytest.raises(BackendError, match=r"cannot connect to the dask scheduler at tcp://127\.0\.0\.1:9"):
        fse.evaluate(pred, gt, scheduler="tcp://127.0.0.1:9")
    with pytest.raises(BackendError, match="needs a running distributed.Client"):
        fse.evaluate(pred, gt, scheduler="distributed")


@pytest.mark.parametrize("scheduler", ["threads", "synchronous", "processes"])
def test_local_dask_schedulers_still_work(stores, volumes, scheduler, small_units):
    gt_path, pred_path, mask_path = stores[2, "misaligned"]
    res = fse.evaluate(pred_path, gt_path, mask=mask_path, ignore_label=IGNORE, scheduler=scheduler)
    np.testing.assert_array_equal(res.confusion_matrix, expected(volumes)[0])
    assert res.to_dict()["timing"]["engine"] == "dask"


# --------------------------------------------------------------------- no voxel data to client
class _GraphScan(pickle.Pickler):
    """Pickles a graph to nowhere, noting every zarr array and every numpy array over 4 KB in it."""

    def __init__(self):
        import io

        super().__init__(io.BytesIO(), protocol=5)
        self.zarr_arrays, self.big_arrays = 0, 0

    def persistent_id(self, obj):
        if isinstance(obj, (zarr.Array, zarr.AsyncArray)):
            self.zarr_arrays += 1
        elif isinstance(obj, np.ndarray) and obj.nbytes > 4096:
            self.big_arrays += 1
        return None


def _scan(graph) -> _GraphScan:
    scan = _GraphScan()
    scan.dump(dict(graph.total.__dask_graph__()))  # visits every object that would be sent
    return scan


def test_graph_holds_locators_not_voxels(client, stores, volumes, small_units):
    gt, pred, mask = volumes
    vols = [open_volume(p, r) for p, r in zip(stores[3, "misaligned"], ("gt", "pred", "mask"))]
    graph = dask_engine.build_graph([ConfusionMatrix()], *vols, client=client)
    assert len(graph.parts) > dask_engine.FAN_IN
    scan = _scan(graph)
    assert (scan.zarr_arrays, scan.big_arrays) == (0, 0)
    size = len(pickle.dumps(dict(graph.total.__dask_graph__())))
    assert size < 0.2 * (gt.nbytes + pred.nbytes + mask.nbytes)
    # the scan does see voxel data where it is: a graph over in-memory slabs (local scheduler)
    numpy_graph = dask_engine.build_graph(
        [ConfusionMatrix()], *(open_volume(a, "x") for a in volumes), target=1 << 14
    )
    assert _scan(numpy_graph).big_arrays > 0
    # with a client those slabs are scattered to the workers, and the graph holds only futures
    scattered = dask_engine.build_graph(
        [ConfusionMatrix()], *(open_volume(a, "x") for a in volumes), client=client
    )
    assert scattered.scattered and _scan(scattered).big_arrays == 0


def _read_bytes() -> int:
    import psutil

    return psutil.Process().io_counters().read_chars  # every byte this process read: files and sockets


def test_client_receives_no_voxel_data(client, tmp_path):
    """Bytes read by the client process while the cluster counts 8 MiB of voxels: a few KB.

    The scheduler of a LocalCluster runs in this process too, so its messages are included.
    """
    pytest.importorskip("psutil")
    rng = np.random.default_rng(7)
    shape = (128, 128, 128)
    gt = rng.integers(0, 50, shape).astype(np.uint16)
    pred = np.where(rng.random(shape) < 0.5, gt, rng.integers(0, 50, shape)).astype(np.uint16)
    data_bytes = gt.nbytes + pred.nbytes
    gt_path = write(tmp_path / "gt.zarr", gt, (32, 64, 64), compressors=None)  # on disk = in memory
    pred_path = write(tmp_path / "pred.zarr", pred, (64, 32, 32), compressors=None)
    ref = reference_confusion(pred, gt)[0]

    fse.evaluate(pred_path, gt_path, scheduler=client)  # warm-up: imports, numba caches on workers
    before = _read_bytes()
    res = fse.evaluate(pred_path, gt_path, scheduler=client)
    received = _read_bytes() - before
    np.testing.assert_array_equal(res.confusion_matrix, ref)
    assert received < 0.02 * data_bytes, f"client read {received} bytes of {data_bytes}"

    before = _read_bytes()  # the same measurement sees the data when it is read here
    local = fse.evaluate(pred_path, gt_path, workers=1)
    assert _read_bytes() - before >= data_bytes
    np.testing.assert_array_equal(local.confusion_matrix, ref)


# --------------------------------------------------------------------------- losing a worker
def _unmerged_partials(dask_scheduler):
    """Per worker: counting results it alone holds that a merge still waits for."""
    out = {}
    for key, ts in dask_scheduler.tasks.items():
        if (
            str(key).startswith("fastseg-count-")
            and ts.state == "memory"
            and ts.waiters
            and len(ts.who_has) == 1
        ):
            (ws,) = ts.who_has
            out.setdefault(ws.address, []).append(str(key))
    return out


def _needed_scattered(dask_scheduler):
    """Per worker: scattered slabs it alone holds that counting tasks still wait for."""
    out = {}
    for key, ts in dask_scheduler.tasks.items():
        if ts.state == "memory" and ts.run_spec is None and ts.waiters and len(ts.who_has) == 1:
            (ws,) = ts.who_has
            out.setdefault(ws.address, []).append(str(key))
    return out


def _removals(dask_scheduler):
    return [
        e
        for _, e in dask_scheduler.get_events("all")
        if isinstance(e, dict) and e.get("action") == "remove-worker"
    ]


def test_worker_killed_mid_run_gives_the_exact_matrix(client, tmp_path, monkeypatch):
    """SIGKILL a worker process while it holds unmerged partial counts; dask recomputes them."""
    rng = np.random.default_rng(11)
    shape = (64, 64, 64)
    gt = rng.integers(0, 5, shape).astype(np.uint8)
    pred = np.where(rng.random(shape) < 0.6, gt, rng.integers(0, 5, shape)).astype(np.uint8)
    gt_path = write(tmp_path / "gt.zarr", gt, (8, 8, 8))
    pred_path = write(tmp_path / "pred.zarr", pred, (8, 8, 8))
    ref = reference_confusion(pred, gt)[0]
    n = gt.size
    monkeypatch.setattr(dask_engine, "UNIT_VOXELS", 512)  # one task per 8^3 chunk: 512 tasks
    client.wait_for_workers(2)
    pids = client.run(os.getpid)
    state = {"done": 0, "kill": None}

    def progress(voxels):
        state["done"] += voxels
        if state["kill"] is None and state["done"] < n // 2:
            held = client.run_on_scheduler(_unmerged_partials)
            victim = max(held, key=lambda a: len(held[a]), default=None)
            if victim is not None and len(held[victim]) >= 2:
                os.kill(pids[victim], signal.SIGKILL)
                state["kill"] = (victim, state["done"], held[victim])

    res = fse.evaluate(pred_path, gt_path, scheduler=client, progress=progress)

    assert state["kill"] is not None, "no worker was killed"
    victim, done_at_kill, lost = state["kill"]
    assert done_at_kill < n  # mid-run: most counting tasks had not finished
    removed = client.run_on_scheduler(_removals)
    assert any(e["worker"] == victim and not e.get("expected", False) for e in removed)
    counts = execution_counts(client)
    assert all(counts[k] >= 2 for k in lost)  # what died with the worker was computed again
    np.testing.assert_array_equal(res.confusion_matrix, ref)  # ... and counted once
    assert state["done"] == n  # progress: every voxel once
    client.wait_for_workers(2, timeout=120)


def test_worker_killed_with_scattered_numpy_slabs_reruns(client, monkeypatch, caplog):
    """Scattered numpy slabs cannot be recomputed by dask; the run is re-submitted, still exact."""
    rng = np.random.default_rng(12)
    shape = (48, 64, 64)
    gt = rng.integers(0, 5, shape).astype(np.int16)
    pred = np.where(rng.random(shape) < 0.6, gt, rng.integers(0, 5, shape)).astype(np.uint8)
    ref = reference_confusion(pred, gt)[0]
    n = gt.size
    monkeypatch.setattr(dask_engine, "UNIT_VOXELS", 2048)  # 96 slabs of each input
    client.wait_for_workers(2, timeout=120)
    pids = client.run(os.getpid)
    state = {"done": 0, "kill": None}

    def progress(voxels):
        state["done"] += voxels
        if state["kill"] is None and state["done"] < n // 2:
            held = client.run_on_scheduler(_needed_scattered)
            victim = max(held, key=lambda a: len(held[a]), default=None)
            if victim is not None and len(held[victim]) >= 2:
                os.kill(pids[victim], signal.SIGKILL)
                state["kill"] = (victim, state["done"])

    with caplog.at_level(logging.WARNING, logger="fastseg_eval"):
        res = fse.evaluate(pred, gt, scheduler=client, progress=progress)
    assert state["kill"] is not None and state["kill"][1] < n
    assert any("re-submitting" in r.getMessage() for r in caplog.records)
    np.testing.assert_array_equal(res.confusion_matrix, ref)
    assert state["done"] == n
    client.wait_for_workers(2, timeout=120)
