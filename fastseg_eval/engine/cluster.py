"""Which dask scheduler runs an evaluation: resolve the ``scheduler=`` option, and connect to it.

``scheduler`` may be

* ``None``: dask's default (a ``distributed.Client`` made current by the user, else threads);
* ``"threads"``, ``"processes"`` or ``"synchronous"`` (and dask's other names for them);
* a ``distributed.Client``;
* a dask cluster object (``LocalCluster``, dask-jobqueue's ``SLURMCluster``, dask-kubernetes'
  ``KubeCluster``, ...): a client is connected for the run and closed afterwards;
* a scheduler address, ``"tcp://host:8786"`` (also ``tls://``, ``ucx://``, ``ws://``, ``wss://``,
  ``inproc://``): a client is connected for the run and closed afterwards;
* ``"local:N"``: a ``LocalCluster`` with ``N`` single-threaded worker processes is started for
  the run and closed afterwards (``"local"`` alone: one worker per CPU core);
* ``"distributed"``: the current ``distributed.Client`` (an error if there is none).

:func:`resolve_scheduler` only decides (and logs the decision); :func:`connect` starts or
connects what the decision needs and closes it again.
"""

from __future__ import annotations

import logging
import re
import sys
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any

from fastseg_eval.errors import BackendError, OptionError
from fastseg_eval.interrupts import deferred_signals

log = logging.getLogger("fastseg_eval")

LOCAL_SCHEDULERS = {
    "threads": "threads",
    "threading": "threads",
    "processes": "processes",
    "multiprocessing": "processes",
    "synchronous": "sync",
    "sync": "sync",
    "single-threaded": "sync",
}
"""dask's local scheduler names, mapped to the name fastseg-eval reports."""

ADDRESS_SCHEMES = ("tcp", "tls", "ucx", "ws", "wss", "inproc")

VALID_FORMS = (
    "a distributed.Client",
    "a dask cluster object (LocalCluster, SLURMCluster, KubeCluster, ...)",
    "a scheduler address such as 'tcp://host:8786' (" + ", ".join(f"{s}://" for s in ADDRESS_SCHEMES) + ")",
    "'local:N' to start a LocalCluster with N worker processes for the run ('local': one per core)",
    "'distributed' for the current distributed.Client",
    "'threads', 'processes' or 'synchronous' (dask's local schedulers)",
)

CONNECT_TIMEOUT = "20s"
"""How long to keep trying to reach a scheduler address before giving up."""

_ADDRESS = re.compile(r"^(?P<scheme>[a-z][a-z0-9+]*)://\S+$")
_LOCAL_CLUSTER = re.compile(r"^local(?::(?P<n>.*))?$")


@dataclass(frozen=True)
class SchedulerSpec:
    """What ``scheduler=`` asks for.

    ``kind`` is one of ``"default"`` (dask's own choice), ``"local"`` (``value``: a dask local
    scheduler name or a scheduler callable), ``"client"`` (``value``: a Client), ``"cluster"``
    (``value``: a cluster object), ``"address"`` (``value``: the address), ``"local-cluster"``
    (``value``: the number of worker processes) or ``"current"`` (the current Client).
    """

    kind: str
    value: Any = None

    @property
    def is_distributed(self) -> bool:
        return self.kind in ("client", "cluster", "address", "local-cluster", "current")

    def describe(self) -> str:
        if self.kind == "default":
            return "dask's default scheduler"
        if self.kind == "local":
            return f"dask local scheduler {self.value!r}"
        if self.kind == "client":
            return f"distributed client of {_client_address(self.value)}"
        if self.kind == "cluster":
            return f"{type(self.value).__name__} at {getattr(self.value, 'scheduler_address', '?')}"
        if self.kind == "address":
            return f"dask scheduler at {self.value}"
        if self.kind == "local-cluster":
            return f"a new LocalCluster with {self.value} worker processes"
        return "the current distributed client"


def _client_address(client: Any) -> str:
    try:
        return str(client.scheduler.address)
    except Exception:  # pragma: no cover - a client that is not connected
        return "?"


def _invalid(scheduler: Any, why: str = "") -> OptionError:
    forms = "\n  - ".join(VALID_FORMS)
    why = f" ({why})" if why else ""
    return OptionError(f"scheduler={scheduler!r} is not understood{why}. Valid forms:\n  - {forms}")


