"""Ctrl-C and SIGTERM end every engine promptly and quietly; lost workers are retried, then named.

Issue 10, item 5. The real console script runs in a subprocess (in its own session, so a signal
to its process group is what a terminal's Ctrl-C does) on a volume slowed down by a
``sitecustomize`` hook that every Python process of the run loads, dask workers included: each
counted block first sleeps ``$FSE_TEST_SLOW`` seconds, and the first one touches
``$FSE_TEST_STARTED``. Each test checks the exit code (130 / 143), that stderr is the one line
``fastseg-eval: interrupted`` (no traceback, no worker chatter, no leaked-semaphore warning),
that every process the run started is gone, and that no output file was written or changed.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import zarr

psutil = pytest.importorskip("psutil")

HOOK = '''
import importlib.abc, importlib.machinery, os, sys, time


class _SlowCounting(importlib.abc.MetaPathFinder):
    """Wraps ConfusionCounts.add_chunk once fastseg_eval.reducers.confusion is imported."""

    def find_spec(self, name, path, target=None):
        if name != "fastseg_eval.reducers.confusion":
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is None:
            return None
        exec_module = spec.loader.exec_module

        def patched(module):
            exec_module(module)
            add_chunk = module.ConfusionCounts.add_chunk

            def slow_add_chunk(self, *args, **kwargs):
                marker = os.environ.get("FSE_TEST_STARTED")
                if marker and not os.path.exists(marker):
                    open(marker, "w").close()
                time.sleep(float(os.environ.get("FSE_TEST_SLOW", "0") or 0))
                return add_chunk(self, *args, **kwargs)

            module.ConfusionCounts.add_chunk = slow_add_chunk

        spec.loader.exec_module = patched
        return spec


if os.environ.get("FSE_TEST_SLOW"):
    sys.meta_path.insert(0, _SlowCounting())
'''


# ------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def hook_dir(tmp_path_factory) -> str:
    d = tmp_path_factory.mktemp("hook")
    (d / "sitecustomize.py").write_text(HOOK)
    return str(d)


@pytest.fixture(scope="module")
def volume(tmp_path_factory) -> tuple[str, str]:
    """A 256^3 pair in 64^3 chunks: 64 thread-engine units, 4 dask units (mostly fill chunks)."""
    root = tmp_path_factory.mktemp("vol")
    out = []
    for name in ("p", "g"):
        arr = zarr.create_array(
            store=str(root / f"{name}.zarr"), shape=(256, 256, 256), chunks=(64, 64, 64), dtype="uint8",
            fill_value=0,
        )  # fmt: skip
        arr[:64] = 1
        out.append(str(root / f"{name}.zarr"))
    return out[0], out[1]


def _command() -> list[str]:
    exe = Path(sys.executable).parent / "fastseg-eval"
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "fastseg_eval"]


def _env(hook_dir: str, marker: Path, slow: float) -> dict[str, str]:
    env = {**os.environ, "FSE_TEST_SLOW": str(slow), "FSE_TEST_STARTED": str(marker)}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (hook_dir, os.environ.get("PYTHONPATH")) if p)
    env.pop("NO_COLOR", None)
    return env


def _wait_for(cond, timeout: float, what: str, proc: subprocess.Popen) -> None:
    end = time.monotonic() + timeout
    while not cond():
        if proc.poll() is not None:
            out, err = proc.communicate()
            raise AssertionError(f"the run ended (rc {proc.returncode}) before {what}:\n{err}")
        if time.monotonic() > end:
            proc.kill()
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def _descendants(pid: int) -> list:
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def interrupt_run(
    args, hook_dir, tmp_path, *, sig=signal.SIGINT, group=True, slow=1.0, when="started", timeout=60
) -> tuple[int, str, float, list]:
    """Start the console script, signal it once it runs (or as its cluster starts), collect it.

    Returns the exit code, stderr, the seconds from the signal to the exit, and the processes
    that were alive under the run when the signal was sent.
    """
    marker = tmp_path / "started"
    proc = subprocess.Popen(
        _command() + [str(a) for a in args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env=_env(hook_dir, marker, slow), start_new_session=True,
    )  # fmt: skip
    try:
        if callable(when):
            _wait_for(when, timeout, "the run to start", proc)
        elif when == "started":
            _wait_for(marker.exists, timeout, "the first counted block", proc)
        else:  # "startup": as soon as the cluster's first worker process is being started

            def spawning() -> bool:
                for c in _descendants(proc.pid):
                    try:
                        if "spawn_main" in " ".join(c.cmdline()):
                            return True
                    except psutil.Error:
                        pass
                return False

            _wait_for(spawning, timeout, "a worker process", proc)
            assert not marker.exists()
        kids = _descendants(proc.pid)
        t0 = time.monotonic()
        if group:  # what a terminal does on Ctrl-C: every process of the foreground group
            os.killpg(proc.pid, sig)
        else:
            proc.send_signal(sig)
        _, err = proc.communicate(timeout=timeout)
        elapsed = time.monotonic() - t0
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
    return proc.returncode, err, elapsed, kids


def check_clean_exit(code, err, kids, expected_code, elapsed=None, prompt=20.0):
    assert code == expected_code, err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and "interrupted" in lines[0], err
    assert "Traceback" not in err and "leaked" not in err
    gone, alive = psutil.wait_procs(kids, timeout=10)
    alive = [p for p in alive if p.status() != psutil.STATUS_ZOMBIE]
    assert not alive, f"processes left behind: {alive}"
    if elapsed is not None:
        assert elapsed < prompt, f"took {elapsed:.1f} s to stop"


# --------------------------------------------------------------------------------- helpers
@pytest.mark.skipif(not hasattr(signal, "pthread_sigmask"), reason="POSIX signal masks")
def test_deferred_signals_hold_ctrl_c_until_the_block_ends():
    import threading

    from fastseg_eval.interrupts import deferred_signals

    seen = {}
    with pytest.raises(KeyboardInterrupt):
        with deferred_signals():
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.05)  # nothing happens inside the block...
            t = threading.Thread(
                target=lambda: seen.update(mask=signal.pthread_sigmask(signal.SIG_BLOCK, []))
            )
            t.start()
            t.join()
            seen["inside"] = True
    assert seen["inside"]  # ... the interrupt came after it
    assert {signal.SIGINT, signal.SIGTERM} <= seen["mask"]  # threads started inside inherit the block
    assert signal.SIGINT not in signal.pthread_sigmask(signal.SIG_BLOCK, [])
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_sigterm_is_an_interrupt_with_exit_code_143():
    from fastseg_eval.interrupts import Interrupted, exit_code, terminate_as_interrupt

    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(Interrupted) as info:
        with terminate_as_interrupt():
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(1)
    assert isinstance(info.value, KeyboardInterrupt) and exit_code(info.value) == 143
    assert exit_code(KeyboardInterrupt()) == 130
    assert signal.getsignal(signal.SIGTERM) is before


# ------------------------------------------------------------------------------ thread engine
@pytest.mark.slow
@pytest.mark.parametrize(
    ("sig", "group", "code"),
    [(signal.SIGINT, True, 130), (signal.SIGTERM, False, 143)],
    ids=["ctrl-c", "sigterm"],
)
def test_thread_engine_stops_and_writes_nothing(volume, hook_dir, tmp_path, sig, group, code):
    report, matrix = tmp_path / "report.json", tmp_path / "m.npy"
    report.write_text("the previous report\n")
    code_, err, elapsed, kids = interrupt_run(
        [*volume, "-o", report, "--save-matrix", matrix, "-q"], hook_dir, tmp_path, sig=sig, group=group
    )
    check_clean_exit(code_, err, kids, code, elapsed, prompt=10)
    if sig == signal.SIGTERM:
        assert "SIGTERM" in err
    assert report.read_text() == "the previous report\n"
    assert sorted(os.listdir(tmp_path)) == ["report.json", "started"]  # no matrix, no temporary file


@pytest.mark.slow
def test_dask_threads_scheduler_stops(volume, hook_dir, tmp_path):
    code, err, elapsed, kids = interrupt_run([*volume, "--scheduler", "threads", "-q"], hook_dir, tmp_path)
    check_clean_exit(code, err, kids, 130, elapsed, prompt=10)


# --------------------------------------------------------------------------- local:N cluster
@pytest.mark.slow
@pytest.mark.parametrize(
    ("sig", "code"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)], ids=["ctrl-c", "sigterm"]
)
def test_local_cluster_stops_quietly(volume, hook_dir, tmp_path, sig, code):
    """A signal to the whole process group (workers included): one line, every worker closed."""
    report = tmp_path / "r.json"
    code_, err, elapsed, kids = interrupt_run(
        [*volume, "--scheduler", "local:2", "-o", report, "-q"], hook_dir, tmp_path, sig=sig
    )
    assert len(kids) >= 2  # the worker processes were running
    check_clean_exit(code_, err, kids, code, elapsed)
    assert not report.exists()


@pytest.mark.slow
def test_local_cluster_ctrl_c_during_startup(volume, hook_dir, tmp_path):
    code, err, elapsed, kids = interrupt_run(
        [*volume, "--scheduler", "local:2", "-q"], hook_dir, tmp_path, when="startup"
    )
    check_clean_exit(code, err, kids, 130, elapsed)


# --------------------------------------------------------------------------- remote cluster
@pytest.fixture(scope="module")
def slow_cluster(hook_dir):
    """A LocalCluster standing for a remote one; its workers load the slow-down hook."""
    distributed = pytest.importorskip("distributed")
    saved = {k: os.environ.get(k) for k in ("PYTHONPATH", "FSE_TEST_SLOW")}
    os.environ.update(_env(hook_dir, Path(os.devnull), 1.0))  # inherited by the worker processes
    os.environ.pop("FSE_TEST_STARTED", None)
    try:
        cluster = distributed.LocalCluster(
            n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0",
            scheduler_kwargs={"dashboard": False},
        )  # fmt: skip
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    with cluster, distributed.Client(cluster, set_as_default=False) as client:
        yield cluster, client


def _tasks(dask_scheduler):
    return len(dask_scheduler.tasks)


def _processing(dask_scheduler):
    return sum(ts.state == "processing" for ts in dask_scheduler.tasks.values())


@pytest.mark.slow
def test_remote_cluster_futures_are_cancelled(volume, hook_dir, tmp_path, slow_cluster):
    cluster, client = slow_cluster
    code, err, elapsed, kids = interrupt_run(
        [*volume, "--scheduler", cluster.scheduler_address, "-q"], hook_dir, tmp_path, group=False,
        when=lambda: client.run_on_scheduler(_processing) > 0,
    )  # fmt: skip
    check_clean_exit(code, err, kids, 130, elapsed, prompt=10)
    end = time.monotonic() + 10
    while client.run_on_scheduler(_tasks) and time.monotonic() < end:
        time.sleep(0.1)
    assert client.run_on_scheduler(_tasks) == 0  # the run's tasks are gone from the shared cluster


@pytest.mark.slow
def test_ctrl_c_while_connecting_to_a_scheduler(volume, hook_dir, tmp_path):
    """Nothing listens at the address yet: the client is still retrying when Ctrl-C comes."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    t0 = time.monotonic()
    code, err, elapsed, kids = interrupt_run(
        [*volume, "--scheduler", f"tcp://127.0.0.1:{port}", "-q"], hook_dir, tmp_path,
        when=lambda: time.monotonic() - t0 > 4,
    )  # fmt: skip
    check_clean_exit(code, err, kids, 130, elapsed, prompt=10)


