"""The CUDA backend's tests, each in a child process (numba reads its CUDA settings at import).

* ``test_simulator_suite`` runs tests/cuda_sim/sim_*.py with ``NUMBA_ENABLE_CUDASIM=1``: the
  CUDA kernels executed by numba's simulator, compared with the CPU backend and with numpy.
  Those modules are not named ``test_*`` so that this (parent) run never imports them.
* without the simulator and without a GPU, ``backend="cuda"`` raises one clear
  :class:`~fastseg_eval.BackendError` and ``"auto"`` picks the CPU;
* tests/cuda_sim/ptx_check.py compiles every kernel for a real GPU (types and lowering that
  the simulator does not check) where the CUDA compiler libraries are installed.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SIM_DIR = Path(__file__).with_name("cuda_sim")
HAS_NUMBA_CUDA = importlib.util.find_spec("numba_cuda") is not None
needs_numba_cuda = pytest.mark.skipif(
    not HAS_NUMBA_CUDA, reason="numba-cuda is not installed (pip install numba-cuda)"
)


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "NUMBA_ENABLE_CUDASIM"}
    env.update(extra)
    return env


def _run(args: list[str], env: dict[str, str], timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


@needs_numba_cuda
def test_simulator_suite():
    files = sorted(str(p.relative_to(ROOT)) for p in SIM_DIR.glob("sim_*.py"))
    assert len(files) >= 2, files
    proc = _run(
        [sys.executable, "-m", "pytest", *files, "-q", "-p", "no:cacheprovider"],
        _env(NUMBA_ENABLE_CUDASIM="1"),
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"simulator tests failed (exit {proc.returncode}):\n{out[-30000:]}"
    summary = out.strip().splitlines()[-1]
    assert re.search(r"\b\d+ passed\b", summary), summary
    assert not re.search(r"skipped|xfail|deselected|error", summary), summary  # every test really ran


_NO_GPU_SCRIPT = textwrap.dedent(
    """
    import json, sys
    import numpy as np
    out = {}
    try:
        from numba import cuda
        out["gpu"] = bool(cuda.is_available())
    except ImportError:
        out["gpu"] = False
    import fastseg_eval as fse
    from fastseg_eval.reducers.backends import cuda_status, resolve_backend
    out["auto"] = resolve_backend("auto")
    out["status"] = list(cuda_status())
    try:
        fse.evaluate(np.zeros((2, 3), np.uint8), np.zeros((2, 3), np.uint8), backend="cuda")
        out["error"] = None
    except fse.BackendError as e:
        out["error"] = str(e)
    print(json.dumps(out))
    """
)


def _json_run(script: str, env: dict[str, str]) -> dict:
    proc = _run([sys.executable, "-c", script], env, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


@needs_numba_cuda
def test_backend_cuda_without_gpu_or_simulator_is_a_clear_error():
    out = _json_run(_NO_GPU_SCRIPT, _env())
    if out["gpu"]:
        pytest.skip("this machine has a CUDA GPU")
    assert out["auto"] == "cpu"
    assert out["status"][0] is False
    msg = out["error"]
    assert msg is not None and msg.startswith("backend='cuda' cannot run here: ")
    assert "no usable CUDA GPU" in msg and "backend='cpu'" in msg and "NUMBA_ENABLE_CUDASIM=1" in msg
    assert "Traceback" not in msg and "\n" not in msg


def test_backend_cuda_without_numba_cuda_says_what_to_install():
    script = "import sys; sys.modules['numba_cuda'] = None\n" + _NO_GPU_SCRIPT
    out = _json_run(script, _env())
    assert out["auto"] == "cpu"
    msg = out["error"]
    assert msg is not None and msg.startswith("backend='cuda' cannot run here: ")
    assert "numba-cuda is not installed" in msg and "pip install fastseg-eval[cuda12]" in msg


@needs_numba_cuda
def test_simulator_switched_on_too_late_is_explained():
    script = textwrap.dedent(
        """
        import json, os
        import fastseg_eval.kernels.cuda as kc   # numba.cuda imported without the simulator
        os.environ["NUMBA_ENABLE_CUDASIM"] = "1"
        from fastseg_eval.reducers.backends import cuda_status
        print(json.dumps(list(cuda_status())))
        """
    )
    proc = _run([sys.executable, "-c", script], _env(), timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    ok, why = json.loads(proc.stdout.strip().splitlines()[-1])
    assert ok is False and "set after numba.cuda had been imported" in why


@needs_numba_cuda
def test_kernels_compile_for_a_real_gpu():
    """numba-cuda types and lowers every kernel to PTX (needs libNVVM + NVRTC, not a GPU)."""
    proc = _run([sys.executable, str(SIM_DIR / "ptx_check.py")], _env(), timeout=600)
    out = proc.stdout + proc.stderr
    if proc.returncode == 77:
        pytest.skip(
            f"CUDA compiler libraries not installed (pip install fastseg-eval[cuda12]): {out.strip()[-300:]}"
        )
    assert proc.returncode == 0, out[-20000:]
    assert out.startswith("OK:"), out
