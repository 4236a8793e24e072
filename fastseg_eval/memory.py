"""Memory a run may use, and the estimate for a label space, checked before counting starts.

A label space is the one thing whose memory does not follow the data: ``num_classes=10**9``
asks for three int64 counts per class in every worker and a per-class report, whatever the
volume. :func:`check_label_space` refuses such a run up front, in well under a second, with the
estimate and the budget, instead of letting the kernel's out-of-memory killer end it silently.

The budget is, in order: the ``memory_limit`` argument (``--memory-limit``), the environment
variable ``FASTSEG_MEMORY_LIMIT``, else half the memory available now (the smaller of the
system's available memory and what the cgroup of a container still allows). Sizes are bytes or
strings such as ``"512M"``, ``"8G"``, ``"1.5GiB"``.
"""

from __future__ import annotations

import os
import re
from typing import Any

from fastseg_eval.errors import OptionError, option

DEFAULT_FRACTION = 0.5
"""Share of the available memory a run may plan for its label space when no limit is given."""

REPORT_BYTES_PER_CLASS = 64 * 8
"""Per-class bytes of the report arrays (counts and metric columns, with temporaries)."""

_UNITS = {"": 1, "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40}


def parse_size(value: Any, what: str = "memory_limit") -> int:
    """Bytes from an int or a string like ``"8G"`` / ``"512 MiB"`` / ``"1.5g"``."""
    name = option(what) if what == "memory_limit" else what
    bad = f"{name} must be a size such as 8G or 512M, got {value!r}"
    if isinstance(value, bool):
        raise OptionError(bad)
    if isinstance(value, (int, float)) and value > 0:
        return int(value)
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kKmMgGtT]?)(?:i?[bB])?\s*", str(value))
    if not m or float(m.group(1)) <= 0:
        raise OptionError(bad)
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def available_memory() -> int:
    """Bytes this process can still allocate: system available memory, capped by its cgroup."""
    avail = None
    try:
        with open("/proc/meminfo", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    avail = int(line.split()[1]) * 1024
                    break
    except OSError:
        pass
    if avail is None:
        try:
            avail = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError, AttributeError):
            avail = 8 * 2**30  # unknown platform: assume a modest machine
    for limit_file, used_file in (
        ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
        ("/sys/fs/cgroup/memory/memory.limit_in_bytes", "/sys/fs/cgroup/memory/memory.usage_in_bytes"),
    ):
        try:
            with open(limit_file, encoding="ascii") as fh:
                raw = fh.read().strip()
            if raw == "max" or int(raw) >= 2**60:
                continue
            with open(used_file, encoding="ascii") as fh:
                used = int(fh.read().strip())
            avail = min(avail, max(int(raw) - used, 0))
            break
        except (OSError, ValueError):
            continue
    return int(avail)


def memory_budget(memory_limit: Any = None) -> tuple[int, str]:
    """The budget in bytes and where it came from (for messages)."""
    if memory_limit is not None:
        return parse_size(memory_limit), f"set by {option('memory_limit')}"
    env = os.environ.get("FASTSEG_MEMORY_LIMIT")
    if env:
        return parse_size(env, "FASTSEG_MEMORY_LIMIT"), "set by FASTSEG_MEMORY_LIMIT"
    return int(DEFAULT_FRACTION * available_memory()), "half of the available memory"


def label_space_bytes(k: int, workers: int, dense_max: int, *, report: bool = True) -> int:
    """Estimated bytes for ``k`` fixed labels: per-worker count tables, label tables, the report."""
    per_worker = 8 * k * k if k <= dense_max else 3 * 8 * k
    labels = 8 * k + (12 * 2 * k if k > 2**16 else 0)  # label values, and the hash for large ids
    return workers * (per_worker + labels) + (REPORT_BYTES_PER_CLASS * k if report else 0)


def format_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"):
        if abs(n) < 1024 or unit == "EiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} EiB"  # pragma: no cover


def check_label_space(
    k: int, *, workers: int = 1, dense_max: int, memory_limit: Any = None, source: str = "num_classes"
) -> None:
    """Refuse a label space whose tables and report would not fit the memory budget."""
    need = label_space_bytes(k, workers, dense_max)
    budget, origin = memory_budget(memory_limit)
    if need <= budget:
        return
    per = "a dense K x K table" if k <= dense_max else "3 counts per label"
    raise OptionError(
        f"{option(source, k)} labels would need about {format_bytes(need)} ({per} in each of {workers} "
        f"worker(s), plus the per-label report), more than the memory budget of {format_bytes(budget)} "
        f"({origin}). Give fewer labels ({option('num_classes')} / {option('labels')}), leave both out to "
        f"count only the labels present in the data, or raise the budget with {option('memory_limit', '')} "
        "(or the environment variable FASTSEG_MEMORY_LIMIT)"
    )
