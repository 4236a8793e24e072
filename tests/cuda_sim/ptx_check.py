"""Compile every CUDA kernel of fastseg_eval.kernels.cuda to PTX with the real numba-cuda compiler.

The simulator runs kernels as Python: it checks logic, not types. This script types and lowers
the kernels exactly as a GPU run would (calls of the CPU module's ``@njit`` helpers included),
without a GPU: it needs only libNVVM and NVRTC, which ``pip install fastseg-eval[cuda12]`` (or
``[cuda13]``) brings. Exit status 0: compiled and checked; 77: libNVVM / NVRTC not found (the
caller skips); anything else: a failure, with the reason on stderr.

Run it with the simulator off: ``python tests/cuda_sim/ptx_check.py``.
"""

from __future__ import annotations

import inspect
import os
import re
import sys

CC = (8, 0)


def main() -> int:
    if os.environ.get("NUMBA_ENABLE_CUDASIM") == "1":
        print("run ptx_check.py without NUMBA_ENABLE_CUDASIM", file=sys.stderr)
        return 2
    from numba import cuda
    from numba.cuda import types as T

    from fastseg_eval.kernels import cuda as kc

    problem = kc.compiler_problem()
    if problem:
        print(f"the CUDA compiler libraries are not available: {problem}")
        return 77

    # device functions called from a kernel ask the current device for its compute capability;
    # there is no device here, so name one
    import numba.cuda.dispatcher as dispatcher

    class _Device:
        compute_capability = CC

    dispatcher.get_current_device = lambda: _Device()

    assert not kc.SIMULATOR
    u64, i64, b1, u32, i32 = T.uint64, T.int64, T.boolean, T.uint32, T.int32
    kernel = kc.count_pairs_kernel.py_func
    params = list(inspect.signature(kernel).parameters)

    def signature(g, p, m):
        types = {
            "g": g[::1], "p": p[::1], "m": m[::1], "n": i64, "has_mask": b1, "ignore": u64,
            "has_ignore": b1, "direct": b1, "g_limit": u64, "p_limit": u64, "g_signed_from": u64,
            "p_signed_from": u64, "fixed": b1, "lut": i32[::1], "hkeys": u64[::1], "hvals": i32[::1],
            "lo": i64, "hi": i64, "first": b1, "layout": i64, "kcap": i64, "hot": i64, "nsub": i64,
            "nslots": i64, "table": u64[::1], "skipped": u64[::1], "status": u64[::1], "seen": u32[::1],
            "newbig": u64[::1],
        }  # fmt: skip
        missing = set(params) ^ set(types)
        if missing:
            raise SystemExit(f"ptx_check.py is out of date with the kernel's parameters: {sorted(missing)}")
        return tuple(types[name] for name in params)

    unsigned = (T.uint8, T.uint16, T.uint32, T.uint64)
    ptx = ""
    count = 0
    for g in unsigned:
        for p, m in ((T.uint8, T.uint8), (T.uint64, T.int32), (g, T.uint16)):
            ptx, _ = cuda.compile_ptx(kernel, signature(g, p, m), cc=CC)
            count += 1
    for nd, gather in kc.GATHER.items():
        for t in (T.uint8, T.int16, T.uint64, T.boolean):
            cuda.compile_ptx(gather.py_func, (T.Array(t, nd, "A"), t[::1]), cc=CC)
            count += 1

    atomics = sorted(set(re.findall(r"atom\.[a-z0-9.]+", ptx)))
    shared = re.findall(r"\.shared \.align \d+ \.b8 \w+\[(\d+)\]", ptx)
    floats = re.findall(r"cvt\.[a-z]+\.f64|\.f64 ", ptx)
    problems = []
    if floats:
        problems.append(f"floating-point conversions in the counting kernel: {sorted(set(floats))[:5]}")
    if sorted(int(x) for x in shared) != sorted([4 * kc.SHARED_WORDS, 16]):
        problems.append(f"unexpected shared memory: {shared} bytes")
    for needed in (
        "atom.shared.add.u32",
        "atom.global.add.u64",
        "atom.global.min.u64",
        "atom.global.cas.b64",
    ):
        if needed not in atomics:
            problems.append(f"{needed} missing from {atomics}")
    if "call" in ptx.split(".entry", 1)[1]:
        problems.append("the per-voxel helpers were not inlined (a call remains in the kernel)")
    if problems:
        print("\n".join(problems), file=sys.stderr)
        return 1
    print(
        f"OK: {count} kernels compiled to PTX for sm_{CC[0]}{CC[1]}; atomics {atomics}; shared {shared} bytes"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
