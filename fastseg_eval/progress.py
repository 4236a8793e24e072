"""A small thread-safe progress bar on stderr (stdout stays clean for JSON)."""

from __future__ import annotations

import sys
import threading
import time
from typing import TextIO


class ProgressBar:
    """Voxels done, voxels per second and ETA; silent for runs shorter than ``delay`` seconds."""

    def __init__(
        self, total: int, *, stream: TextIO | None = None, delay: float = 1.0, interval: float = 0.2
    ):
        self.total = max(int(total), 1)
        self.stream = stream if stream is not None else sys.stderr
        self.delay, self.interval = delay, interval
        self.done = 0
        self.start = time.perf_counter()
        self.last = 0.0
        self.shown = False
        self.lock = threading.Lock()

    def __call__(self, n: int) -> None:
        with self.lock:
            self.done += int(n)
            self._maybe_draw(force=self.done >= self.total)

    def _maybe_draw(self, force: bool = False) -> None:
        """Redraw (lock held) once ``delay`` has passed, at most every ``interval`` unless ``force``."""
        now = time.perf_counter()
        if now - self.start >= self.delay and (force or now - self.last >= self.interval):
            self.last = now
            self._draw(now)

    def _draw(self, now: float) -> None:
        frac = min(self.done / self.total, 1.0)
        elapsed = max(now - self.start, 1e-9)
        rate = self.done / elapsed
        eta = (self.total - self.done) / rate if rate > 0 else float("inf")
        width = 24
        bar = "#" * int(frac * width) + "-" * (width - int(frac * width))
        eta_s = f"{eta:5.0f}s" if eta != float("inf") else "    ?"
        self.stream.write(
            f"\r[{bar}] {100 * frac:5.1f}%  {_si(self.done)}/{_si(self.total)} voxels  "
            f"{_si(rate)}voxel/s  ETA {eta_s}"
        )
        self.stream.flush()
        self.shown = True

    def close(self) -> None:
        with self.lock:
            if self.shown:
                self._draw(time.perf_counter())
                self.stream.write("\n")
                self.stream.flush()


class CaseProgressBar(ProgressBar):
    """Cases done of all (``case_done``), voxels counted (``add_voxels``) and their rate, ETA."""

    def __init__(self, total: int, *, done: int = 0, stream: TextIO | None = None, delay: float = 1.0,
                 interval: float = 0.2):  # fmt: skip
        super().__init__(total, stream=stream, delay=delay, interval=interval)
        self.done = self.start_done = int(done)  # cases finished before this run (a resumed journal)
        self.voxels = 0

    def add_voxels(self, n: int) -> None:
        with self.lock:
            self.voxels += int(n)
            self._maybe_draw()

    def case_done(self) -> None:
        with self.lock:
            self.done += 1
            self._maybe_draw(force=self.done >= self.total)

    def _draw(self, now: float) -> None:
        elapsed = max(now - self.start, 1e-9)
        frac = min(self.done / self.total, 1.0)
        width = 20
        bar = "#" * int(frac * width) + "-" * (width - int(frac * width))
        new = self.done - self.start_done
        eta = (self.total - self.done) * elapsed / new if new > 0 else float("inf")
        eta_s = f"{eta:5.0f}s" if eta != float("inf") else "    ?"
        self.stream.write(
            f"\r[{bar}] {self.done}/{self.total} cases  {_si(self.voxels)} voxels  {_si(self.voxels / elapsed)}voxel/s"
            f"  ETA {eta_s}"
        )
        self.stream.flush()
        self.shown = True


def _si(x: float) -> str:
    for unit, div in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if x >= div:
            return f"{x / div:.1f}{unit}"
    return f"{x:.0f}"