# ------------------------------------------------------------------ lost workers, numpy inputs
def _kill_a_worker_then_lose_the_scatter(client, monkeypatch, times: int) -> dict:
    """The first ``times`` scatters: SIGKILL a worker, then fail as a scatter to it does."""
    from distributed.comm.core import CommClosedError

    state = {"scatters": 0, "kills": 0, "killed": set()}
    real_scatter = client.scatter

    def scatter(*args, **kwargs):
        state["scatters"] += 1
        if state["kills"] < times:
            _wait_for_replacements(client, state)
            pids = client.run(os.getpid)
            pid = pids[sorted(pids)[0]]
            os.kill(pid, signal.SIGKILL)
            state["killed"].add(pid)
            state["kills"] += 1
            raise CommClosedError("in <TCP (closed) ConnectionPool.scatter>: Stream is closed")
        return real_scatter(*args, **kwargs)

    monkeypatch.setattr(client, "scatter", scatter)
    return state


def _wait_for_replacements(client, state: dict, timeout: float = 60) -> None:
    """Until both workers answer and none is one that was killed: the nannies have restarted
    them. (The scheduler may still list a killed worker for a moment, so ``wait_for_workers``
    alone can return while a nanny is still restarting, and closing the cluster then races it:
    distributed fails with "can only join a started process".)"""
    end = time.monotonic() + timeout
    while True:
        try:
            pids = set(client.run(os.getpid, on_error="ignore").values())
        except Exception:  # a worker in the scheduler's list is gone
            pids = set()
        pids = {p for p in pids if isinstance(p, int)}
        if len(pids) == 2 and not pids & state["killed"]:
            return
        assert time.monotonic() < end, f"the killed workers were not replaced within {timeout} s"
        time.sleep(0.2)


