"""LLVM operations numba does not expose, as numba intrinsics: 64 byte lanes compared to a bit
mask, and a 64-bit population count.

:func:`lane_mask64` loads 64 bytes as one ``<64 x i8>`` vector, tests each lane against a bit
pattern and returns the 64 answers as the bits of one uint64 (``icmp`` then ``bitcast <64 x i1>
to i64``); :func:`lane_diff64` compares each lane with the byte before it (where runs of equal
bytes start) the same way, and :func:`lane_diff32` 32 lanes of 16 bits. LLVM lowers this to
what the machine has: ``vptestmb`` / ``vpcmpneqb`` + ``kmovq`` with AVX-512, ``vpcmpeqb`` +
``vpmovmskb`` pairs with AVX2, a short shuffle sequence elsewhere; the result is the same
everywhere, only the speed differs. numba's
own loops cannot express it: a loop that sets one bit per byte stays scalar. :func:`popcount`
is ``llvm.ctpop.i64`` (``popcnt``). To walk a mask's set bits, the kernels use numba's own
``trailing_zeros`` / ``leading_zeros`` (``numba.cpython.unsafe.numbers``). :func:`run_starts64`
and :func:`run_starts32` go one step further: they list the positions of run starts with
``llvm.experimental.vector.compress`` (LLVM 19+), one instruction with AVX-512 VBMI2
(:func:`fast_compress` says whether numba compiles for such a CPU).

They are used inside ``@njit`` kernels only (:func:`fastseg_eval.kernels.cpu.count_small`,
:func:`fastseg_eval.kernels.cpu.count_runs`, :func:`fastseg_eval.kernels.cpu.count_runs_listed`,
:func:`fastseg_eval.kernels.surface.corner_surface`);
they compile into the caller, so numba's on-disk cache keeps them with it.
"""

from __future__ import annotations

import llvmlite.binding as ll
from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

_I8 = ir.IntType(8)
_I16 = ir.IntType(16)
_I32 = ir.IntType(32)
_I64 = ir.IntType(64)
_V64 = ir.VectorType(_I8, 64)


def _lanes(kind: str):  # type: ignore[no-untyped-def]
    """The codegen of a 64-lane byte comparison: ``kind`` is "and" (``lane & v != 0``)."""

    def codegen(context, builder, signature, args):  # type: ignore[no-untyped-def]
        ary = context.make_array(signature.args[0])(context, builder, args[0])
        ptr = builder.gep(ary.data, [args[1]])
        vec = builder.load(builder.bitcast(ptr, _V64.as_pointer()), align=1)
        value = args[2] if args[2].type.width == 8 else builder.trunc(args[2], _I8)
        one = builder.insert_element(ir.Constant(_V64, ir.Undefined), value, ir.Constant(_I32, 0))
        splat = builder.shuffle_vector(
            one, ir.Constant(_V64, ir.Undefined), ir.Constant(ir.VectorType(_I32, 64), [0] * 64)
        )
        hit = builder.icmp_unsigned("!=", builder.and_(vec, splat), ir.Constant(_V64, [0] * 64))
        return builder.bitcast(hit, _I64)

    return codegen


def _byte_array(arr, value, bits: int = 8) -> bool:  # type: ignore[no-untyped-def]
    return (
        isinstance(arr, types.Array) and arr.ndim == 1 and arr.layout == "C" and arr.dtype.bitwidth == bits
        and isinstance(value, types.Integer)
    )  # fmt: skip


def _diff(width: int):  # type: ignore[no-untyped-def]
    """The codegen of :func:`lane_diff64` (``width`` 8) and :func:`lane_diff32` (16): the 512 bits
    at ``pos`` and at ``pos - 1`` loaded as vectors of ``width``-bit lanes, compared lane by lane,
    the answers returned as the low bits of a uint64."""
    lanes = 512 // width
    vec_t = ir.VectorType(ir.IntType(width), lanes)

    def codegen(context, builder, signature, args):  # type: ignore[no-untyped-def]
        ary = context.make_array(signature.args[0])(context, builder, args[0])
        here = builder.gep(ary.data, [args[1]])
        before = builder.gep(ary.data, [builder.sub(args[1], ir.Constant(args[1].type, 1))])
        vec = builder.load(builder.bitcast(here, vec_t.as_pointer()), align=1)
        prev = builder.load(builder.bitcast(before, vec_t.as_pointer()), align=1)
        bits = builder.bitcast(builder.icmp_unsigned("!=", vec, prev), ir.IntType(lanes))
        return bits if lanes == 64 else builder.zext(bits, _I64)

    return codegen


