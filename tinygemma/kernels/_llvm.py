"""What every kernel shares: Numba's options, and the LLVM-level helpers Numba lacks.

Bit casts LLVM does in one instruction (float16 and bfloat16 bits to float32, ``2**n``), the
typed accessors of stored 16-bit floats and of panels, a vectorised ``exp`` for the softmax,
and accumulator lanes that stay in SIMD registers.

The kernels in the other files inline these helpers: Numba's ``cache=True`` would not notice
a change here (numba issue 1833), so :mod:`tinygemma.numba_cache` stamps every kernel's cache
with a hash of all the files of ``kernels/``.
"""

from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import carray, njit, types
from numba.core import cgutils
from numba.extending import intrinsic, overload, register_jitable

from ..numba_cache import CACHE_DIR  # a writable cache folder, or None: decided before decorating

# Reassociation lets LLVM split a sum over SIMD lanes (the order of float32 additions);
# contraction fuses a multiply-add (one rounding); 'arcp' may divide by multiplying with a
# reciprocal; 'nsz' ignores the sign of zero. Results move by rounding, far inside the test
# tolerance. No 'nnan'/'ninf': the attention mask uses -inf.
FAST = {"reassoc", "contract", "nsz", "arcp"}
# error_model="numpy": no check for division by zero, which would stop a loop vectorising.
JIT = dict(cache=CACHE_DIR is not None, nogil=True, error_model="numpy")
f32 = np.float32


# ---- bit casts LLVM does in one instruction --------------------------------------------------
@intrinsic
def _half(typingctx, lo, hi):
    """The float16 stored in bytes ``lo, hi`` (little endian), exactly, as float32."""
    sig = types.float32(types.uint8, types.uint8)

    def codegen(context, builder, signature, args):
        i16 = ir.IntType(16)
        bits = builder.or_(builder.zext(args[0], i16),
                           builder.shl(builder.zext(args[1], i16), ir.Constant(i16, 8)))
        return builder.fpext(builder.bitcast(bits, ir.HalfType()), ir.FloatType())
    return sig, codegen


@intrinsic
def _half16(typingctx, u):
    """The float16 whose bits are the uint16 ``u``, exactly, as float32."""
    sig = types.float32(types.uint16)

    def codegen(context, builder, signature, args):
        return builder.fpext(builder.bitcast(args[0], ir.HalfType()), ir.FloatType())
    return sig, codegen


@intrinsic
def _bf16(typingctx, u):
    """The bfloat16 whose bits are the uint16 ``u``: ``u << 16`` read as float32 (exact)."""
    sig = types.float32(types.uint16)

    def codegen(context, builder, signature, args):
        i32 = ir.IntType(32)
        bits = builder.shl(builder.zext(args[0], i32), ir.Constant(i32, 16))
        return builder.bitcast(bits, ir.FloatType())
    return sig, codegen


@intrinsic
def _pow2(typingctx, n):
    """``2**n`` as float32 for an integer ``n`` in [-126, 127]: exponent bits ``(n + 127) << 23``."""
    sig = types.float32(types.int32)

    def codegen(context, builder, signature, args):
        i32 = ir.IntType(32)
        bits = builder.shl(builder.add(args[0], ir.Constant(i32, 127)), ir.Constant(i32, 23))
        return builder.bitcast(bits, ir.FloatType())
    return sig, codegen


@intrinsic
def _prefetch(typingctx, a, offset):
    """Ask for the cache line at byte ``offset`` of array ``a``'s data to be loaded into the
    caches (LLVM's ``llvm.prefetch``, x86 ``prefetcht0``): a hint that changes no result and
    never faults."""
    sig = types.void(a, types.intp)

    def codegen(context, builder, signature, args):
        data = context.make_array(signature.args[0])(context, builder, value=args[0]).data
        i8p = ir.IntType(8).as_pointer()
        at = builder.gep(builder.bitcast(data, i8p), [args[1]])
        i32 = ir.IntType(32)
        fn = cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(ir.VoidType(), [i8p, i32, i32, i32]), "llvm.prefetch.p0")
        builder.call(fn, [at, ir.Constant(i32, 0), ir.Constant(i32, 3), ir.Constant(i32, 1)])
        return context.get_dummy_value()
    return sig, codegen


# Numba has no float16 or bfloat16 arrays, so 16-bit floats are held as their bits, and the
# integer type says which: uint16 for bfloat16, int16 for float16 (a view, no copy).
def _as_f32(v):
    """A stored value as float32, exactly: bfloat16 bits (uint16), float16 bits (int16) or a
    float32."""


@overload(_as_f32)
def _as_f32_impl(v):
    if v == types.uint16:
        return lambda v: _bf16(v)
    if v == types.int16:
        return lambda v: _half16(np.uint16(v))
    return lambda v: f32(v)


# A panel holds one int8 per weight; for 4-bit types (Q4_K) two weights per uint8: the weight at
# position c in the low nibble of byte c // 2 when c is even, in the high one if odd; for 5-bit
# types (Q5_0, q in [-16, 16)) q + 16 in a 4-D uint8 array [P, n / 8, 5, 16]: each run of 8
# positions takes 5 rows of 16 bytes, 4 of nibbles as above (position c = 8 g + r in row
# r // 2) and one of fifth bits (bit r), read front to back.
@njit(inline="always")
def _q5_at(qp, p, g, r, lane):
    """``q + 16`` (0 to 31) at position ``8 g + r`` of lane ``lane`` in 5-bit panel ``p``, as
    float32; with ``r`` a constant, a few byte operations that the 16 lanes share."""
    low = (qp[p, g, r >> 1, lane] >> (4 * (r & 1))) & 15
    return f32(low | (((qp[p, g, 4, lane] >> r) & 1) << 4))


