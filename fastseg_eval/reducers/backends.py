"""Choice of compute backend, made in this one place and logged."""

from __future__ import annotations

import logging
import os

from fastseg_eval.errors import BackendError, OptionError

log = logging.getLogger("fastseg_eval")

BACKENDS = ("auto", "cpu", "cuda")


def cuda_status() -> tuple[bool, str]:
    """Whether the CUDA backend can run here, and why not if it cannot."""
    simulated = os.environ.get("NUMBA_ENABLE_CUDASIM") == "1"
    try:
        from fastseg_eval.kernels import cuda as _cuda  # noqa: F401
    except ImportError as e:
        return False, (
            f"the CUDA backend is not available ({e}); install numba-cuda with "
            "`pip install fastseg-eval[cuda12]` (or [cuda13])"
        )
    return _cuda.available(simulated)


def _gpu_device_present() -> bool:
    """A cheap look for an NVIDIA device node, so that "auto" need not import numba-cuda.

    Only decisive on Linux (device nodes, or /dev/dxg under WSL); elsewhere "maybe" (True).
    """
    import glob
    import sys

    if not sys.platform.startswith("linux"):
        return True
    return bool(glob.glob("/dev/nvidia[0-9]*") or os.path.exists("/dev/dxg"))


def resolve_backend(name: str) -> str:
    """``"cpu"`` or ``"cuda"`` for a requested backend name; raises a clear error otherwise."""
    if name not in BACKENDS:
        raise OptionError(f"backend={name!r} is not a backend; choose one of {', '.join(BACKENDS)}")
    if name == "cpu":
        return "cpu"
    if name == "auto" and not _gpu_device_present():
        log.info("backend auto -> cpu (no GPU device found)")
        return "cpu"
    ok, why = cuda_status()
    if name == "cuda":
        if not ok:
            raise BackendError(f"backend='cuda' cannot run here: {why}")
        return "cuda"
    chosen = "cuda" if ok and os.environ.get("NUMBA_ENABLE_CUDASIM") != "1" else "cpu"
    log.info("backend auto -> %s%s", chosen, "" if ok else f" ({why})")
    return chosen