@pytest.mark.slow
def test_worker_lost_again_in_the_resubmitted_run_is_retried(slow_cluster, monkeypatch, caplog):
    """Two lost workers in a row (the second during the re-sent run) are within dask's limit."""
    import fastseg_eval as fse

    _, client = slow_cluster
    rng = np.random.default_rng(3)
    gt = rng.integers(0, 4, (8, 16, 16)).astype(np.uint8)
    pred = np.where(rng.random(gt.shape) < 0.7, gt, 0).astype(np.uint8)
    client.run(lambda: os.environ.__setitem__("FSE_TEST_SLOW", "0"))  # no slow-down here
    state = _kill_a_worker_then_lose_the_scatter(client, monkeypatch, times=2)
    with caplog.at_level(logging.WARNING, logger="fastseg_eval"):
        res = fse.evaluate(pred, gt, num_classes=4, scheduler=client)
    assert state["kills"] == 2 and state["scatters"] == 3
    assert sum("re-submitting" in r.getMessage() for r in caplog.records) == 2
    ref = np.bincount(gt.ravel().astype(np.int64) * 4 + pred.ravel(), minlength=16).reshape(4, 4)
    np.testing.assert_array_equal(res.confusion_matrix, ref)
    _wait_for_replacements(client, state)


@pytest.mark.slow
def test_workers_that_keep_dying_give_one_clear_error(slow_cluster, monkeypatch):
    import dask

    import fastseg_eval as fse
    from fastseg_eval.errors import BackendError

    _, client = slow_cluster
    gt = np.zeros((4, 8, 8), dtype=np.uint8)
    client.run(lambda: os.environ.__setitem__("FSE_TEST_SLOW", "0"))  # no slow-down here
    state = _kill_a_worker_then_lose_the_scatter(client, monkeypatch, times=99)
    with dask.config.set({"distributed.scheduler.allowed-failures": 1}):
        with pytest.raises(BackendError, match="kept dying") as info:
            fse.evaluate(gt, gt, num_classes=2, scheduler=client)
    assert state["scatters"] == 2  # the first run and one re-submission, as dask's limit says
    assert "allowed-failures" in str(info.value) and "\n" not in str(info.value)
    _wait_for_replacements(client, state)