def _q_at(qp, p, c, lane):
    """The weight at position ``c`` of lane ``lane`` in panel ``p``, as float32."""


@overload(_q_at)
def _q_at_impl(qp, p, c, lane):
    if qp.ndim == 4:
        return lambda qp, p, c, lane: _q5_at(qp, p, c >> 3, c & 7, lane) - f32(16)
    if qp.dtype == types.uint8:
        return lambda qp, p, c, lane: f32((qp[p, c >> 1, lane] >> (4 * (c & 1))) & 15)
    return lambda qp, p, c, lane: f32(qp[p, c, lane])


def _q_put(qp, p, c, lane, v):
    """Store weight ``v`` at position ``c`` (a 4- or 5-bit panel must start zeroed)."""


@overload(_q_put)
def _q_put_impl(qp, p, c, lane, v):
    if qp.ndim == 4:
        def put5(qp, p, c, lane, v):
            g, k, u = c >> 3, c & 7, v + 16
            qp[p, g, k >> 1, lane] |= np.uint8((u & 15) << (4 * (k & 1)))
            qp[p, g, 4, lane] |= np.uint8(((u >> 4) & 1) << k)
        return put5
    if qp.dtype == types.uint8:
        def put(qp, p, c, lane, v):
            qp[p, c >> 1, lane] |= np.uint8((v & 15) << (4 * (c & 1)))
        return put

    def put_int8(qp, p, c, lane, v):
        qp[p, c, lane] = v
    return put_int8


# A panel's scales: one per group of G columns and lane, ``[P, n / G, 16]``, float32 or float16
# bits (int16); for Q6_K int8 ``[P, n / 256, 18, 16]``: for each super-block of 16 groups,
# rows 0-15 the groups' int8 sub-scales, rows 16 and 17 the low and high bytes of the float16
# super-scale ``d`` (the block's own order), the scale being ``f32(d) * f32(sc)``, exactly.
def _scale_at(sp, p, b, lane):
    """The scale of group ``b`` of lane ``lane`` in panel ``p``, as float32, exactly."""


@overload(_scale_at)
def _scale_at_impl(sp, p, b, lane):
    if sp.ndim == 4:
        def super_scaled(sp, p, b, lane):
            k = b >> 4
            d = _half(np.uint8(sp[p, k, 16, lane]), np.uint8(sp[p, k, 17, lane]))
            return d * f32(sp[p, k, b & 15, lane])
        return super_scaled
    return lambda sp, p, b, lane: _as_f32(sp[p, b, lane])


@register_jitable
def _groups(sp):
    """The groups of columns (scales per row) of panels with scales ``sp``."""
    return sp.shape[1] * 16 if sp.ndim == 4 else sp.shape[1]


def _scale_put(sp, p, lane, scale, i):
    """Row ``i`` of row-major scales ``scale`` (``[rows, n / G]``; for Q6_K int8
    ``[rows, n / 256, 18]``) into lane ``lane`` of panel ``p``."""


@overload(_scale_put)
def _scale_put_impl(sp, p, lane, scale, i):
    if sp.ndim == 4:
        def put_super(sp, p, lane, scale, i):
            for k in range(sp.shape[1]):
                for j in range(sp.shape[2]):
                    sp[p, k, j, lane] = scale[i, k, j]
        return put_super

    def put(sp, p, lane, scale, i):
        for b in range(sp.shape[1]):
            sp[p, b, lane] = scale[i, b]
    return put


@njit(inline="always", fastmath=FAST)
def _exp(x):
    """``exp(x)`` for float32 ``x <= 0`` (softmax), within 1.3 ulp of the exact value.

    ``np.exp`` in a Numba loop is a call to libm per element (this Numba has no SVML); this
    one vectorises (its one test becomes a select). Cephes' ``expf``:
    ``x = n ln2 + r`` with ``|r| <= ln2 / 2``, a degree-6 polynomial for ``exp(r)``, and
    ``2**n`` built from bits. Below -87.3 the result would be subnormal; it is 0."""
    if x < f32(-87.33654):
        return f32(0)
    n = np.floor(x * f32(1.44269504) + f32(0.5))  # round(x / ln2)
    r = x - n * f32(0.693359375) + n * f32(2.12194440e-4)  # x - n ln2, ln2 in two parts
    p = f32(1.9875691500e-4)
    p = p * r + f32(1.3981999507e-3)
    p = p * r + f32(8.3334519073e-3)
    p = p * r + f32(4.1665795894e-2)
    p = p * r + f32(1.6666665459e-1)
    p = p * r + f32(5.0000001201e-1)
    p = p * r * r + r + f32(1)  # exp(r)
    return p * _pow2(np.int32(n))


@intrinsic
def _stack_lanes(typingctx):
    """128 float32 on the stack (uninitialised), as a pointer for ``carray``.

    The panel matvec accumulates into 80 of them (four groups' 16 rows, and the rows' sums).
    In an ``np.empty`` array (on the heap) LLVM must load and store them at every step; on
    the stack, with constant indices, it keeps them in SIMD registers (docs/performance.md)."""
    sig = types.CPointer(types.float32)()

    def codegen(context, builder, signature, args):
        lanes = cgutils.alloca_once(builder, ir.ArrayType(ir.FloatType(), 128))
        return builder.bitcast(lanes, ir.PointerType(ir.FloatType()))
    return sig, codegen


@njit(inline="always")
def _lanes():
    """128 float32 accumulator lanes that live in registers (see ``_stack_lanes``)."""
    return carray(_stack_lanes(), (128,))
