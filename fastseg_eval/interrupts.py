"""Interrupts: SIGINT and SIGTERM end a run the same way, through ``KeyboardInterrupt``.

* :func:`terminate_as_interrupt` (the command line) turns SIGTERM into :class:`Interrupted`, a
  ``KeyboardInterrupt``, so every engine unwinds as on Ctrl-C: threads finish their unit and
  stop, dask futures are cancelled, clusters started for the run are closed, no output is
  written. :func:`exit_code` gives 130 for SIGINT and 143 for SIGTERM.
* :func:`deferred_signals` holds SIGINT and SIGTERM while a local cluster starts or closes:
  a signal then is acted on right after, instead of tearing a half-built cluster apart (which
  leaves processes and an atexit traceback). Processes started meanwhile inherit SIGINT and
  SIGTERM blocked, so a Ctrl-C in the terminal (sent to the whole process group) reaches only
  this process, which shuts its workers down in order, instead of every worker printing its
  own traceback.

Both act only in the main thread (where Python runs signal handlers) and restore what was
there before.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator
from typing import Any

SIGNALS = tuple(s for s in (getattr(signal, "SIGINT", None), getattr(signal, "SIGTERM", None)) if s)


class Interrupted(KeyboardInterrupt):
    """A run stopped by a signal other than SIGINT (``signum``), handled like Ctrl-C."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


def exit_code(exc: BaseException) -> int:
    """128 + the signal number: 130 for SIGINT (Ctrl-C, or any plain KeyboardInterrupt), 143 for SIGTERM."""
    return 128 + int(getattr(exc, "signum", getattr(signal, "SIGINT", 2)))


def signal_name(exc: BaseException) -> str:
    signum = getattr(exc, "signum", None)
    if signum is None:
        return "SIGINT"
    try:
        return signal.Signals(signum).name
    except ValueError:  # pragma: no cover
        return f"signal {signum}"


def _in_main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


def _raise_interrupted(signum: int, frame: Any) -> None:
    raise Interrupted(signum)


@contextlib.contextmanager
def terminate_as_interrupt() -> Iterator[None]:
    """Within the block, SIGTERM raises :class:`Interrupted` (a ``KeyboardInterrupt``)."""
    sigterm = getattr(signal, "SIGTERM", None)
    if sigterm is None or not _in_main_thread():
        yield
        return
    old = signal.signal(sigterm, _raise_interrupted)
    try:
        yield
    finally:
        signal.signal(sigterm, old)


@contextlib.contextmanager
def deferred_signals(*, spawns: bool = False) -> Iterator[None]:
    """Hold SIGINT / SIGTERM during the block, then act on the first one that came (if any).

    Threads and processes started inside the block inherit the two signals blocked (POSIX), so
    the worker processes of a local cluster never see a terminal's Ctrl-C. Say ``spawns=True``
    when the block starts processes through :mod:`multiprocessing`.
    """
    if not SIGNALS or not _in_main_thread() or not hasattr(signal, "pthread_sigmask"):
        yield
        return
    received: list[int] = []

    def record(signum: int, frame: Any) -> None:
        received.append(signum)

    if spawns:
        _start_resource_tracker()
    old = {s: signal.signal(s, record) for s in SIGNALS}
    signal.pthread_sigmask(signal.SIG_BLOCK, SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, SIGNALS)  # what came meanwhile runs `record` now
        _check_signals()
        for s, handler in old.items():
            signal.signal(s, handler)
    if received:
        signal.raise_signal(received[0])  # the handler that was there before decides what happens


def _check_signals() -> None:
    """Give Python a point to run pending signal handlers (a call into Python code)."""
    (lambda: None)()


def _start_resource_tracker() -> None:
    """Start multiprocessing's resource tracker now, if it will be needed.

    Starting it unblocks SIGINT and SIGTERM in the thread that starts it (``bpo-33613``); if that
    were the event-loop thread of a cluster starting inside :func:`deferred_signals`, the worker
    processes it spawns would get the signals again. Started here, later uses find it running.
    """
    with contextlib.suppress(Exception):
        from multiprocessing import resource_tracker

        resource_tracker.ensure_running()
