"""The fast path: Numba kernels over compact weights, switched in by :class:`FastGemma`.

The reference path (``layers.py``, ``model.py``) decodes every weight matrix to float32 and
multiplies with NumPy. Decoding one token is a matrix-vector product per projection, and a
matrix-vector product reads every weight once: its speed is the speed at which the weights can
be read (and, for quantised blocks, decoded). So the kernels here read the weights as they are
stored -- bf16 as uint16, GGUF blocks (Q8_0, Q5_0, Q4_K, Q6_K, ...) byte for byte -- and decode
them in registers, inside the dot product:

* ``matvec_*``: ``y[t] = W x[t]`` for a few tokens ``t`` (decode), parallel over output rows
  (``prange``), float32 accumulation. Each decodes a block exactly as ``gguf.quants`` does, so it
  multiplies by exactly the weights the reference path uses; only the order of the additions
  differs (``fastmath`` reassociation, which lets LLVM vectorise the sums).
* ``decode_*``: rows of a compact matrix to float32, bit for bit the values of
  ``gguf.quants.dequantize`` (no fastmath). Prefill multiplies many tokens at once, so there the
  weights are decoded a tile of rows at a time and multiplied with BLAS (``x @ tile.T``).
* ``attend_cache``: attention of a few new queries over the KV cache, multi-query aware: the
  keys and values of a shared KV head are read once for all the query heads of its group.

:class:`FastGemma` overrides only :meth:`Gemma.linear` and :meth:`Gemma.attend`; the forward
pass itself stays the readable one in ``model.py``. Every kernel is tested equal to its NumPy
twin (``tests/test_kernels.py``).

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
import time

import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.extending import intrinsic

from .model import Gemma, KVCache

# Reassociation lets LLVM split a sum over SIMD lanes; it changes only the order of float32
# additions (results move by rounding, far inside the test tolerance). No 'nnan'/'ninf': the
# attention mask uses -inf.
FAST = {"reassoc", "contract", "nsz", "arcp"}
JIT = dict(cache=True, nogil=True)
f32 = np.float32

SMALL_T = 4  # up to this many tokens, the matvec kernels; beyond, decoded tiles and BLAS
TILE_ELEMS = 1 << 21  # float32 elements in one decoded tile (8 MB): fits the L3 cache
PARALLEL_MIN = 1 << 18  # weights (x tokens) below which a matvec runs on one thread


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


# ---- exact decoders: one block row -> float32 (the NumPy twin is gguf.quants.dequantize) -----
# Each takes the rows [r0, r1) of the stored matrix (uint8 [rows, bytes per row]) and writes
# float32 [r1 - r0, n]. Parallel over rows, no fastmath: bit for bit gguf.quants.

@njit(parallel=True, **JIT)
def decode_q8_0(data, r0, r1, out):
    nb = data.shape[1] // 34
    q = data.view(np.int8)
    for r in prange(r0, r1):
        for b in range(nb):
            o = 34 * b
            d = _half(data[r, o], data[r, o + 1])
            for j in range(32):
                out[r - r0, 32 * b + j] = d * f32(q[r, o + 2 + j])


@njit(parallel=True, **JIT)
def decode_q5_0(data, r0, r1, out):
    nb = data.shape[1] // 22
    for r in prange(r0, r1):
        for b in range(nb):
            o = 22 * b
            d = _half(data[r, o], data[r, o + 1])
            qh = (np.uint32(data[r, o + 2]) | (np.uint32(data[r, o + 3]) << 8)
                  | (np.uint32(data[r, o + 4]) << 16) | (np.uint32(data[r, o + 5]) << 24))
            for j in range(16):
                lo = np.int32(data[r, o + 6 + j] & 15) | np.int32(((qh >> j) & 1) << 4)
                hi = np.int32(data[r, o + 6 + j] >> 4) | np.int32(((qh >> (j + 16)) & 1) << 4)
                out[r - r0, 32 * b + j] = d * f32(lo - 16)
                out[r - r0, 32 * b + 16 + j] = d * f32(hi - 16)


@njit(parallel=True, **JIT)
def decode_q4_0(data, r0, r1, out):
    nb = data.shape[1] // 18
    for r in prange(r0, r1):
        for b in range(nb):
            o = 18 * b
            d = _half(data[r, o], data[r, o + 1])
            for j in range(16):
                out[r - r0, 32 * b + j] = d * f32(np.int32(data[r, o + 2 + j] & 15) - 8)
                out[r - r0, 32 * b + 16 + j] = d * f32(np.int32(data[r, o + 2 + j] >> 4) - 8)


@njit(inline="always")
def _k_scale_min(data, r, o, i):
    """6-bit scale and min of sub-block ``i`` of a Q4_K/Q5_K super-block at byte ``o``."""
    s = o + 4  # 12 bytes: 4 of scales, 4 of mins (low 6 bits), 4 packed high parts
    if i < 4:
        return np.int32(data[r, s + i] & 63), np.int32(data[r, s + 4 + i] & 63)
    sc = (data[r, s + 4 + i] & 15) | ((data[r, s + i - 4] >> 2) & 0x30)
    mn = (data[r, s + 4 + i] >> 4) | ((data[r, s + i] >> 2) & 0x30)
    return np.int32(sc), np.int32(mn)


@njit(parallel=True, **JIT)
def decode_q4_k(data, r0, r1, out):
    nb = data.shape[1] // 144
    for r in prange(r0, r1):
        for b in range(nb):
            o = 144 * b
            d, dmin = _half(data[r, o], data[r, o + 1]), _half(data[r, o + 2], data[r, o + 3])
            for i in range(8):  # sub-block i: nibbles (low for even i, high for odd i)
                sc, mn = _k_scale_min(data, r, o, i)
                scale, shift = d * f32(sc), dmin * f32(mn)
                qs = o + 16 + 32 * (i // 2)
                for j in range(32):
                    q = (data[r, qs + j] >> (4 * (i % 2))) & 15
                    out[r - r0, 256 * b + 32 * i + j] = scale * f32(q) - shift


@njit(parallel=True, **JIT)
def decode_q5_k(data, r0, r1, out):
    nb = data.shape[1] // 176
    for r in prange(r0, r1):
        for b in range(nb):
            o = 176 * b
            d, dmin = _half(data[r, o], data[r, o + 1]), _half(data[r, o + 2], data[r, o + 3])
            for i in range(8):
                sc, mn = _k_scale_min(data, r, o, i)
                scale, shift = d * f32(sc), dmin * f32(mn)
                qs = o + 48 + 32 * (i // 2)
                for j in range(32):
                    q = (np.int32(data[r, qs + j] >> (4 * (i % 2))) & 15) \
                        | (np.int32((data[r, o + 16 + j] >> i) & 1) << 4)
                    out[r - r0, 256 * b + 32 * i + j] = scale * f32(q) - shift


@njit(parallel=True, **JIT)
def decode_q6_k(data, r0, r1, out):
    nb = data.shape[1] // 210
    sc8 = data.view(np.int8)
    for r in prange(r0, r1):
        for b in range(nb):
            o = 210 * b
            d = _half(data[r, o + 208], data[r, o + 209])
            for h in range(2):  # two halves of 128 weights
                for s in range(4):  # four runs of 32: low/high nibbles of two 32-byte rows
                    for j in range(32):
                        lo = (data[r, o + 64 * h + 32 * (s % 2) + j] >> (4 * (s // 2))) & 15
                        hi = (data[r, o + 128 + 32 * h + j] >> (2 * s)) & 3
                        q = np.int32(lo | (hi << 4)) - 32
                        k = 128 * h + 32 * s + j  # weight index in the super-block
                        scale = d * f32(sc8[r, o + 192 + k // 16])
                        out[r - r0, 256 * b + k] = scale * f32(q)


@njit(parallel=True, **JIT)
def decode_bf16(data, r0, r1, out):
    w = data.view(np.uint16)
    for r in prange(r0, r1):
        for j in range(w.shape[1]):
            out[r - r0, j] = _bf16(w[r, j])


@njit(parallel=True, **JIT)
def decode_f16(data, r0, r1, out):
    w = data.view(np.uint16)
    for r in prange(r0, r1):
        for j in range(w.shape[1]):
            out[r - r0, j] = _half16(w[r, j])


@njit(parallel=True, **JIT)
def decode_f32(data, r0, r1, out):
    w = data.view(np.float32)
    for r in prange(r0, r1):
        for j in range(w.shape[1]):
            out[r - r0, j] = w[r, j]


# ---- matvec: y[t, r] = sum_j W[r, j] x[t, j], decoding W in registers ------------------------
# Parallel over chunks of output rows; each chunk keeps a small float32 accumulator whose lanes
# take independent partial sums (LLVM turns each update into one SIMD instruction).

def _chunks(rows: int) -> int:
    return max(1, min(64, rows // 32))


@njit(parallel=True, fastmath=FAST, **JIT)
def matvec_q8_0(data, x, y):
    R, nb, T = data.shape[0], data.shape[1] // 34, x.shape[0]
    q = data.view(np.int8)
    nc = max(1, min(64, R // 32))
    for c in prange(nc):
        acc = np.empty(128, np.float32)
        for r in range(c * R // nc, (c + 1) * R // nc):
            for t in range(T):
                acc[:] = 0
                b = 0
                while b + 4 <= nb:  # four blocks at a time: four independent chains
                    o = 34 * b
                    d0, d1 = _half(data[r, o], data[r, o + 1]), _half(data[r, o + 34], data[r, o + 35])
                    d2, d3 = _half(data[r, o + 68], data[r, o + 69]), _half(data[r, o + 102], data[r, o + 103])
                    for j in range(32):
                        acc[j] += (d0 * f32(q[r, o + 2 + j])) * x[t, 32 * b + j]
                        acc[32 + j] += (d1 * f32(q[r, o + 36 + j])) * x[t, 32 * b + 32 + j]
                        acc[64 + j] += (d2 * f32(q[r, o + 70 + j])) * x[t, 32 * b + 64 + j]
                        acc[96 + j] += (d3 * f32(q[r, o + 104 + j])) * x[t, 32 * b + 96 + j]
                    b += 4
                while b < nb:
                    o = 34 * b
                    d0 = _half(data[r, o], data[r, o + 1])
                    for j in range(32):
                        acc[j] += (d0 * f32(q[r, o + 2 + j])) * x[t, 32 * b + j]
                    b += 1
                y[t, r] = np.sum(acc)


@njit(parallel=True, fastmath=FAST, **JIT)
def matvec_q5_0(data, x, y):
    R, nb, T = data.shape[0], data.shape[1] // 22, x.shape[0]
    nc = max(1, min(64, R // 32))
    for c in prange(nc):
        acc = np.empty(64, np.float32)
        for r in range(c * R // nc, (c + 1) * R // nc):
            for t in range(T):
                acc[:] = 0
                b = 0
                while b + 2 <= nb:
                    o, p = 22 * b, 22 * b + 22
                    d0, d1 = _half(data[r, o], data[r, o + 1]), _half(data[r, p], data[r, p + 1])
                    h0 = (np.uint32(data[r, o + 2]) | (np.uint32(data[r, o + 3]) << 8)
                          | (np.uint32(data[r, o + 4]) << 16) | (np.uint32(data[r, o + 5]) << 24))
                    h1 = (np.uint32(data[r, p + 2]) | (np.uint32(data[r, p + 3]) << 8)
                          | (np.uint32(data[r, p + 4]) << 16) | (np.uint32(data[r, p + 5]) << 24))
                    for j in range(16):
                        a0 = np.int32(data[r, o + 6 + j])
                        a1 = np.int32(data[r, p + 6 + j])
                        q0 = (a0 & 15) | np.int32(((h0 >> j) & 1) << 4)
                        q1 = (a0 >> 4) | np.int32(((h0 >> (j + 16)) & 1) << 4)
                        q2 = (a1 & 15) | np.int32(((h1 >> j) & 1) << 4)
                        q3 = (a1 >> 4) | np.int32(((h1 >> (j + 16)) & 1) << 4)
                        acc[j] += (d0 * f32(q0 - 16)) * x[t, 32 * b + j]
                        acc[16 + j] += (d0 * f32(q1 - 16)) * x[t, 32 * b + 16 + j]
                        acc[32 + j] += (d1 * f32(q2 - 16)) * x[t, 32 * b + 32 + j]
                        acc[48 + j] += (d1 * f32(q3 - 16)) * x[t, 32 * b + 48 + j]
                    b += 2
                while b < nb:
                    o = 22 * b
                    d0 = _half(data[r, o], data[r, o + 1])
                    h0 = (np.uint32(data[r, o + 2]) | (np.uint32(data[r, o + 3]) << 8)
                          | (np.uint32(data[r, o + 4]) << 16) | (np.uint32(data[r, o + 5]) << 24))
                    for j in range(16):
                        a0 = np.int32(data[r, o + 6 + j])
                        q0 = (a0 & 15) | np.int32(((h0 >> j) & 1) << 4)
                        q1 = (a0 >> 4) | np.int32(((h0 >> (j + 16)) & 1) << 4)
                        acc[j] += (d0 * f32(q0 - 16)) * x[t, 32 * b + j]
                        acc[16 + j] += (d0 * f32(q1 - 16)) * x[t, 32 * b + 16 + j]
                    b += 1
                y[t, r] = np.sum(acc)


@njit(parallel=True, fastmath=FAST, **JIT)
def matvec_q4_0(data, x, y):
    R, nb, T = data.shape[0], data.shape[1] // 18, x.shape[0]
    nc = max(1, min(64, R // 32))
    for c in prange(nc):
        acc = np.empty(32, np.float32)
        for r in range(c * R // nc, (c + 1) * R // nc):
            for t in range(T):
                acc[:] = 0
                for b in range(nb):
                    o = 18 * b
                    d = _half(data[r, o], data[r, o + 1])
                    for j in range(16):
                        a = np.int32(data[r, o + 2 + j])
                        acc[j] += (d * f32((a & 15) - 8)) * x[t, 32 * b + j]
                        acc[16 + j] += (d * f32((a >> 4) - 8)) * x[t, 32 * b + 16 + j]
                y[t, r] = np.sum(acc)


@njit(parallel=True, fastmath=FAST, **JIT)
def matvec_q4_k(data, x, y):
    R, nb, T = data.shape[0], data.shape[1] // 144, x.shape[0]
    nc = max(1, min(64, R // 32))
    for c in prange(nc):
        acc = np.empty(128, np.float32)
        scale = np.empty(8, np.float32)
        shift = np.empty(8, np.float32)
        for r in range(c * R // nc, (c + 1) * R // nc):
            for t in range(T):
                acc[:] = 0
                for b in range(nb):
                    o = 144 * b
                    d, dmin = _half(data[r, o], data[r, o + 1]), _half(data[r, o + 2], data[r, o + 3])
                    for i in range(8):
                        sc, mn = _k_scale_min(data, r, o, i)
                        scale[i], shift[i] = d * f32(sc), dmin * f32(mn)
                    for k in range(2):  # 2 x 64 bytes; each byte holds weights j and j + 32
                        qs, xo = o + 16 + 64 * k, 256 * b + 128 * k
                        s0, s1, s2, s3 = scale[4 * k], scale[4 * k + 1], scale[4 * k + 2], scale[4 * k + 3]
                        m0, m1, m2, m3 = shift[4 * k], shift[4 * k + 1], shift[4 * k + 2], shift[4 * k + 3]
                        for j in range(32):
                            a0, a1 = data[r, qs + j], data[r, qs + 32 + j]
                            acc[j] += (s0 * f32(a0 & 15) - m0) * x[t, xo + j]
                            acc[32 + j] += (s1 * f32(a0 >> 4) - m1) * x[t, xo + 32 + j]
                            acc[64 + j] += (s2 * f32(a1 & 15) - m2) * x[t, xo + 64 + j]
                            acc[96 + j] += (s3 * f32(a1 >> 4) - m3) * x[t, xo + 96 + j]
                y[t, r] = np.sum(acc)


@njit(parallel=True, fastmath=FAST, **JIT)
def matvec_q6_k(data, x, y):
    R, nb, T = data.shape[0], data.shape[1] // 210, x.shape[0]
    sc8 = data.view(np.int8)
    nc = max(1, min(64, R // 32))
    for c in prange(nc):
        acc = np.empty(64, np.float32)
        for r in range(c * R // nc, (c + 1) * R // nc):
            for t in range(T):
                acc[:] = 0
                for b in range(nb):
                    o = 210 * b
                    d = _half(data[r, o + 208], data[r, o + 209])
                    for h in range(2):
                        for half in range(2):  # weights j in [16 half, 16 half + 16) of each run
                            g = o + 192 + 8 * h + half  # scale of run s is at g + 2 s
                            s0, s1 = d * f32(sc8[r, g]), d * f32(sc8[r, g + 2])
                            s2, s3 = d * f32(sc8[r, g + 4]), d * f32(sc8[r, g + 6])
                            xo = 256 * b + 128 * h + 16 * half
                            for jj in range(16):
                                j = 16 * half + jj
                                l0 = data[r, o + 64 * h + j]
                                l1 = data[r, o + 64 * h + 32 + j]
                                hb = data[r, o + 128 + 32 * h + j]
                                q0 = np.int32((l0 & 15) | ((hb & 3) << 4)) - 32
                                q1 = np.int32((l1 & 15) | (((hb >> 2) & 3) << 4)) - 32
                                q2 = np.int32((l0 >> 4) | (((hb >> 4) & 3) << 4)) - 32
                                q3 = np.int32((l1 >> 4) | (((hb >> 6) & 3) << 4)) - 32
                                acc[jj] += (s0 * f32(q0)) * x[t, xo + jj]
                                acc[16 + jj] += (s1 * f32(q1)) * x[t, xo + 32 + jj]
                                acc[32 + jj] += (s2 * f32(q2)) * x[t, xo + 64 + jj]
                                acc[48 + jj] += (s3 * f32(q3)) * x[t, xo + 96 + jj]
                y[t, r] = np.sum(acc)


@njit(parallel=True, fastmath=FAST, **JIT)
def matvec_bf16(data, x, y):
    w = data.view(np.uint16)
    R, n, T = w.shape[0], w.shape[1], x.shape[0]
    nc = max(1, min(64, R // 32))
    for c in prange(nc):
        for r in range(c * R // nc, (c + 1) * R // nc):
            for t in range(T):
                s = f32(0)
                for j in range(n):
                    s += _bf16(w[r, j]) * x[t, j]
                y[t, r] = s


@njit(parallel=True, fastmath=FAST, **JIT)
def matvec_f16(data, x, y):
    w = data.view(np.uint16)
    R, n, T = w.shape[0], w.shape[1], x.shape[0]
    nc = max(1, min(64, R // 32))
    for c in prange(nc):
        for r in range(c * R // nc, (c + 1) * R // nc):
            for t in range(T):
                s = f32(0)
                for j in range(n):
                    s += _half16(w[r, j]) * x[t, j]
                y[t, r] = s


@njit(parallel=True, fastmath=FAST, **JIT)
def matvec_f32(data, x, y):
    w = data.view(np.float32)
    R, n, T = w.shape[0], w.shape[1], x.shape[0]
    nc = max(1, min(64, R // 32))
    for c in prange(nc):
        for r in range(c * R // nc, (c + 1) * R // nc):
            for t in range(T):
                s = f32(0)
                for j in range(n):
                    s += w[r, j] * x[t, j]
                y[t, r] = s


# name -> (weights per block, bytes per block, matvec, decode)
FORMATS = {
    "Q8_0": (32, 34, matvec_q8_0, decode_q8_0),
    "Q5_0": (32, 22, matvec_q5_0, decode_q5_0),
    "Q4_0": (32, 18, matvec_q4_0, decode_q4_0),
    "Q4_K": (256, 144, matvec_q4_k, decode_q4_k),
    "Q5_K": (256, 176, None, decode_q5_k),
    "Q6_K": (256, 210, matvec_q6_k, decode_q6_k),
    "bf16": (1, 2, matvec_bf16, decode_bf16),
    "f16": (1, 2, matvec_f16, decode_f16),
    "f32": (1, 4, matvec_f32, decode_f32),
}


# ---- attention over the KV cache -------------------------------------------------------------
@njit(parallel=True, fastmath=FAST, **JIT)
def attend_cache(q, k, v, pos0, first, window, scale, cap, out):
    """``softmax(q k^T * scale) v`` for queries at positions ``pos0 + t`` over cached keys.

    q ``[H, T, d]``; k, v ``[K, S, d]`` (the whole cache of one layer); out ``[H, T, d]``.
    Query ``t`` sees keys ``first <= s <= pos0 + t`` and, with a ``window`` > 0, only
    ``s > pos0 + t - window``. ``cap`` > 0 soft-caps the scores (Gemma 2). The ``G = H / K``
    query heads of a group are handled together: each key and value row is read once for all
    of them (multi-query attention reads one KV head for every query head).
    """
    H, T, d = q.shape
    K = k.shape[0]
    G = H // K
    last = pos0 + T  # keys [first, last)
    S = last - first
    for kh in prange(K):
        scores = np.empty((G * T, S), np.float32)
        for s in range(S):  # q . k for every query of the group, key row s read once
            key = k[kh, first + s]
            for g in range(G):
                for t in range(T):
                    acc = f32(0)
                    for j in range(d):
                        acc += q[kh * G + g, t, j] * key[j]
                    scores[g * T + t, s] = acc * f32(scale)
        for g in range(G):
            for t in range(T):
                row = scores[g * T + t]
                p = pos0 + t
                lo = first if window <= 0 else max(first, p - window + 1)
                m = -np.inf
                for s in range(S):
                    key_pos = first + s
                    if key_pos < lo or key_pos > p:
                        row[s] = -np.inf
                    else:
                        if cap > 0:
                            row[s] = f32(cap) * np.tanh(row[s] / f32(cap))
                        m = max(m, row[s])
                total = f32(0)
                for s in range(S):
                    row[s] = np.exp(row[s] - m)
                    total += row[s]
                for s in range(S):
                    row[s] = row[s] / total
                out[kh * G + g, t, :] = 0
        for s in range(S):  # probs . v, value row s read once for the group
            val = v[kh, first + s]
            for g in range(G):
                for t in range(T):
                    p_ = scores[g * T + t, s]
                    if p_ != 0:
                        for j in range(d):
                            out[kh * G + g, t, j] += p_ * val[j]


# ---- threads ---------------------------------------------------------------------------------
class Threads:
    """How many threads a kernel call gets.

    A parallel region ends when its slowest thread does. On a machine whose cores are busy
    with other work, a worker thread can wait a whole scheduler time slice (milliseconds) to
    run, and a 50-microsecond matvec then takes 10-20 ms; one thread never waits. So kernels
    run on one thread when their work is small (below ``PARALLEL_MIN`` weights, where waking a
    second thread costs more than it saves) or, when ``adaptive``, while the 1-minute load
    average says other processes hold the cores (checked once a second). ``limit`` caps the
    threads (None: Numba's default, one per core). The environment variable
    ``TINYGEMMA_THREADS=N`` sets ``limit=N`` and turns the load check off (benchmarks use it).
    """

    def __init__(self, limit: int | None = None, adaptive: bool = True):
        import numba
        self._numba = numba
        env = os.environ.get("TINYGEMMA_THREADS")
        if limit is None and env:
            limit, adaptive = int(env), False
        self.limit, self.adaptive = limit, adaptive
        self._current = numba.get_num_threads()
        self._checked = -1.0
        self._busy = False

    def most(self) -> int:
        n = self._numba.config.NUMBA_NUM_THREADS
        return max(1, min(n, self.limit or n))

    def busy(self) -> bool:
        """Whether other processes keep the cores busy (load average above cores + 0.5)."""
        if not self.adaptive:
            return False
        now = time.monotonic()
        if now - self._checked > 1.0:
            self._checked = now
            try:
                cores = len(os.sched_getaffinity(0))
            except AttributeError:  # not Linux
                cores = os.cpu_count() or 1
            try:
                self._busy = os.getloadavg()[0] > cores + 0.5
            except OSError:
                self._busy = False
        return self._busy

    def use(self, work: int) -> None:
        """Set the threads for a kernel call of ``work`` multiply-adds."""
        n = 1 if work < PARALLEL_MIN or self.busy() else self.most()
        if n != self._current:
            self._numba.set_num_threads(n)
            self._current = n


# ---- the fast model ---------------------------------------------------------------------------
def _kind(tensor) -> str:
    return getattr(tensor, "kind", "f32")


def stored_bytes(tensor) -> np.ndarray:
    """A compact tensor's storage as C-contiguous uint8 ``[rows, bytes per row]`` (no copy
    for memory-mapped checkpoints)."""
    data = np.asarray(tensor.data)
    if data.ndim == 1:
        data = data.reshape(tensor.shape[0], -1)
    data = np.ascontiguousarray(data)
    return data.view(np.uint8).reshape(data.shape[0], -1)


class FastGemma(Gemma):
    """:class:`Gemma` with the projections and the cached attention in Numba kernels.

    Weights stay as stored (memory-mapped bf16, GGUF blocks); nothing is decoded ahead of time.
    ``linear``: for up to ``SMALL_T`` tokens a matvec kernel decodes the weights in registers;
    for more (prefill) tiles of rows are decoded to float32 and multiplied with BLAS.
    ``attend``: a kernel over the cache for up to ``SMALL_T`` queries; the reference otherwise
    (prefill, whose attention is a large matrix product) and whenever probabilities are wanted.
    """

    def __init__(self, config, weights, tokenizer=None):
        super().__init__(config, weights, tokenizer)
        self._plans: dict[str, tuple] = {}
        self._tile: np.ndarray | None = None
        self.threads = Threads()
        for name, t in weights.tensors.items():
            if len(t.shape) == 2 and _kind(t) not in FORMATS:
                raise ValueError(f"tensor {name!r}: no fast kernel for {_kind(t)}; "
                                 "load with fast=False")

    def _plan(self, name):
        plan = self._plans.get(name)
        if plan is None:
            t = self.weights.tensors[name]
            per_block, bytes_per_block, matvec, decode = FORMATS[_kind(t)]
            plan = self._plans[name] = (stored_bytes(t), matvec, decode, t.shape)
        return plan

    def linear(self, x: np.ndarray, name: str) -> np.ndarray:
        data, matvec, decode, (rows, cols) = self._plan(name)
        x = np.ascontiguousarray(x, dtype=np.float32)  # [T, in]
        T = x.shape[0]
        y = np.empty((T, rows), np.float32)  # [T, out]
        if T <= SMALL_T and matvec is not None:
            self.threads.use(T * rows * cols)
            matvec(data, x, y)
            return y
        # Decode the tiles on this thread alone: BLAS runs its own thread pool, and a Numba
        # worker still spinning after its region would take a core from it.
        self.threads.use(0)
        step = max(1, min(rows, TILE_ELEMS // cols))  # rows per decoded tile
        tile = self._tile_buffer(step * cols)[: step * cols].reshape(step, cols)
        for r0 in range(0, rows, step):
            r1 = min(rows, r0 + step)
            w = tile[: r1 - r0]
            decode(data, r0, r1, w)
            y[:, r0:r1] = x @ w.T  # [T, in] @ [in, rows] on BLAS (an `out=` slice would not be)
        return y

    def _tile_buffer(self, n):
        if self._tile is None or self._tile.size < n:
            self._tile = np.empty(max(n, TILE_ELEMS), np.float32)
        return self._tile

    def attend(self, q, cache: KVCache, i: int, positions, want_probs: bool):
        T = q.shape[1]
        if want_probs or T > SMALL_T:
            return super().attend(q, cache, i, positions, want_probs)
        c = self.config
        window = c.window(i) or 0
        pos0 = int(positions[0])
        first = 0 if not window else max(0, pos0 - window + 1)
        out = np.empty(q.shape, np.float32)  # [H, T, d]
        work = 2 * q.size * (pos0 + T - first)  # q.k and p.v multiply-adds
        self.threads.use(work if c.num_kv_heads > 1 else 0)  # parallel over KV heads (MQA: one)
        attend_cache(np.ascontiguousarray(q, dtype=np.float32), cache.k[i], cache.v[i], pos0,
                     first, window, float(c.attn_scale), float(c.attn_logit_softcap or 0.0), out)
        return out, None


__all__ = ["FastGemma", "FORMATS", "Threads", "attend_cache", "stored_bytes"]
