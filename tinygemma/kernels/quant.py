"""GGUF blocks unpacked to one signed byte per weight plus scales, exactly; int8 quantisation.

Sub-byte formats (5-, 4- and 6-bit weights) cost several integer instructions per weight to
unpack, so unpacking them inside the matvec would make decoding, not reading memory, the
bottleneck. Every GGUF block type is unpacked once, when first used, to ``q`` int8
``[rows, n]`` and, per group of G weights, ``scale`` (and for the k-quants with a min,
``shift``) float32 ``[rows, n / G]`` such that ``w = scale * q - shift`` is bit for bit the
float32 weight of ``gguf.quants.dequantize`` (the same float32 operations in the same
order), a tile of rows at a time, then laid out in panels (see ``matvec.to_panels``).
No fastmath.

These kernels and the decoders are serial: they run in a prefill, beside BLAS's threads, which
spin for a while after each matrix product, and a parallel region would wait for a core. Only
the decode kernels are parallel.

Block layouts, as ggml-common.h declares them (``d``, ``dmin`` float16 scales first)::

    block_q8_0  {d; int8 qs[32]}                              w = d * q
    block_q5_0  {d; qh[4] (the 32 fifth bits); qs[16] nibbles} w = d * (q - 16)
    block_q4_0  {d; qs[16] nibbles}                            w = d * (q - 8)
    block_q4_K  {d; dmin; scales[12]; qs[128] nibbles}         w = d*sc * q - dmin*m
    block_q5_K  {d; dmin; scales[12]; qh[32]; qs[128]}          as Q4_K, q with a fifth bit
    block_q6_K  {ql[128] low nibbles; qh[64] high 2 bits; int8 scales[16]; d}
                                                               w = d*scale * (q - 32)

The block sizes come from ``checkpoints.ggml`` (the values of ``gguf.GGML_QUANT_SIZES``); the
offsets of the fields are named below, and checked at import to end where the block ends.
"""

from __future__ import annotations

from functools import partial
from typing import NamedTuple

import numpy as np
from numba import njit

from ..checkpoints.ggml import BLOCK_SIZES as GGML_QUANT_SIZES, GGMLType as GGMLQuantizationType
from ._llvm import JIT, _as_f32, _half, f32

