"""Group "cli": the ``fastseg-eval`` console script on a small (64**3) zarr pair, as a user runs it.

* ``warm``: numba's cache already holds the kernels (the untimed warm-up run fills it); a round
  is the whole process: interpreter start, imports, opening the stores, counting, the JSON report.
* ``cold``: every round gets an empty ``NUMBA_CACHE_DIR`` (a fresh temporary directory), so it
  includes compiling the kernels: a first run on a fresh machine. make_table.py reports
  ``cold - warm`` as the compile time.

Each round's peak RSS is that child's own (``os.wait4`` rusage, taken by a minimal launcher
process, see ``data.run_measured``; the launcher adds about 15 ms to a round); the JSON report's
confusion matrix is checked against the reference counts.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

import fastseg_bench_data as bd
import numpy as np
import pytest

S = bd.sizes()
N = S["cli"]
K = 4
SIZE = f"{N}^3"


def _script() -> str | None:
    exe = Path(sys.executable).with_name("fastseg-eval")
    return str(exe) if exe.exists() else shutil.which("fastseg-eval")


@pytest.fixture(scope="module")
def cli_pair():
    if _script() is None:
        pytest.skip("the fastseg-eval console script is not installed (pip install -e .)")
    return bd.ensure_zarr_pair(bd.SegSpec((N, N, N), num_classes=K))


class _Runs:
    """Runs the console script and keeps each round's peak RSS."""

    def __init__(self, pair):
        self.cmd = [_script(), pair["pred"], pair["gt"], "--format", "json", "-n", str(K)]
        self.rss: list[float] = []
        self.tmp: list[str] = []

    def env(self, cold: bool) -> dict[str, str]:
        env = dict(os.environ)
        env.pop("NUMBA_DISABLE_JIT", None)
        if cold:
            self.tmp.append(tempfile.mkdtemp(prefix="fastseg-bench-numba-"))
            env["NUMBA_CACHE_DIR"] = self.tmp[-1]
        return env

    def __call__(self, env: dict[str, str]) -> str:
        out, rss = bd.run_measured(self.cmd, env)
        self.rss.append(rss)
        return out

    def cleanup(self) -> None:
        for d in self.tmp:
            shutil.rmtree(d, ignore_errors=True)


@pytest.mark.benchmark(group="cli")
@pytest.mark.parametrize("cache", ["warm", "cold"], ids=[f"warm-cache-{SIZE}", f"cold-cache-{SIZE}"])
def test_cli(benchmark, cli_pair, cache):
    runs = _Runs(cli_pair)
    cold = cache == "cold"
    try:
        out = benchmark.pedantic(
            runs,
            setup=lambda: ((runs.env(cold),), {}),
            rounds=S["cold_rounds"] if cold else S["cli_rounds"],
            iterations=1,
            warmup_rounds=0 if cold else 1,
        )
    finally:
        runs.cleanup()
    bd.annotate(
        benchmark,
        key=f"cli.{cache}",
        case=f"fastseg-eval CLI, {cache} numba cache",
        size=SIZE,
        voxels=cli_pair["voxels"],
        peak_rss_mib=round(max(runs.rss), 1),
        command=f"fastseg-eval PRED GT --format json -n {K}",
    )
    report = json.loads(out)
    np.testing.assert_array_equal(np.array(report["confusion_matrix"]), np.array(cli_pair["cm"]))
