"""GGUF blocks unpacked exactly to one signed byte per weight plus scales; int8 quantisation;
the exact decoders to float32; which kernels read which type.

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

from typing import NamedTuple

import numpy as np
from numba import njit

from ._llvm import JIT, _as_f32, _half, f32


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
