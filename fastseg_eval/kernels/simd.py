"""Two LLVM operations numba does not expose, as numba intrinsics: 64 byte lanes to a bit mask,
and a 64-bit population count.

:func:`lane_mask64` loads 64 bytes as one ``<64 x i8>`` vector, tests each lane against a bit
pattern and returns the 64 answers as the bits of one uint64 (``icmp`` then ``bitcast <64 x i1>
to i64``). LLVM lowers this to what the machine has: ``vptestmb`` + ``kmovq`` with AVX-512, two
``vpcmpeqb`` + ``vpmovmskb`` pairs with AVX2, a short shuffle sequence elsewhere; the result is the
same everywhere, only the speed differs. numba's own loops cannot express it: a loop that sets
one bit per byte stays scalar. :func:`popcount` is ``llvm.ctpop.i64`` (``popcnt``).

Both are used inside ``@njit`` kernels only (:func:`fastseg_eval.kernels.cpu.count_small`); they
compile into the caller, so numba's on-disk cache keeps them with it.
"""

from __future__ import annotations

from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

_I8 = ir.IntType(8)
_I32 = ir.IntType(32)
_I64 = ir.IntType(64)
_V64 = ir.VectorType(_I8, 64)


@intrinsic
def lane_mask64(typingctx, arr, pos, bits):  # type: ignore[no-untyped-def]
    """``lane_mask64(arr, pos, bits)``: a uint64 whose bit ``i`` is set when ``arr[pos + i] &
    bits != 0``, for ``i`` in 0..63. ``arr`` is a C-contiguous 1-D uint8 (or int8) array and
    ``pos + 64 <= len(arr)`` (the caller's duty: nothing is checked); ``bits`` an integer whose
    low byte is the pattern."""
    if not (isinstance(arr, types.Array) and arr.ndim == 1 and arr.layout == "C" and arr.dtype.bitwidth == 8):
        return None
    sig = types.uint64(arr, pos, bits)

    def codegen(context, builder, signature, args):  # type: ignore[no-untyped-def]
        ary = context.make_array(signature.args[0])(context, builder, args[0])
        ptr = builder.gep(ary.data, [args[1]])
        vec = builder.load(builder.bitcast(ptr, _V64.as_pointer()), align=1)
        pattern = builder.trunc(args[2], _I8)
        one = builder.insert_element(ir.Constant(_V64, ir.Undefined), pattern, ir.Constant(_I32, 0))
        splat = builder.shuffle_vector(
            one, ir.Constant(_V64, ir.Undefined), ir.Constant(ir.VectorType(_I32, 64), [0] * 64)
        )
        hit = builder.icmp_unsigned("!=", builder.and_(vec, splat), ir.Constant(_V64, [0] * 64))
        return builder.bitcast(hit, _I64)

    return sig, codegen


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