def resolve_scheduler(scheduler: Any) -> SchedulerSpec:
    """Decide what ``scheduler`` asks for (nothing is started here) and log the decision.

    Raises :class:`~fastseg_eval.errors.OptionError` listing the valid forms for anything else.

    Examples
    --------
    >>> resolve_scheduler("local:2")
    SchedulerSpec(kind='local-cluster', value=2)
    >>> resolve_scheduler("tcp://10.0.0.5:8786").kind
    'address'
    >>> resolve_scheduler("threads")
    SchedulerSpec(kind='local', value='threads')
    """
    spec = _resolve(scheduler)
    log.info("scheduler %r: %s", scheduler, spec.describe())
    return spec


def _resolve(scheduler: Any) -> SchedulerSpec:
    if scheduler is None:
        return SchedulerSpec("default")
    dd = sys.modules.get("distributed")  # an object cannot be a Client unless distributed is imported
    if dd is not None:
        if isinstance(scheduler, dd.Client):
            if scheduler.asynchronous:
                raise _invalid(scheduler, "an asynchronous Client cannot run a blocking evaluation")
            return SchedulerSpec("client", scheduler)
        from distributed.deploy.cluster import Cluster

        if isinstance(scheduler, Cluster):
            return SchedulerSpec("cluster", scheduler)
    if isinstance(scheduler, str):
        text = scheduler.strip()
        low = text.lower()
        if low in LOCAL_SCHEDULERS:
            return SchedulerSpec("local", LOCAL_SCHEDULERS[low])
        if low in ("distributed", "dask.distributed"):
            return SchedulerSpec("current")
        m = _LOCAL_CLUSTER.match(low)
        if m:
            n = m.group("n")
            if n is None:
                from fastseg_eval.engine.plan import default_workers

                return SchedulerSpec("local-cluster", default_workers())
            if not n.isdigit() or int(n) < 1:
                raise _invalid(
                    scheduler, f"the number of workers in 'local:N' must be a positive integer, got {n!r}"
                )
            return SchedulerSpec("local-cluster", int(n))
        m = _ADDRESS.match(text)
        if m:
            if m.group("scheme").lower() not in ADDRESS_SCHEMES:
                raise _invalid(scheduler, f"unknown protocol {m.group('scheme')!r}")
            return SchedulerSpec("address", text)
        raise _invalid(scheduler)
    if callable(scheduler) and not isinstance(scheduler, type):
        return SchedulerSpec("local", scheduler)  # a dask "get" function
    raise _invalid(scheduler, f"an object of type {type(scheduler).__name__}")


@dataclass
class Session:
    """A scheduler ready to run a graph: a ``client``, or a dask local scheduler (``local``)."""

    spec: SchedulerSpec
    client: Any = None
    local: Any = None

    @property
    def label(self) -> str:
        return "distributed" if self.client is not None else "dask"


def _require_distributed(spec: SchedulerSpec) -> Any:
    try:
        import distributed
    except ImportError as e:  # pragma: no cover - distributed is a test dependency
        raise BackendError(
            f"{spec.describe()} needs dask.distributed: pip install 'fastseg-eval[distributed]'"
        ) from e
    return distributed