@intrinsic
def lane_diff64(typingctx, arr, pos):  # type: ignore[no-untyped-def]
    """``lane_diff64(arr, pos)``: a uint64 whose bit ``i`` is set when ``arr[pos + i] != arr[pos + i
    - 1]``, for ``i`` in 0..63 (where a run of equal bytes starts); ``pos >= 1`` and ``pos + 64 <=
    len(arr)`` (the caller's duty: nothing is checked)."""
    if not _byte_array(arr, pos):
        return None
    return types.uint64(arr, pos), _diff(8)


@intrinsic
def lane_diff32(typingctx, arr, pos):  # type: ignore[no-untyped-def]
    """:func:`lane_diff64` for 2-byte lanes: bit ``i`` (``i`` in 0..31) set when ``arr[pos + i] !=
    arr[pos + i - 1]``, ``arr`` a C-contiguous 1-D array of 16-bit integers, ``pos >= 1`` and
    ``pos + 32 <= len(arr)`` (the caller's duty: nothing is checked)."""
    if not _byte_array(arr, pos, bits=16):
        return None
    return types.uint64(arr, pos), _diff(16)


def _starts(width: int, lanes: int):  # type: ignore[no-untyped-def]
    """The codegen of :func:`run_starts64` (64 lanes of ``width`` bits) and :func:`run_starts32`
    (32 lanes of 16 bits)."""
    vec_t = ir.VectorType(ir.IntType(width), lanes)
    off_t = ir.VectorType(_I16, 32)
    mask_t = ir.VectorType(ir.IntType(1), 32)

    def codegen(context, builder, signature, args):  # type: ignore[no-untyped-def]
        g1, p1, pos, base, out, k = args
        ga, pa, oa = (context.make_array(signature.args[i])(context, builder, a) for i, a in ((0, g1), (1, p1), (4, out)))
        before = builder.sub(pos, ir.Constant(pos.type, 1))

        def load(ary, at):  # type: ignore[no-untyped-def]
            return builder.load(builder.bitcast(builder.gep(ary.data, [at]), vec_t.as_pointer()), align=1)

        starts = builder.or_(
            builder.icmp_unsigned("!=", load(ga, pos), load(ga, before)),
            builder.icmp_unsigned("!=", load(pa, pos), load(pa, before)),
        )
        compress = cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(off_t, [off_t, mask_t, off_t]), "llvm.experimental.vector.compress.v32i16"
        )
        ctpop = cgutils.get_or_insert_function(builder.module, ir.FunctionType(_I32, [_I32]), "llvm.ctpop.i32")
        first = builder.insert_element(ir.Constant(off_t, ir.Undefined), builder.trunc(base, _I16), ir.Constant(_I32, 0))
        splat = builder.shuffle_vector(
            first, ir.Constant(off_t, ir.Undefined), ir.Constant(ir.VectorType(_I32, 32), [0] * 32)
        )
        at = k
        for half in range(lanes // 32):
            mask = starts if lanes == 32 else builder.shuffle_vector(
                starts, starts, ir.Constant(ir.VectorType(_I32, 32), list(range(32 * half, 32 * half + 32)))
            )  # fmt: skip
            offsets = builder.add(splat, ir.Constant(off_t, list(range(32 * half, 32 * half + 32))))
            packed = builder.call(compress, [offsets, mask, ir.Constant(off_t, ir.Undefined)])
            builder.store(packed, builder.bitcast(builder.gep(oa.data, [at]), off_t.as_pointer()), align=1)
            at = builder.add(at, builder.zext(builder.call(ctpop, [builder.bitcast(mask, _I32)]), at.type))
        return at

    return codegen


def _starts_args(g1, p1, pos, base, out, k, bits: tuple[int, ...]) -> bool:  # type: ignore[no-untyped-def]
    return (
        isinstance(g1, types.Array) and g1.dtype.bitwidth in bits and _byte_array(g1, pos, g1.dtype.bitwidth)
        and _byte_array(p1, base, g1.dtype.bitwidth) and _byte_array(out, k, 16)
    )  # fmt: skip


VECTOR_COMPRESS = ll.llvm_version_info >= (19,)
"""Whether numba's LLVM has ``llvm.experimental.vector.compress`` (LLVM 19, llvmlite 0.45):
:func:`run_starts64` and :func:`run_starts32` compile only then."""


def fast_compress() -> bool:
    """Whether numba compiles for a CPU with a vector compress instruction (x86 AVX-512 VBMI2:
    ``vpcompressw``), where :func:`run_starts64` / :func:`run_starts32` are a few instructions;
    elsewhere LLVM spells the compress out lane by lane (same results, slower than walking the
    bits, so the kernels that use them are chosen only here: compiled for AVX2 on this machine,
    the listed K = 256 kernel took 51 ms against the bit walk's 22 ms per 64 Mvoxel)."""
    if not VECTOR_COMPRESS:
        return False
    from numba.core import codegen, config

    # the features numba's JIT compiles for (NUMBA_CPU_FEATURES, else the host's, NUMBA_ENABLE_AVX applied)
    features = config.CPU_FEATURES if config.CPU_FEATURES is not None else codegen.get_host_cpu_features()
    return {"+avx512vbmi2", "+avx512bw"} <= set(features.split(","))


@intrinsic
def run_starts64(typingctx, g1, p1, pos, base, out, k):  # type: ignore[no-untyped-def]
    """``run_starts64(g1, p1, pos, base, out, k)``: list where runs start among the 64 voxels
    from ``pos``: for each ``i`` in 0..63 with ``g1[pos + i] != g1[pos + i - 1]`` or ``p1[pos + i]
    != p1[pos + i - 1]``, in order, ``base + i`` is written to ``out[k], out[k + 1], ...``; returns
    ``k`` plus how many. ``g1``, ``p1``: C-contiguous 1-D arrays of labels of one width (1, 2, 4
    or 8 bytes); ``out``: of uint16. The caller's duty (nothing is checked): ``pos >= 1``, ``pos + 64 <= len(g1)``, ``k +
    64 <= len(out)`` (all 64 slots from ``k`` are written; those past the returned count hold
    garbage), ``base + 63 < 65536``.

    Two vector compares per input (each against itself one voxel earlier) give the run starts as
    a mask, and ``llvm.experimental.vector.compress`` packs the offsets ``base + i`` the mask
    selects (``vpcompressw`` with AVX-512 VBMI2, two per 64 voxels), stored as whole vectors."""
    if not _starts_args(g1, p1, pos, base, out, k, (8, 16, 32, 64)):
        return None
    return types.int64(g1, p1, pos, base, out, k), _starts(g1.dtype.bitwidth, 64)


@intrinsic
def run_starts32(typingctx, g1, p1, pos, base, out, k):  # type: ignore[no-untyped-def]
    """:func:`run_starts64` for 32 voxels of 2-byte labels: ``base + i`` for each ``i`` in 0..31
    where ``(g1, p1)`` changes at ``pos + i``; ``pos >= 1``, ``pos + 32 <= len(g1)``, ``k + 32 <=
    len(out)``, ``base + 31 < 65536`` (the caller's duty)."""
    if not _starts_args(g1, p1, pos, base, out, k, (16,)):
        return None
    return types.int64(g1, p1, pos, base, out, k), _starts(16, 32)


@intrinsic
def lane_mask64(typingctx, arr, pos, bits):  # type: ignore[no-untyped-def]
    """``lane_mask64(arr, pos, bits)``: a uint64 whose bit ``i`` is set when ``arr[pos + i] &
    bits != 0``, for ``i`` in 0..63. ``arr`` is a C-contiguous 1-D uint8 (or int8) array and
    ``pos + 64 <= len(arr)`` (the caller's duty: nothing is checked); ``bits`` an integer whose
    low byte is the pattern."""
    if not _byte_array(arr, bits):
        return None
    return types.uint64(arr, pos, bits), _lanes("and")


@intrinsic
def popcount(typingctx, x):  # type: ignore[no-untyped-def]
    """The number of set bits of a 64-bit integer (returned as int64)."""
    if not (isinstance(x, types.Integer) and x.bitwidth == 64):
        return None
    sig = types.int64(x)

    def codegen(context, builder, signature, args):  # type: ignore[no-untyped-def]
        fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(_I64, [_I64]), "llvm.ctpop.i64")
        return builder.call(fn, [args[0]])

    return sig, codegen

