"""The fast path: Numba kernels over compact weights, switched in by :class:`FastGemma`.

The reference path (``layers.py``, ``model.py``) decodes every weight matrix to float32 and
multiplies with NumPy. Decoding one token is a matrix-vector product per projection, which
reads every weight once; float32 copies would make it read 2x (bf16) to 7x (4-bit) more bytes.
So the kernels read compact weights and decode them in registers, inside the dot product:

* :class:`Packed`: a matrix in the form the kernels read. bf16, float16 and float32 are read
  as stored, memory-mapped. The GGUF block types (Q8_0, Q5_0, Q4_0, Q4_K, Q5_K, Q6_K) are
  unpacked once, when first used, to one int8 per weight (two 4-bit values a byte for Q4_K)
  plus group scales (``w = scale * q - shift``), in panels of 16 rows stored side by side
  (``to_panels``): unpacking 5- or 6-bit fields inside the matvec costs more instructions per
  weight than the 2 cores can hide behind memory reads, and over panels the matvec needs
  fewer instructions per weight than over rows.
* ``matvec_panels``, ``matvec_stored``: ``y[t] = W x[t]`` for a few tokens ``t``
  (decode), parallel over panels or chunks of rows (``prange``), float32 accumulation. The weights they
  multiply by are exactly those of the reference path; only the order of the additions
  differs (``fastmath`` reassociation, which lets LLVM vectorise the sums).
* ``unpack_*``, ``decode_*``: exact, no fastmath; decoded rows are bit for bit
  ``gguf.quants.dequantize``. Prefill multiplies many tokens at once, so there the weights are
  float32 matrices multiplied with BLAS: kept decoded for a small model, else decoded a tile
  of rows at a time (``x @ tile.T``).
* ``attend_cache``: attention of a few new queries over the KV cache, multi-query aware: the
  keys and values of a shared KV head are read once for all the query heads of its group.
  In a prefill, ``masked_softmax`` between two BLAS products, with a vectorised ``_exp``.
* ``rms_norm_rows``, ``rope_rows``, ``geglu_rows``: RMSNorm, RoPE and the GeGLU gate in one
  pass each.

:class:`FastGemma` overrides only :meth:`Gemma.linear`, :meth:`Gemma.projections` (q, k, v
in one matvec, gate and up in another), :meth:`Gemma.attend`, :meth:`Gemma.norm`,
:meth:`Gemma.rope` and :meth:`Gemma.geglu`; the forward pass itself stays the readable one in
``model.py``. Every kernel is tested equal to its NumPy twin (``tests/test_kernels.py``).

Block layouts (from ggml; ``d``, ``dmin`` are float16 scales)::

    Q8_0  32 weights in 34 bytes: d, 32 int8 q               w = d * q
    Q5_0  32 weights in 22 bytes: d, qh (32 high bits), 16 bytes of low nibbles
                                                             w = d * (q - 16)
    Q4_0  32 weights in 18 bytes: d, 16 bytes of nibbles     w = d * (q - 8)
    Q4_K  256 weights in 144 bytes: d, dmin, 12 bytes of 6-bit scales/mins for 8 sub-blocks,
          128 bytes of nibbles                               w = d*sc * q - dmin*m
    Q6_K  256 weights in 210 bytes: 128 bytes low nibbles, 64 bytes high 2 bits,
          16 int8 scales (one per 16 weights), d             w = d*scale * (q - 32)
"""

from __future__ import annotations

import os
import threading
from typing import NamedTuple

import numpy as np
from llvmlite import ir
import numba
from numba import carray, config as numba_config, njit, prange, set_num_threads, types
from numba.core import cgutils
from numba.extending import intrinsic, overload

from .model import Gemma, KVCache
from .numba_cache import CACHE_DIR  # a writable cache folder, or None: decided before decorating

# Reassociation lets LLVM split a sum over SIMD lanes (the order of float32 additions);
# contraction fuses a multiply-add (one rounding); 'arcp' may divide by multiplying with a
# reciprocal; 'nsz' ignores the sign of zero. Results move by rounding, far inside the test
# tolerance. No 'nnan'/'ninf': the attention mask uses -inf.
FAST = {"reassoc", "contract", "nsz", "arcp"}
# error_model="numpy": no check for division by zero, which would stop a loop vectorising.
JIT = dict(cache=CACHE_DIR is not None, nogil=True, error_model="numpy")
f32 = np.float32

SMALL_T = 8  # up to this many tokens, the matvec kernels; beyond, decoded tiles and BLAS
TILE_ELEMS = 1 << 21  # float32 elements in one decoded tile (8 MB): fits the L3 cache
QUERY_BLOCK = 128  # prefill attention: queries per block (see FastGemma._attend_blocks)
KEYS_PER_PART = 64  # decode attention: split a KV head's keys over threads from 2 x this many
KEEP_F32_BYTES = 512 << 20  # prefill keeps the layers' matrices in float32 if all fit in this


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


# A panel holds one int8 per weight, or for 4-bit types (Q4_K) two weights per uint8: the
# weight at position c in the low nibble of byte c // 2 when c is even, in the high one if odd.
def _q_at(qp, p, c, lane):
    """The weight at position ``c`` of lane ``lane`` in panel ``p``, as float32."""


@overload(_q_at)
def _q_at_impl(qp, p, c, lane):
    if qp.dtype == types.uint8:
        return lambda qp, p, c, lane: f32((qp[p, c >> 1, lane] >> (4 * (c & 1))) & 15)
    return lambda qp, p, c, lane: f32(qp[p, c, lane])


def _q_put(qp, p, c, lane, v):
    """Store weight ``v`` at position ``c`` (a nibble panel must start zeroed)."""


@overload(_q_put)
def _q_put_impl(qp, p, c, lane, v):
    if qp.dtype == types.uint8:
        def put(qp, p, c, lane, v):
            qp[p, c >> 1, lane] |= np.uint8((v & 15) << (4 * (c & 1)))
        return put

    def put_int8(qp, p, c, lane, v):
        qp[p, c, lane] = v
    return put_int8


@njit(inline="always", fastmath=FAST)
def _exp(x):
    """``exp(x)`` for float32 ``x <= 0`` (softmax), within 1.3 ulp of the exact value.

    ``np.exp`` in a Numba loop is a call to libm per element (this Numba has no SVML), 4 ns
    each; this one vectorises (0.2 ns; its one test becomes a select). Cephes' ``expf``:
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
    the stack, with constant indices, it keeps them in SIMD registers (that made the former
    row-major Q8_0 LM head 1.9x faster)."""
    sig = types.CPointer(types.float32)()

    def codegen(context, builder, signature, args):
        lanes = cgutils.alloca_once(builder, ir.ArrayType(ir.FloatType(), 128))
        return builder.bitcast(lanes, ir.PointerType(ir.FloatType()))
    return sig, codegen