@contextmanager
def connect(spec: SchedulerSpec) -> Iterator[Session]:
    """Connect to (or start) what ``spec`` names for the duration of the ``with`` block.

    Clients and clusters made here are closed on exit; a Client or cluster the caller passed
    in is left running.
    """
    if spec.kind == "local":
        yield Session(spec, local=spec.value)
        return
    if spec.kind == "default":
        yield Session(spec, client=_default_client())
        return
    distributed = _require_distributed(spec)
    if spec.kind == "client":
        yield Session(spec, client=spec.value)
        return
    if spec.kind == "current":
        try:
            client = distributed.get_client()
        except ValueError as e:
            raise BackendError(
                "scheduler='distributed' needs a running distributed.Client in this process; "
                "create one (distributed.Client(address)) or pass its address"
            ) from e
        yield Session(spec, client=client)
        return
    owned: list[Any] = []
    try:
        if spec.kind == "cluster":
            client = distributed.Client(spec.value, set_as_default=False)
            owned.append(client)
        elif spec.kind == "address":
            try:
                client = _connect_client(distributed, spec.value, timeout=CONNECT_TIMEOUT)
            except (OSError, TimeoutError) as e:
                raise BackendError(
                    f"cannot connect to the dask scheduler at {spec.value}: {e}. Check that "
                    "`dask scheduler` runs there and that this machine can reach its port"
                ) from e
            owned.append(client)
        else:  # local-cluster
            # Ctrl-C / SIGTERM during start-up act once the cluster is up (and can be closed in
            # order); its worker processes start with both signals blocked, so a terminal's
            # Ctrl-C reaches only this process, which closes them (see interrupts.py)
            with deferred_signals(spawns=True):
                cluster = distributed.LocalCluster(
                    n_workers=spec.value,
                    threads_per_worker=1,
                    processes=True,
                    # no dashboard, and the scheduler's small HTTP server on a free port (not 8787,
                    # which another cluster may hold)
                    dashboard_address=":0",
                    scheduler_kwargs={"dashboard": False},
                )
                owned.append(cluster)
                client = distributed.Client(cluster, set_as_default=False)
                owned.append(client)
        log.info("connected to %s (%d workers)", _client_address(client), len(client.nthreads()))
        yield Session(spec, client=client)
    finally:
        _close(owned)


def _connect_client(distributed: Any, address: str, timeout: str) -> Any:
    """``distributed.Client(address)``; interrupted while connecting, it leaves no client behind.

    A Client interrupted in its constructor still exists, and its finaliser would wait for the
    pending connection (twice the connect timeout) and print a traceback at exit.
    """
    try:
        return distributed.Client(address, set_as_default=False, timeout=timeout)
    except KeyboardInterrupt as e:
        tb, clients = e.__traceback__, []
        while tb is not None:  # the half-made client is ``self`` in its constructor's frame
            obj = tb.tb_frame.f_locals.get("self")
            if isinstance(obj, distributed.Client) and all(obj is not c for c in clients):
                clients.append(obj)
            tb = tb.tb_next
        for client in clients:
            try:
                client.close(timeout=1)
            except Exception as e:
                log.debug("abandoning the interrupted client: %s: %s", type(e).__name__, e)
            if getattr(client, "status", "closed") != "closed":
                client.status = "closed"  # its close timed out: the finaliser must not wait again
        raise


def _close(owned: list[Any]) -> None:
    """Close the clients and clusters made for a run, newest first, whatever else happens.

    Signals are held meanwhile (a second Ctrl-C must not leave worker processes behind), and
    after an interrupt distributed's shutdown chatter is kept off stderr.
    """
    if not owned:
        return
    interrupted = isinstance(sys.exc_info()[1], KeyboardInterrupt)
    quiet = _quiet_distributed_logs() if interrupted else nullcontext()
    with deferred_signals(), quiet:
        if interrupted:  # workers stopped mid-task would each log the tasks they drop
            for obj in owned:
                if hasattr(obj, "run") and hasattr(obj, "scheduler"):  # a Client
                    try:
                        obj.run(_silence_worker_logs)
                    except Exception as e:
                        log.debug("quieting the workers: %s: %s", type(e).__name__, e)
        for obj in reversed(owned):
            try:
                obj.close()
            except Exception as e:  # closing must not hide why the run ended
                log.debug("closing %r: %s: %s", obj, type(e).__name__, e)


def _silence_worker_logs() -> None:
    """Run on each worker of a cluster being shut down after an interrupt."""
    logging.getLogger("distributed").setLevel(logging.CRITICAL)


@contextmanager
def _quiet_distributed_logs() -> Iterator[None]:
    loggers = [logging.getLogger(name) for name in ("distributed", "tornado", "asyncio")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def _default_client() -> Any:
    """The Client dask would use for ``scheduler=None`` (one made current by the user), or None."""
    dd = sys.modules.get("distributed")
    if dd is None:
        return None
    import dask
    from dask.base import get_scheduler

    if dask.config.get("scheduler", None) not in (None, "dask.distributed", "distributed"):
        return None
    client = getattr(get_scheduler(), "__self__", None)
    return client if isinstance(client, dd.Client) and not client.asynchronous else None
