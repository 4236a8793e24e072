"""pytest-benchmark suite of fastseg-eval: shared setup.

Run with ``pytest benchmarks/ --benchmark-only`` (see benchmarks/README.md). The project's
pytest configuration adds ``--benchmark-disable`` to every run (so that ``pytest`` alone stays
fast); :func:`pytest_configure` below lets an explicit ``--benchmark-only`` win over it instead
of stopping with pytest-benchmark's "Can't have both" usage error.
"""

from __future__ import annotations

import importlib.util
import os
import platform
import sys
from pathlib import Path
from typing import Any

import pytest

# benchmarks/ is not a package: load data.py under a name no other module uses
_spec = importlib.util.spec_from_file_location("fastseg_bench_data", Path(__file__).with_name("data.py"))
assert _spec is not None and _spec.loader is not None
bd = importlib.util.module_from_spec(_spec)
sys.modules["fastseg_bench_data"] = bd
_spec.loader.exec_module(bd)


@pytest.hookimpl(tryfirst=True)
def pytest_configure(config: pytest.Config) -> None:
    opt = config.option
    if getattr(opt, "benchmark_only", False) and getattr(opt, "benchmark_disable", False):
        opt.benchmark_enable = True  # an explicit --benchmark-only overrides addopts' --benchmark-disable
    try:
        bd.bench_size()
    except ValueError as e:  # a bad FASTSEG_BENCH_SIZE stops the run here, with its message
        raise pytest.UsageError(str(e)) from None
    if bd.deprecated_small():
        print(
            "note: FASTSEG_BENCH_SMALL is deprecated; use FASTSEG_BENCH_SIZE=small "
            f"(this run: FASTSEG_BENCH_SIZE={bd.bench_size()})",
            file=sys.stderr,
        )


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _version(name: str) -> str | None:
    try:
        from importlib.metadata import version

        return version(name)
    except Exception:
        return None


def _loadavg() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:  # pragma: no cover
        return None


def pytest_benchmark_update_machine_info(config: pytest.Config, machine_info: dict[str, Any]) -> None:
    """Machine, library versions and load, for make_table.py (the load is sampled at the end too)."""
    machine_info["fastseg_bench"] = {
        "cpu_model": _cpu_model(),
        "cores_available": bd.cpu_count(),
        "cores_total": os.cpu_count(),
        "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "size": bd.bench_size(),
        "loadavg_end": _loadavg(),
        "versions": {
            "python": platform.python_version(),
            **{
                n: _version(n)
                for n in (
                    "fastseg-eval",
                    "numpy",
                    "numba",
                    "zarr",
                    "numcodecs",
                    "dask",
                    "scikit-learn",
                    "pytest-benchmark",
                )
            },
        },
    }


def pytest_sessionstart(session: pytest.Session) -> None:
    session.config._fastseg_load_start = _loadavg()  # type: ignore[attr-defined]


def pytest_benchmark_update_json(config: pytest.Config, benchmarks: Any, output_json: dict[str, Any]) -> None:
    info = output_json.setdefault("machine_info", {}).setdefault("fastseg_bench", {})
    info["loadavg_start"] = getattr(config, "_fastseg_load_start", None)
    info["loadavg_end"] = _loadavg()


@pytest.fixture(scope="session")
def sizes() -> dict[str, Any]:
    return bd.sizes()


@pytest.fixture(scope="session")
def warm_kernels() -> None:
    """Fill numba's cache in a throwaway worker first, so that no measured worker compiles.

    (Compiling takes seconds and a few hundred MiB that would land in a case's peak RSS.)
    """
    with bd.Worker() as w:
        w.call("prepare")


def annotate(benchmark: Any, *, key: str, case: str, size: str, voxels: int, **extra: Any) -> None:
    """Attach what make_table.py needs to a benchmark (JSON ``extra_info``)."""
    benchmark.extra_info.update({"key": key, "case": case, "size": size, "voxels": int(voxels), **extra})


bd.annotate = annotate  # test modules reach it as fastseg_bench_data.annotate