# (weights, bytes) of a block of each type
QK8_0, Q8_0_BYTES = GGML_QUANT_SIZES[GGMLQuantizationType.Q8_0]
QK5_0, Q5_0_BYTES = GGML_QUANT_SIZES[GGMLQuantizationType.Q5_0]
QK4_0, Q4_0_BYTES = GGML_QUANT_SIZES[GGMLQuantizationType.Q4_0]
QK_K, Q4_K_BYTES = GGML_QUANT_SIZES[GGMLQuantizationType.Q4_K]
Q5_K_BYTES = GGML_QUANT_SIZES[GGMLQuantizationType.Q5_K][1]
Q6_K_BYTES = GGML_QUANT_SIZES[GGMLQuantizationType.Q6_K][1]
# byte offsets of the fields in a block
Q8_0_QS = 2  # after d
Q5_0_QH, Q5_0_QS = 2, 6
Q4_0_QS = 2
K_DMIN, K_SCALES = 2, 4  # Q4_K and Q5_K: d, dmin, then 12 bytes of 6-bit scales and mins
Q4_K_QS = 16
Q5_K_QH, Q5_K_QS = 16, 48
Q6_K_QH, Q6_K_SCALES, Q6_K_D = 128, 192, 208  # ql at 0
for _end, _size in ((Q8_0_QS + QK8_0, Q8_0_BYTES), (Q5_0_QS + QK5_0 // 2, Q5_0_BYTES),
                    (Q4_0_QS + QK4_0 // 2, Q4_0_BYTES), (Q4_K_QS + QK_K // 2, Q4_K_BYTES),
                    (Q5_K_QS + QK_K // 2, Q5_K_BYTES), (Q6_K_D + 2, Q6_K_BYTES)):
    assert _end == _size, "a GGUF block layout changed"


@njit(inline="always")
def _k_scale_min(data, r, o, i):
    """6-bit scale and min of sub-block ``i`` of a Q4_K/Q5_K super-block at byte ``o``."""
    s = o + K_SCALES  # 12 bytes: 4 of scales, 4 of mins (low 6 bits), 4 packed high parts
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
        for b in range(data.shape[1] // Q8_0_BYTES):
            o = Q8_0_BYTES * b
            scale[r, b] = _half(data[r, o], data[r, o + 1])
            for j in range(QK8_0):
                q[r, QK8_0 * b + j] = q8[r, o + Q8_0_QS + j]


@njit(**JIT)
def unpack_q5_0(data, q, scale, shift):
    """Q5_0: ``w = d * (q - 16)``; q's low 4 bits in nibbles, the 5th in a 32-bit mask."""
    half = QK5_0 // 2
    for r in range(data.shape[0]):
        for b in range(data.shape[1] // Q5_0_BYTES):
            o = Q5_0_BYTES * b
            scale[r, b] = _half(data[r, o], data[r, o + 1])
            h = o + Q5_0_QH
            qh = (np.uint32(data[r, h]) | (np.uint32(data[r, h + 1]) << 8)
                  | (np.uint32(data[r, h + 2]) << 16) | (np.uint32(data[r, h + 3]) << 24))
            qs = o + Q5_0_QS
            for j in range(half):
                lo = np.int32(data[r, qs + j] & 15) | np.int32(((qh >> j) & 1) << 4)
                hi = np.int32(data[r, qs + j] >> 4) | np.int32(((qh >> (j + half)) & 1) << 4)
                q[r, QK5_0 * b + j] = lo - 16
                q[r, QK5_0 * b + half + j] = hi - 16


@njit(**JIT)
def unpack_q4_0(data, q, scale, shift):
    """Q4_0: ``w = d * (q - 8)``; weights j and j + 16 share a byte."""
    half = QK4_0 // 2
    for r in range(data.shape[0]):
        for b in range(data.shape[1] // Q4_0_BYTES):
            o = Q4_0_BYTES * b
            scale[r, b] = _half(data[r, o], data[r, o + 1])
            for j in range(half):
                q[r, QK4_0 * b + j] = np.int32(data[r, o + Q4_0_QS + j] & 15) - 8
                q[r, QK4_0 * b + half + j] = np.int32(data[r, o + Q4_0_QS + j] >> 4) - 8


@njit(**JIT)
def unpack_k(data, q, scale, shift, fifth_bit):
    """Q4_K, and with ``fifth_bit`` Q5_K: ``w = (d * sc) * q - dmin * m`` per sub-block of
    32; q's low 4 bits in nibbles (low then high), Q5_K's fifth from 32 bytes of high bits."""
    size, qs = (Q5_K_BYTES, Q5_K_QS) if fifth_bit else (Q4_K_BYTES, Q4_K_QS)
    for r in range(data.shape[0]):
        for b in range(data.shape[1] // size):
            o = size * b
            d = _half(data[r, o], data[r, o + 1])
            dmin = _half(data[r, o + K_DMIN], data[r, o + K_DMIN + 1])
            for i in range(8):  # sub-block i: low nibbles for even i, high for odd i
                sc, mn = _k_scale_min(data, r, o, i)
                scale[r, 8 * b + i], shift[r, 8 * b + i] = d * f32(sc), dmin * f32(mn)
                at = o + qs + 32 * (i // 2)
                for j in range(32):
                    v = np.int32(data[r, at + j] >> (4 * (i % 2))) & 15
                    if fifth_bit:
                        v |= np.int32((data[r, o + Q5_K_QH + j] >> i) & 1) << 4
                    q[r, QK_K * b + 32 * i + j] = v


@njit(**JIT)
def unpack_q6_k(data, q, scale, shift):
    """Q6_K: ``w = (d * scale) * (q - 32)`` per group of 16; 4 low bits + 2 high bits."""
    sc8 = data.view(np.int8)
    for r in range(data.shape[0]):
        for b in range(data.shape[1] // Q6_K_BYTES):
            o = Q6_K_BYTES * b
            d = _half(data[r, o + Q6_K_D], data[r, o + Q6_K_D + 1])
            for g in range(16):
                scale[r, 16 * b + g] = d * f32(sc8[r, o + Q6_K_SCALES + g])
            for h in range(2):  # two halves of 128 weights
                for s in range(4):  # four runs of 32: low/high nibbles of two 32-byte rows
                    for j in range(32):
                        lo = (data[r, o + 64 * h + 32 * (s % 2) + j] >> (4 * (s // 2))) & 15
                        hi = (data[r, o + Q6_K_QH + 32 * h + j] >> (2 * s)) & 3
                        q[r, QK_K * b + 128 * h + 32 * s + j] = np.int32(lo | (hi << 4)) - 32


def q6_k_scales(data: np.ndarray) -> np.ndarray:
    """Q6_K rows ``data`` uint8 ``[rows, bytes]``: each super-block's 16 int8 sub-scales and
    its float16 ``d`` (2 bytes), as stored, int8 ``[rows, n / 256, 18]`` (a view).
    ``f32(d) * f32(sc)`` is exact in float32 (11 bits times 8), so the panels keep these 1.1
    bytes per 16 weights instead of the float32 ``scale`` (4)."""
    blocks = data.reshape(data.shape[0], -1, Q6_K_BYTES)  # [rows, n / 256, 210]
    return blocks[:, :, Q6_K_SCALES:Q6_K_D + 2].view(np.int8)  # [rows, n / 256, 18]


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


# ---- which kernels read which type ------------------------------------------------------------
# Read as stored (matvec_stored, decode_stored): kind -> the type its values are viewed as.
STORED = {"bf16": np.uint16, "f16": np.int16, "f32": np.float32}


class Unpacking(NamedTuple):
    unpack: object  # unpack_*: stored blocks -> int8 q, scale, shift per group, row-major
    group: int  # weights per scale
    shift: bool  # w = scale * q - shift (the k-quants' minimums), else w = scale * q
    f16_scale: bool  # the scales are float16 as stored: keep them so (2 bytes instead of 4)
    bits: int  # bits a weight takes in the panels: 8 (int8), 5 (Q5_0's q + 16) or 4 (nibbles)
    # None, or (Q6_K) stored rows -> their sub-scales and super-scales as the panels keep them
    # (``q6_k_scales``), instead of the float32 ``scale`` per group
    super_scales: object = None


# Unpacked once into panels, by kind.
UNPACKED = {"Q8_0": Unpacking(unpack_q8_0, QK8_0, False, True, 8),
            "Q5_0": Unpacking(unpack_q5_0, QK5_0, False, True, 5),
            "Q4_0": Unpacking(unpack_q4_0, QK4_0, False, True, 8),
            "Q4_K": Unpacking(partial(unpack_k, fifth_bit=False), 32, True, False, 4),
            "Q5_K": Unpacking(partial(unpack_k, fifth_bit=True), 32, True, False, 8),
            "Q6_K": Unpacking(unpack_q6_k, 16, False, False, 8, q6_k_scales)}
FORMATS = sorted(STORED) + sorted(UNPACKED)