@njit(inline="always")
def _lanes():
    """128 float32 accumulator lanes that live in registers (see ``_stack_lanes``)."""
    return carray(_stack_lanes(), (128,))


# ---- unpacking: GGUF blocks -> one signed byte per weight + float32 scales, exactly -----------
# Sub-byte formats (5-, 4- and 6-bit weights) cost several integer instructions per weight to
# unpack, so unpacking them inside the matvec would make decoding, not reading memory, the
# bottleneck. Every GGUF block type is unpacked once, when first used, to ``q`` int8
# ``[rows, n]`` and, per group of G weights, ``scale`` (and for the k-quants with a min,
# ``shift``) float32 ``[rows, n / G]`` such that ``w = scale * q - shift`` is bit for bit the
# float32 weight of ``gguf.quants.dequantize`` (the same float32 operations in the same
# order), a tile of rows at a time, then laid out in panels (see ``to_panels``). No fastmath.
#
# These, the decoders below and ``masked_softmax`` are serial: they run in a prefill, beside
# BLAS's threads, which spin for a while after each matrix product; a parallel region would
# wait for a core (a softmax took 8 ms instead of 2). Only the decode kernels are parallel.

@njit(inline="always")
def _k_scale_min(data, r, o, i):
    """6-bit scale and min of sub-block ``i`` of a Q4_K/Q5_K super-block at byte ``o``."""
    s = o + 4  # 12 bytes: 4 of scales, 4 of mins (low 6 bits), 4 packed high parts
    if i < 4:
        return np.int32(data[r, s + i] & 63), np.int32(data[r, s + 4 + i] & 63)
    sc = (data[r, s + 4 + i] & 15) | ((data[r, s + i - 4] >> 2) & 0x30)
    mn = (data[r, s + 4 + i] >> 4) | ((data[r, s + i] >> 2) & 0x30)
    return np.int32(sc), np.int32(mn)


@njit(**JIT)
def unpack_q8_0(data, q, scale, shift):
    """Q8_0: ``w = d * q``; already one byte per weight, only split from its scales."""
    q8 = data.view(np.int8)
    for r in range(data.shape[0]):
        for b in range(data.shape[1] // 34):
            o = 34 * b
            scale[r, b] = _half(data[r, o], data[r, o + 1])
            for j in range(32):
                q[r, 32 * b + j] = q8[r, o + 2 + j]


@njit(**JIT)
def unpack_q5_0(data, q, scale, shift):
    """Q5_0: ``w = d * (q - 16)``; q's low 4 bits in nibbles, the 5th in a 32-bit mask."""
    for r in range(data.shape[0]):
        for b in range(data.shape[1] // 22):
            o = 22 * b
            scale[r, b] = _half(data[r, o], data[r, o + 1])
            qh = (np.uint32(data[r, o + 2]) | (np.uint32(data[r, o + 3]) << 8)
                  | (np.uint32(data[r, o + 4]) << 16) | (np.uint32(data[r, o + 5]) << 24))
            for j in range(16):
                lo = np.int32(data[r, o + 6 + j] & 15) | np.int32(((qh >> j) & 1) << 4)
                hi = np.int32(data[r, o + 6 + j] >> 4) | np.int32(((qh >> (j + 16)) & 1) << 4)
                q[r, 32 * b + j] = lo - 16
                q[r, 32 * b + 16 + j] = hi - 16


@njit(**JIT)
def unpack_q4_0(data, q, scale, shift):
    """Q4_0: ``w = d * (q - 8)``; weights j and j + 16 share a byte."""
    for r in range(data.shape[0]):
        for b in range(data.shape[1] // 18):
            o = 18 * b
            scale[r, b] = _half(data[r, o], data[r, o + 1])
            for j in range(16):
                q[r, 32 * b + j] = np.int32(data[r, o + 2 + j] & 15) - 8
                q[r, 32 * b + 16 + j] = np.int32(data[r, o + 2 + j] >> 4) - 8


@njit(**JIT)
def unpack_q4_k(data, q, scale, shift):
    """Q4_K: ``w = (d * sc) * q - dmin * m`` per sub-block of 32; nibbles, low then high."""
    for r in range(data.shape[0]):
        for b in range(data.shape[1] // 144):
            o = 144 * b
            d, dmin = _half(data[r, o], data[r, o + 1]), _half(data[r, o + 2], data[r, o + 3])
            for i in range(8):  # sub-block i: low nibbles for even i, high for odd i
                sc, mn = _k_scale_min(data, r, o, i)
                scale[r, 8 * b + i], shift[r, 8 * b + i] = d * f32(sc), dmin * f32(mn)
                qs = o + 16 + 32 * (i // 2)
                for j in range(32):
                    q[r, 256 * b + 32 * i + j] = (data[r, qs + j] >> (4 * (i % 2))) & 15


@njit(**JIT)
def unpack_q5_k(data, q, scale, shift):
    """Q5_K: as Q4_K with a 5th bit per weight from 32 bytes of high bits."""
    for r in range(data.shape[0]):
        for b in range(data.shape[1] // 176):
            o = 176 * b
            d, dmin = _half(data[r, o], data[r, o + 1]), _half(data[r, o + 2], data[r, o + 3])
            for i in range(8):
                sc, mn = _k_scale_min(data, r, o, i)
                scale[r, 8 * b + i], shift[r, 8 * b + i] = d * f32(sc), dmin * f32(mn)
                qs = o + 48 + 32 * (i // 2)
                for j in range(32):
                    q[r, 256 * b + 32 * i + j] = ((np.int32(data[r, qs + j] >> (4 * (i % 2))) & 15)
                                                  | (np.int32((data[r, o + 16 + j] >> i) & 1) << 4))


@njit(**JIT)
def unpack_q6_k(data, q, scale, shift):
    """Q6_K: ``w = (d * scale) * (q - 32)`` per group of 16; 4 low bits + 2 high bits."""
    sc8 = data.view(np.int8)
    for r in range(data.shape[0]):
        for b in range(data.shape[1] // 210):
            o = 210 * b
            d = _half(data[r, o + 208], data[r, o + 209])
            for g in range(16):
                scale[r, 16 * b + g] = d * f32(sc8[r, o + 192 + g])
            for h in range(2):  # two halves of 128 weights
                for s in range(4):  # four runs of 32: low/high nibbles of two 32-byte rows
                    for j in range(32):
                        lo = (data[r, o + 64 * h + 32 * (s % 2) + j] >> (4 * (s // 2))) & 15
                        hi = (data[r, o + 128 + 32 * h + j] >> (2 * s)) & 3
                        q[r, 256 * b + 128 * h + 32 * s + j] = np.int32(lo | (hi << 4)) - 32


# ---- exact decoders to float32 (prefill tiles; the NumPy twin is gguf.quants.dequantize) -----
# Each writes rows [r0, r1) of the matrix as float32 ``[r1 - r0, n]``. No fastmath.

@njit(**JIT)
def decode_stored(w, r0, r1, out):
    """bf16 (uint16 bits), float16 (int16 bits) or float32, as stored."""
    for r in range(r0, r1):
        for j in range(w.shape[1]):
            out[r - r0, j] = _as_f32(w[r, j])


@njit(**JIT)
def quantize_int8_g32(w, q, scale):
    """Rows of float32 ``w`` -> int8 ``q`` and scales per group of 32 (``quantize="int8"``).

    ``scale = max|w| / 127`` over the group, ``q = round(w / scale)``: the Q8_0 scheme with a
    float32 scale; afterwards the model computes with exactly ``scale * q``.
    """
    for i in range(w.shape[0]):
        for g in range(w.shape[1] // 32):
            m = f32(0)
            for j in range(32 * g, 32 * g + 32):
                m = max(m, abs(w[i, j]))
            s = m / f32(127)
            scale[i, g] = s
            inv = f32(1) / s if s > 0 else f32(0)
            for j in range(32 * g, 32 * g + 32):
                q[i, j] = np.int8(np.rint(w[i, j] * inv))


# ---- panels: the layout the int8 matvec reads -----------------------------------------------
# A decoded token multiplies each weight once, and on 2 cores the multiply costs as much as
# the memory read, so the instructions per weight decide the speed. With rows stored one after
# another, 16 weights of a row take four SIMD instructions (widen int8 to int32, convert to
# float, times the scale, multiply-add with x), and each row ends with a sum across lanes.
# A panel stores 16 rows side by side, column by column: ``q[p, c, l]`` is row ``16 p + l``,
# column ``c``. One SIMD load then holds a column's weights for 16 rows, to multiply by a
# single x value into 16 row sums: three instructions per 16 weights (widen, convert,
# multiply-add with x broadcast), the scale applied once per group of G columns, no sum across
# lanes. The kernel sums four groups at once (independent chains keep both multiply-add units
# busy), so inside each span of four groups the columns are stored in the order the loop reads
# them, column ``G k + j`` of the span at ``4 j + k``: the matvec reads memory front to back.
# Scales that are float16 in the file (Q8_0, Q5_0, Q4_0) stay float16 (int16 bits), 2 bytes.
# Q4_K's values, 0 to 15, are stored two a byte (``_q_at``): the same loop, a shift and a mask
# more per byte, half the bytes (0.75 bytes a weight with the scales, against 1.25 as int8).
# Measured on the demo's LM head (Q8_0, 2 threads): 5.8 ms against 6.4 ms for the row-major
# kernel, and 11.7 -> 6.3 ms on one thread (docs/performance.md).

PANEL = 16  # rows per panel: a SIMD register of float32 (AVX-512), or two (AVX2)


@njit(inline="always")
def _group_at(b, G, nb):
    """Where group ``b`` of a panel's ``nb`` groups of ``G`` columns is stored: its column
    ``G b + j`` at ``start + step * j``."""
    if b >= nb // 4 * 4:  # the groups after the last whole span of four: in order
        return G * b, 1
    return G * (b - b % 4) + b % 4, 4


@njit(**JIT)
def to_panels(q, scale, shift, has_shift, r0, qp, sp, hp):
    """Rows ``r0 + i`` of unpacked ``q [rows, n]``, ``scale``, ``shift [rows, n / G]`` into
    panels ``qp [P, n, 16]`` (int8; or uint8 ``[P, n / 2, 16]``, zeroed, for 4-bit ``q``),
    ``sp``, ``hp [P, n / G, 16]`` (``r0`` a multiple of 16)."""
    n, nb = q.shape[1], scale.shape[1]
    G = n // nb
    for i in range(q.shape[0]):
        p, lane = (r0 + i) // PANEL, (r0 + i) % PANEL
        for b in range(nb):
            start, step = _group_at(b, G, nb)
            for j in range(G):
                _q_put(qp, p, start + step * j, lane, q[i, G * b + j])
            sp[p, b, lane] = scale[i, b]
            if has_shift:
                hp[p, b, lane] = shift[i, b]


@njit(**JIT)
def decode_panels(qp, sp, hp, has_shift, r0, r1, out):
    """Rows ``[r0, r1)`` as float32: ``w = scale * q - shift``, bit for bit the unpacked weights."""
    n, nb = out.shape[1], sp.shape[1]
    G = n // nb
    for r in range(r0, r1):
        p, lane = r // PANEL, r % PANEL
        for b in range(nb):
            start, step = _group_at(b, G, nb)
            s = _as_f32(sp[p, b, lane])
            m = hp[p, b, lane] if has_shift else f32(0)
            for j in range(G):
                out[r - r0, G * b + j] = s * _q_at(qp, p, start + step * j, lane) - m


@njit(inline="always", fastmath=FAST)
def _panel_dot(qp, sp, hp, has_shift, xs, x, t, p, G, acc):
    """``acc[64:80]`` = the 16 rows of panel ``p`` times ``x[t]``; ``acc[:64]`` are four
    groups' partial sums. ``G`` is a constant at each call, so the loops vectorise fully."""
    nb = sp.shape[1]
    acc[64:80] = 0
    b = 0
    while b + 4 <= nb:
        acc[:64] = 0
        o = G * b
        for j in range(G):
            x0, x1, x2, x3 = x[t, o + j], x[t, o + G + j], x[t, o + 2 * G + j], x[t, o + 3 * G + j]
            c = o + 4 * j  # the four columns o + j, o + G + j, ... stored side by side
            for lane in range(PANEL):
                acc[lane] += _q_at(qp, p, c, lane) * x0
                acc[16 + lane] += _q_at(qp, p, c + 1, lane) * x1
                acc[32 + lane] += _q_at(qp, p, c + 2, lane) * x2
                acc[48 + lane] += _q_at(qp, p, c + 3, lane) * x3
        for lane in range(PANEL):
            acc[64 + lane] += ((_as_f32(sp[p, b, lane]) * acc[lane]
                                + _as_f32(sp[p, b + 1, lane]) * acc[16 + lane])
                               + (_as_f32(sp[p, b + 2, lane]) * acc[32 + lane]
                                  + _as_f32(sp[p, b + 3, lane]) * acc[48 + lane]))
            if has_shift:  # sum_j (s q_j - m) x_j = s sum_j q_j x_j - m sum_j x_j
                acc[64 + lane] -= ((hp[p, b, lane] * xs[t, b] + hp[p, b + 1, lane] * xs[t, b + 1])
                                   + (hp[p, b + 2, lane] * xs[t, b + 2]
                                      + hp[p, b + 3, lane] * xs[t, b + 3]))
        b += 4
    while b < nb:  # groups after the last span of four
        acc[:16] = 0
        for j in range(G * b, G * b + G):
            for lane in range(PANEL):
                acc[lane] += _q_at(qp, p, j, lane) * x[t, j]
        for lane in range(PANEL):
            acc[64 + lane] += _as_f32(sp[p, b, lane]) * acc[lane]
            if has_shift:
                acc[64 + lane] -= hp[p, b, lane] * xs[t, b]
        b += 1


@njit(parallel=True, fastmath=FAST, **JIT)
def matvec_panels(qp, sp, hp, has_shift, x, y):
    """``y[t] = W x[t]`` for W in panels (``w = scale * q - shift``, groups of 32 or 16);
    parallel over panels, float32 sums."""
    P, n = qp.shape[0], x.shape[1]
    nb, T, R = sp.shape[1], x.shape[0], y.shape[1]
    G = n // nb
    xs = np.empty((T, nb), np.float32)  # x summed per group, for the shifts (np.zeros would
    if has_shift:                       # be one more parallel region: a thread launch)
        for t in range(T):
            for b in range(nb):
                total = f32(0)
                for j in range(G * b, G * b + G):
                    total += x[t, j]
                xs[t, b] = total
    for p in prange(P):
        acc = _lanes()
        for t in range(T):
            if G == 32:
                _panel_dot(qp, sp, hp, has_shift, xs, x, t, p, 32, acc)
            else:
                _panel_dot(qp, sp, hp, has_shift, xs, x, t, p, 16, acc)
            for lane in range(min(PANEL, R - PANEL * p)):  # the last panel may be part padding
                y[t, PANEL * p + lane] = acc[64 + lane]


# ---- matvec over 16- and 32-bit floats, read as stored (memory-mapped) -------------------------
@njit(parallel=True, fastmath=FAST, **JIT)
def matvec_stored(w, x, y):
    """bf16 (uint16 bits: ``w = bits << 16`` read as float32), float16 (int16 bits) or float32,
    decoded in registers; parallel over chunks of rows."""
    R, n, T = w.shape[0], w.shape[1], x.shape[0]
    nc = max(1, min(64, R // 32))
    for c in prange(nc):
        for r in range(c * R // nc, (c + 1) * R // nc):
            for t in range(T):
                s = f32(0)
                for j in range(n):
                    s += _as_f32(w[r, j]) * x[t, j]
                y[t, r] = s


# Read as stored (matvec_stored, decode_stored): kind -> the type its values are viewed as.
STORED = {"bf16": np.uint16, "f16": np.int16, "f32": np.float32}


class Unpacking(NamedTuple):
    unpack: object  # unpack_*: stored blocks -> int8 q, scale, shift per group, row-major
    group: int  # weights per scale
    shift: bool  # w = scale * q - shift (the k-quants' minimums), else w = scale * q
    f16_scale: bool  # the scales are float16 as stored: keep them so (2 bytes instead of 4)
    nibbles: bool  # q in [0, 16): two per byte in the panels


# Unpacked once into panels, by kind.
UNPACKED = {"Q8_0": Unpacking(unpack_q8_0, 32, False, True, False),
            "Q5_0": Unpacking(unpack_q5_0, 32, False, True, False),
            "Q4_0": Unpacking(unpack_q4_0, 32, False, True, False),
            "Q4_K": Unpacking(unpack_q4_k, 32, True, False, True),
            "Q5_K": Unpacking(unpack_q5_k, 32, True, False, False),
            "Q6_K": Unpacking(unpack_q6_k, 16, False, False, False)}
FORMATS = sorted(STORED) + sorted(UNPACKED)


class Packed:
    """One weight matrix ``[rows, cols]`` in the form the kernels read.

    bf16, float16 and float32 are read as stored (``data``). GGUF blocks, and bf16/f16/f32
    with ``quantize="int8"``, become panels (see ``to_panels``): ``q`` int8 ``[P, cols, 16]``
    (uint8 ``[P, cols / 2, 16]``, two weights a byte, for Q4_K), ``scale`` (float16 bits as
    int16 for Q8_0/Q5_0/Q4_0, else float32) and, for Q4_K/Q5_K, ``shift``
    ``[P, cols / G, 16]``, where ``P = ceil(rows / 16)``.
    ``matvec(x, y)``: ``y[T, rows] = x[T, cols] W^T``; ``decode(r0, r1, out)``: rows
    ``[r0, r1)`` of W in float32, bit for bit the reference path's weights.
    """

    def __init__(self, tensor, quantize: str | None = None):
        kind = getattr(tensor, "kind", "f32")
        self.kind, self.shape = kind, tuple(tensor.shape)
        rows, cols = self.shape
        data = stored_bytes(tensor)
        if quantize == "int8" and kind in ("bf16", "f16", "f32") and cols % 32 == 0:
            self.kind = "int8"
            w, tile = data.view(STORED[kind]), np.empty((min(rows, self._step()), cols), np.float32)

            def fill(r0, r1, q, scale, shift):  # float32 rows, rounded to int8 per group of 32
                decode_stored(w, r0, r1, tile[: r1 - r0])
                quantize_int8_g32(tile[: r1 - r0], q, scale)
            self._panels(data, fill, Unpacking(unpack=None, group=32, shift=False,
                                               f16_scale=False, nibbles=False))
        elif kind in STORED:
            self.data = data.view(STORED[kind])
        elif kind in UNPACKED:
            how = UNPACKED[kind]
            self._panels(data, lambda r0, r1, q, scale, shift: how.unpack(data[r0:r1], q, scale,
                                                                          shift), how)
        else:
            raise ValueError(f"no fast kernel for weights of type {kind}; load with fast=False")

    def _step(self) -> int:
        """Rows unpacked at a time: a multiple of 16, about ``TILE_ELEMS`` weights."""
        return max(PANEL, TILE_ELEMS // self.shape[1] // PANEL * PANEL)

    def _panels(self, data, fill, how: Unpacking) -> None:
        """Panels from ``fill(r0, r1, q, scale, shift)``, which writes rows ``[r0, r1)``
        unpacked (row-major, float32 scales), a tile of rows at a time. The stored rows are
        read once: each tile's pages of a memory-mapped file then leave this process's RSS
        (the embedding lookup reads its few rows from the file again)."""
        rows, cols = self.shape
        P, ng = -(-rows // PANEL), cols // how.group
        has_shift, f16_scale = how.shift, how.f16_scale
        self.has_shift = has_shift
        if how.nibbles:  # zeroed: to_panels ORs the nibbles in
            self.q = np.zeros((P, cols // 2, PANEL), np.uint8)
        else:
            self.q = np.empty((P, cols, PANEL), np.int8)
        self.scale = np.empty((P, ng, PANEL), np.int16 if f16_scale else np.float32)
        self.shift = np.empty((P, ng, PANEL) if has_shift else (1, 1, 1), np.float32)
        for a in (self.q, self.scale, self.shift):
            a[-1] = 0  # the last panel's rows past the matrix: weight 0
        step = min(rows, self._step())
        q = np.empty((step, cols), np.int8)
        scale = np.empty((step, ng), np.float32)
        shift = np.empty((step, ng if has_shift else 1), np.float32)
        for r0 in range(0, rows, step):
            n = min(rows, r0 + step) - r0
            fill(r0, r0 + n, q[:n], scale[:n], shift[:n])
            s = scale[:n].astype(np.float16).view(np.int16) if f16_scale else scale[:n]  # exact
            to_panels(q[:n], s, shift[:n], has_shift, r0, self.q, self.scale, self.shift)
            release_pages(data[r0:r0 + n])

    @classmethod
    def stacked(cls, parts: list[Packed]) -> Packed | None:
        """Matrices of one input (q, k, v; gate, up) stacked into one, so that a single matvec
        reads them all. Each part's arrays are rebound to views of its rows of the stack, so
        that the panels are not kept twice. None (and the parts left alone) unless all are
        panels alike (columns, groups, value and scale types, shift) and all but the last
        have whole panels (rows a multiple of 16)."""
        first = parts[0]
        if any(p.kind in STORED or p.shape[1] != first.shape[1] or p.q.dtype != first.q.dtype
               or p.scale.shape[1] != first.scale.shape[1] or p.scale.dtype != first.scale.dtype
               or p.has_shift != first.has_shift for p in parts):
            return None
        if any(p.shape[0] % PANEL for p in parts[:-1]):
            return None
        stack = cls.__new__(cls)
        stack.kind = "+".join(sorted({p.kind for p in parts}))
        stack.shape = (sum(p.shape[0] for p in parts), first.shape[1])
        stack.has_shift = first.has_shift
        stack.q = np.concatenate([p.q for p in parts])
        stack.scale = np.concatenate([p.scale for p in parts])
        stack.shift = np.concatenate([p.shift for p in parts]) if first.has_shift else first.shift
        p0 = 0
        for p in parts:  # each part: a view of its panels in the stack
            p1 = p0 + p.q.shape[0]
            p.q, p.scale = stack.q[p0:p1], stack.scale[p0:p1]
            if p.has_shift:
                p.shift = stack.shift[p0:p1]
            p0 = p1
        return stack

    @property
    def nbytes(self) -> int:
        if self.kind in STORED:
            return self.data.nbytes
        return self.q.nbytes + self.scale.nbytes + (self.shift.nbytes if self.has_shift else 0)

    def matvec(self, x: np.ndarray, y: np.ndarray) -> None:
        if self.kind in STORED:
            matvec_stored(self.data, x, y)
        else:
            matvec_panels(self.q, self.scale, self.shift, self.has_shift, x, y)

    def decode(self, r0: int, r1: int, out: np.ndarray) -> None:
        if self.kind in STORED:
            decode_stored(self.data, r0, r1, out)
        else:
            decode_panels(self.q, self.scale, self.shift, self.has_shift, r0, r1, out)


def release_pages(a: np.ndarray) -> bool:
    """Drop the pages of a memory-mapped array from this process (MADV_DONTNEED; Linux).

    The file stays in the page cache, so nothing is lost; the process's RSS no longer counts
    them. Returns whether it did; arrays not backed by a memory map are left alone."""
    import mmap
    base = a
    while base is not None and not isinstance(base, mmap.mmap):
        if isinstance(base, memoryview):  # np.frombuffer(an mmap), as the GGUF reader maps
            base = base.obj
        else:  # np.memmap (safetensors), or a view of one
            base = getattr(base, "_mmap", None) or getattr(base, "base", None)
    if base is None or not hasattr(base, "madvise") or not hasattr(mmap, "MADV_DONTNEED"):
        return False
    start = a.__array_interface__["data"][0]
    try:
        begin = np.frombuffer(base, np.uint8, count=1).__array_interface__["data"][0]
        page = mmap.PAGESIZE
        lo = (start - begin + page - 1) // page * page  # whole pages inside the array only
        hi = (start - begin + a.nbytes) // page * page
        if hi > lo:
            base.madvise(mmap.MADV_DONTNEED, lo, hi - lo)
        return True
    except (ValueError, OSError, TypeError):
        return False


def stored_bytes(tensor) -> np.ndarray:
    """A compact tensor's storage as C-contiguous uint8 ``[rows, bytes per row]`` (no copy
    for memory-mapped checkpoints)."""
    data = np.asarray(tensor.data)
    if data.ndim == 1:
        data = data.reshape(tensor.shape[0], -1)
    data = np.ascontiguousarray(data)
    return data.view(np.uint8).reshape(data.shape[0], -1)


# ---- attention over the KV cache -------------------------------------------------------------
@njit(inline="always", fastmath=FAST)
def _exp_span(x, lo, hi, scale, cap):
    """In place: ``x[lo:hi] = exp(x[lo:hi] * scale - m)`` with ``m`` their max, soft-capped
    first when ``cap`` > 0 (Gemma 2), and 0 outside ``[lo, hi)`` (the keys a query may not
    see). Returns ``m`` and the sum, so that the softmax is ``x / sum``; an empty span gives
    ``-inf, 0``.

    The loops run over the slice from index 0: with ``range(lo, hi)`` Numba must handle a
    negative index at every element, and the loops did not vectorise (10x slower)."""
    seen = x[lo:max(lo, hi)]
    if cap > 0:
        for s in range(seen.shape[0]):
            seen[s] = f32(cap) * np.tanh(seen[s] * f32(scale) / f32(cap))
    else:
        for s in range(seen.shape[0]):
            seen[s] = seen[s] * f32(scale)
    m = f32(-np.inf)
    for s in range(seen.shape[0]):
        m = max(m, seen[s])
    total = f32(0)
    for s in range(seen.shape[0]):
        seen[s] = _exp(seen[s] - m)
        total += seen[s]
    x[:lo] = 0
    x[max(lo, hi):] = 0
    return m, total


@njit(parallel=True, fastmath=FAST, **JIT)
def attend_cache(q, k, v, pos0, first, window, scale, cap, threads, out):
    """``softmax(q k^T * scale) v`` for queries at positions ``pos0 + t`` over cached keys.

    q ``[H, T, d]``; k, v ``[K, S, d]`` (the whole cache of one layer); out ``[H, T, d]``.
    Query ``t`` sees keys ``first <= s <= pos0 + t`` and, with a ``window`` > 0, only
    ``s > pos0 + t - window``. ``cap`` > 0 soft-caps the scores (Gemma 2). The ``G * T``
    queries of a KV head's group are handled together: each key and value row is read once for
    all of them (multi-query attention reads one KV head for every query head). With fewer KV
    heads than ``threads`` (MQA has one), each head's keys are split in ranges of at least
    ``KEYS_PER_PART``, one per thread, so that each thread reads only its part of the cache;
    each range's softmax sums are then rescaled to the overall max and added (as
    flash-decoding does).
    """
    H, T, d = q.shape
    K = k.shape[0]
    G = H // K
    n = G * T  # a group's queries: i = g * T + t
    S = pos0 + T - first  # keys [first, pos0 + T)
    P = max(1, min(threads // K, S // KEYS_PER_PART))  # key ranges per KV head
    maxes, sums = np.empty((K * P, n), np.float32), np.empty((K * P, n), np.float32)
    parts = np.empty((K * P, n, d), np.float32)  # each range's sum_s exp(.) v_s
    for task in prange(K * P):
        kh, r = task // P, task % P
        s0, s1 = first + r * S // P, first + (r + 1) * S // P  # this range's keys [s0, s1)
        e = np.empty((n, s1 - s0), np.float32)
        for s in range(s0, s1):  # q . k for the group's queries, key row s read once
            key = k[kh, s]
            for i in range(n):
                acc = f32(0)
                for j in range(d):
                    acc += q[kh * G + i // T, i % T, j] * key[j]
                e[i, s - s0] = acc
        for i in range(n):
            p = pos0 + i % T
            lo = first if window <= 0 else max(first, p - window + 1)  # keys [lo, p] are seen
            maxes[task, i], sums[task, i] = _exp_span(e[i], max(lo, s0) - s0, min(p + 1, s1) - s0,
                                                      scale, cap)
        o = parts[task]
        for i in range(n):  # loops, not o[:] = 0 or np.zeros: each would be a parallel region
            for j in range(d):
                o[i, j] = 0
        for s in range(s0, s1):  # exp(.) . v, value row s read once for the group
            val = v[kh, s]
            for i in range(n):
                w = e[i, s - s0]
                if w != 0:
                    for j in range(d):
                        o[i, j] += w * val[j]
    for kh in range(K):
        for i in range(n):
            _merge_ranges(maxes[kh * P:(kh + 1) * P, i], sums[kh * P:(kh + 1) * P, i],
                          parts[kh * P:(kh + 1) * P, i], out[kh * G + i // T, i % T])


@njit(inline="always", fastmath=FAST)
def _merge_ranges(maxes, sums, parts, out):
    """The softmax over all of a query's key ranges: ``out = sum_r c_r parts_r / sum_r c_r
    sums_r`` with ``c_r = exp(max_r - max)``, each range rescaled to the overall max."""
    m = f32(-np.inf)
    for r in range(maxes.shape[0]):
        m = max(m, maxes[r])
    for j in range(out.shape[0]):  # a loop, not out[:] = 0: that would be a parallel region
        out[j] = 0
    total = f32(0)
    for r in range(maxes.shape[0]):
        if sums[r] > 0:  # a range with keys this query sees
            c = _exp(maxes[r] - m)
            total += c * sums[r]
            for j in range(out.shape[0]):
                out[j] += c * parts[r, j]
    for j in range(out.shape[0]):
        out[j] = out[j] / total


@njit(fastmath=FAST, **JIT)
def masked_softmax(scores, T, pos0, first, window, scale, cap):
    """In place: ``softmax(scores * scale)`` over the keys each query may see, 0 elsewhere.

    scores ``[G * T, S]`` = q k^T of the G query heads of one KV head (row ``g * T + t`` is
    query ``t`` at position ``pos0 + t``; column ``s`` the key at ``first + s``). Causal, and
    within ``window`` keys when > 0; ``cap`` > 0 soft-caps (Gemma 2). The prefill twin of the
    masking and softmax in ``layers.attention``.
    """
    for row in range(scores.shape[0]):
        p = pos0 + row % T
        lo = 0 if window <= 0 else max(0, p - window + 1 - first)
        _, total = _exp_span(scores[row], lo, p - first + 1, scale, cap)  # keys [lo, p] are seen
        seen = scores[row, lo:p - first + 1]
        for s in range(seen.shape[0]):
            seen[s] = seen[s] / total


# ---- the elementwise layers (serial: in a prefill they run beside BLAS's threads) ---------
@njit(fastmath=FAST, **JIT)
def rms_norm_rows(x, scale, eps, out):
    """``out = x / sqrt(mean(x^2) + eps) * scale`` per row of x ``[R, N]``; ``scale = 1 + w``.

    ``layers.rms_norm`` in one pass per row instead of seven NumPy operations (10 us each for a
    decoded token's vector)."""
    n = x.shape[1]
    for r in range(x.shape[0]):
        ss = f32(0)
        for j in range(n):
            ss += x[r, j] * x[r, j]
        inv = f32(1) / np.sqrt(ss / f32(n) + f32(eps))
        for j in range(n):
            out[r, j] = x[r, j] * inv * scale[j]


@njit(fastmath=FAST, **JIT)
def rope_rows(x, cos, sin, out):
    """``layers.rope`` in one pass: ``out = x cos + rotate_half(x) sin`` for x ``[N, T, d]``
    and angles ``[T, d]``; dimension ``j`` is paired with ``j + d/2``."""
    half = x.shape[2] // 2
    for h in range(x.shape[0]):
        for t in range(x.shape[1]):
            for j in range(half):
                x1, x2 = x[h, t, j], x[h, t, half + j]
                out[h, t, j] = x1 * cos[t, j] - x2 * sin[t, j]
                out[h, t, half + j] = x2 * cos[t, half + j] + x1 * sin[t, half + j]


@njit(fastmath=FAST, **JIT)
def geglu_rows(gate, up, out):
    """``out = gelu_tanh(gate) * up`` (``layers.geglu``), vectorised.

    ``0.5 (1 + tanh z) = sigmoid(2z)``, so ``gelu_tanh(x) = x sigmoid(2z)`` with
    ``z = sqrt(2/pi) (x + 0.044715 x^3)``; the sigmoid comes from ``e = exp(-2|z|)``, which
    never overflows: ``1 / (1 + e)`` for ``z >= 0``, ``e / (1 + e)`` below."""
    c = f32(np.sqrt(2.0 / np.pi))
    for r in range(gate.shape[0]):
        for j in range(gate.shape[1]):
            x = gate[r, j]
            z = c * (x + f32(0.044715) * x * x * x)
            e = _exp(f32(-2) * abs(z))
            s = (f32(1) if z >= 0 else e) / (f32(1) + e)
            out[r, j] = x * s * up[r, j]


# ---- the fast model ---------------------------------------------------------------------------
_LAUNCHING = threading.Lock()
_local = threading.local()  # per calling thread: the Numba thread count set there
_layer: list[str] = []  # Numba's threading layer, known once a parallel region has run


def launch(threads: int, kernel, *args) -> None:
    """Run a parallel kernel on ``threads`` threads, from any calling thread.

    Numba's thread count is a setting of each calling thread, so it is applied in every thread
    that launches. OpenMP and TBB run parallel regions of several calling threads at once;
    Numba's ``workqueue`` layer (where neither is installed) aborts the process instead, so
    there (and until the first region has told which layer runs) launches take turns.
    """
    if getattr(_local, "threads", None) != threads:
        set_num_threads(min(threads, numba_config.NUMBA_NUM_THREADS))
        _local.threads = threads
    if _layer and _layer[0] != "workqueue":
        kernel(*args)
        return
    with _LAUNCHING:
        kernel(*args)
        if not _layer:
            _layer.append(numba.threading_layer())


def decoded_t(w: Packed) -> np.ndarray:
    """``W^T`` in float32, contiguous ``[in, out]``: BLAS multiplies by it 2-4% faster than by
    a ``W.T`` view (prefill of a small model keeps these)."""
    decoded = np.empty(w.shape, np.float32)  # [out, in]
    w.decode(0, w.shape[0], decoded)
    return np.ascontiguousarray(decoded.T)  # [in, out]


def tune_malloc() -> None:
    """Keep NumPy's temporaries up to 32 MB on the heap (glibc ``mallopt``), once per process.

    The forward pass allocates and frees arrays of a few MB per operation (prefill activations
    ``[T, F]``, logits ``[1, V]``). With glibc's defaults, a prefill that follows decoded
    tokens finds the heap trimmed and faults its pages in again: 135,000 page faults (540 MB
    zeroed by the kernel) and ~25% more time for a 500-token prefill of the demo, measured
    with ``getrusage``. Raising the mmap and trim thresholds keeps that memory for reuse.
    ``TINYGEMMA_MALLOPT=0`` leaves the allocator alone.
    """
    global _MALLOC_TUNED
    if _MALLOC_TUNED or os.environ.get("TINYGEMMA_MALLOPT") == "0":
        return
    _MALLOC_TUNED = True
    try:
        import ctypes
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 32 << 20)  # M_MMAP_THRESHOLD
        libc.mallopt(-1, 128 << 20)  # M_TRIM_THRESHOLD: keep freed memory for reuse
    except (OSError, AttributeError):  # not glibc
        pass


_MALLOC_TUNED = False


class FastGemma(Gemma):
    """:class:`Gemma` with the projections, the cached attention, the norms, RoPE and the
    GeGLU in Numba kernels.

    Weights stay compact: bf16 and float16 are read as stored (memory-mapped), GGUF block
    types are unpacked to int8 panels + scales when first used (:class:`Packed`).
    ``linear``: for up to ``SMALL_T`` tokens a matvec kernel decodes the weights in registers;
    for more (prefill), float32 matrices are multiplied with BLAS: kept decoded when all the
    layers' fit in ``keep_f32_bytes``, else decoded a tile of rows at a time.
    ``projections``: q, k, v (and gate, up) stacked, one matvec for each group.
    ``attend``: a kernel over the cache for up to ``SMALL_T`` queries; for more, the products
    on BLAS around an in-place masked softmax (when probabilities are wanted, the reference
    computes them beside it).
    ``norm``, ``rope``, ``geglu``: one pass each instead of several NumPy operations.
    Kernels for decoded tokens run on all cores (``TINYGEMMA_THREADS`` caps them); in a
    prefill, Numba runs on the calling thread beside BLAS's threads.
    """

    def __init__(self, config, weights, tokenizer=None, quantize: str | None = None,
                 keep_f32_bytes: int = KEEP_F32_BYTES):
        super().__init__(config, weights, tokenizer)
        if quantize not in (None, "int8"):
            raise ValueError(f"quantize must be None or 'int8', got {quantize!r}")
        self.quantize = quantize
        tune_malloc()
        # Built once, when first used, under self._building; read without it (see _once).
        self.packed: dict[str, Packed] = {}
        self._stacks: dict[tuple[str, ...], tuple[Packed | None, np.ndarray]] = {}
        self._norm_scale: dict[str, np.ndarray] = {}
        self._building = threading.RLock()  # a stack builds its parts under it too
        most = numba_config.NUMBA_NUM_THREADS  # one per core unless NUMBA_NUM_THREADS says otherwise
        env = os.environ.get("TINYGEMMA_THREADS", "")  # a cap, as llama.cpp's n_threads
        if env and not env.isdigit():
            raise ValueError(f"TINYGEMMA_THREADS must be a number of threads, got {env!r}")
        self.threads = max(1, min(int(env), most)) if env else most
        # Prefill multiplies by float32 matrices. Decoding them costs ~10% of a prefill, so a
        # small model (all its layers' matrices within keep_f32_bytes in float32: the demo's
        # take 0.4 GB) keeps them decoded; a large one decodes tiles at every prefill instead,
        # so that its memory stays the compact weights.
        f32_bytes = sum(4 * t.shape[0] * t.shape[1] for n, t in weights.tensors.items()
                        if n.startswith("layers.") and len(t.shape) == 2)
        self._f32: dict[str, np.ndarray] | None = {} if f32_bytes <= keep_f32_bytes else None

    def _once(self, store: dict, key, build):
        """``store[key]``, built by ``build()`` the first time, exactly once however many
        threads ask at the same moment (the others wait for it); later reads take no lock."""
        value = store.get(key)
        if value is None:
            with self._building:
                value = store.get(key)
                if value is None:
                    value = store[key] = build()
        return value

    def _packed(self, name: str) -> Packed:
        return self._once(self.packed, name,
                          lambda: Packed(self.weights.tensors[name], self.quantize))

    def _launch(self, kernel, *args):
        """Run a parallel kernel from whichever thread calls (see :func:`launch`)."""
        launch(self.threads, kernel, *args)

    def linear(self, x: np.ndarray, name: str) -> np.ndarray:
        if getattr(self.weights.tensors[name], "kind", "f32") not in FORMATS:
            return super().linear(x, name)  # a type without a kernel (Q3_K, ...): the reference
        w = self._packed(name)
        rows, cols = w.shape
        x = np.ascontiguousarray(x, dtype=np.float32)  # [T, in]
        T = x.shape[0]
        if T <= SMALL_T:
            y = np.empty((T, rows), np.float32)  # [T, out]
            self._launch(w.matvec, x, y)
            return y
        if self._f32 is not None and name.startswith("layers."):
            return x @ self._once(self._f32, name, lambda: decoded_t(w))  # [T, in] @ [in, out]
        step = max(1, min(rows, TILE_ELEMS // cols))  # rows per decoded tile
        tile = np.empty((step, cols), np.float32)  # this call's own: threads may share the model
        if step == rows:  # one tile: the whole matrix
            w.decode(0, rows, tile)
            return x @ tile.T  # [T, in] @ [in, out] on BLAS
        y = np.empty((T, rows), np.float32)  # [T, out]
        for r0 in range(0, rows, step):
            r1 = min(rows, r0 + step)
            w.decode(r0, r1, tile[: r1 - r0])
            y[:, r0:r1] = x @ tile[: r1 - r0].T  # [T, in] @ [in, rows] on BLAS
        return y

    def projections(self, x: np.ndarray, *names: str) -> list[np.ndarray]:
        """For a few tokens, one matvec over the matrices stacked (``Packed.stacked``): q, k, v
        in one pass, gate and up in another. Each matvec costs ~9 us beyond its reads
        (starting the threads, and memory streams); this saves 3 of the 7 a layer."""
        if len(x) > SMALL_T:
            return super().projections(x, *names)
        stack, bounds = self._once(self._stacks, names, lambda: self._stack(names))
        if stack is None:
            return super().projections(x, *names)
        x = np.ascontiguousarray(x, dtype=np.float32)  # [T, in]
        y = np.empty((len(x), stack.shape[0]), np.float32)  # [T, sum of outs]
        self._launch(stack.matvec, x, y)
        return [np.ascontiguousarray(y[:, a:b]) for a, b in zip(bounds[:-1], bounds[1:])]

    def norm(self, x: np.ndarray, name: str) -> np.ndarray:
        scale = self._once(self._norm_scale, name,  # 1 + w, once per weight
                           lambda: f32(1) + self.weights[name].astype(f32))
        x = np.ascontiguousarray(x, dtype=np.float32)  # [..., N]
        out = np.empty_like(x)
        rms_norm_rows(x.reshape(-1, x.shape[-1]), scale, float(self.config.rms_norm_eps),
                      out.reshape(-1, x.shape[-1]))
        return out

    def rope(self, x: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
        x = np.ascontiguousarray(x, dtype=np.float32)  # [N, T, d]
        out = np.empty_like(x)
        rope_rows(x, np.ascontiguousarray(cos, dtype=np.float32),
                  np.ascontiguousarray(sin, dtype=np.float32), out)
        return out

    def geglu(self, gate: np.ndarray, up: np.ndarray) -> np.ndarray:
        out = np.empty(gate.shape, np.float32)  # [T, F]
        geglu_rows(gate, up, out)
        return out

    def _stack(self, names):
        """q, k, v (or gate, up) stacked, and where each part's rows end; no stack (None) when
        a part has no kernel or the parts do not fit one (``Packed.stacked``)."""
        tensors = [self.weights.tensors[n] for n in names]
        kernels = all(getattr(t, "kind", "f32") in FORMATS for t in tensors)
        stack = Packed.stacked([self._packed(n) for n in names]) if kernels else None
        return stack, np.cumsum([0] + [t.shape[0] for t in tensors])

    def _attend_blocks(self, q, k, v, pos0, window, out):
        """Prefill attention: q k^T and p v on BLAS, a block of queries at a time.

        Queries ``[t0, t1)`` see keys up to position ``pos0 + t1 - 1`` and, on local layers,
        none before ``pos0 + t0 - window + 1``: each block multiplies only by those keys
        (about half of a causal square for 500 tokens, a band for long prompts on local
        layers) and ``masked_softmax`` zeroes the rest of its rows.
        """
        c = self.config
        H, T, d = q.shape
        K = c.num_kv_heads
        G = H // K
        scale, cap = float(c.attn_scale), float(c.attn_logit_softcap or 0.0)
        for t0 in range(0, T, QUERY_BLOCK):
            t1 = min(T, t0 + QUERY_BLOCK)
            lo = 0 if not window else max(0, pos0 + t0 - window + 1)  # first key of the block
            hi = pos0 + t1  # keys [lo, hi)
            for kh in range(K):
                qg = q[kh * G:(kh + 1) * G, t0:t1].reshape(G * (t1 - t0), d)  # [G*B, d]
                scores = qg @ k[kh, lo:hi].T  # [G*B, S_b]
                masked_softmax(scores, t1 - t0, pos0 + t0, lo, window, scale, cap)
                pv = scores @ v[kh, lo:hi]  # [G*B, d]
                out[kh * G:(kh + 1) * G, t0:t1] = pv.reshape(G, t1 - t0, d)

    def attend(self, q, cache: KVCache, i: int, positions, want_probs: bool):
        """The kernels' output always, so that a traced or stepped pass computes what
        ``forward`` does; the probabilities, when wanted, from the reference."""
        T = q.shape[1]
        probs = super().attend(q, cache, i, positions, True)[1] if want_probs else None
        c = self.config
        window = c.window(i) or 0
        pos0 = int(positions[0])
        first = 0 if not window else max(0, pos0 - window + 1)
        out = np.empty(q.shape, np.float32)  # [H, T, d]
        if T > SMALL_T:
            self._attend_blocks(q, cache.k[i], cache.v[i], pos0, window, out)
            return out, probs
        self._launch(attend_cache, np.ascontiguousarray(q, dtype=np.float32), cache.k[i],
                     cache.v[i], pos0, first, window, float(c.attn_scale),
                     float(c.attn_logit_softcap or 0.0), self.threads, out)
        return out, probs


__all__ = ["FastGemma", "FORMATS", "Packed", "attend_cache", "stored_bytes"]
