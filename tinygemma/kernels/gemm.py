"""Matrix-matrix products over panels: prefill without float32 copies of the weights.

A prefill multiplies each weight matrix by many tokens at once, where the arithmetic, not the
memory, sets the speed. BLAS reaches this machine's float32 peak, but only on float32 matrices:
decoding the weights to float32 for it either keeps a float32 copy of every matrix (4 bytes a
weight in RAM, 4-7x the compact panels) or decodes them again at every prefill.
``gemm_panels`` multiplies the panels (``matvec.py``) directly. A panel's column, 16 rows side
by side, is decoded once to 16 float32 lanes (``w = scale * q - shift``) and multiplied by 16
tokens' ``x`` for that column, each broadcast: 16 accumulators of 16 lanes (two ``_lanes``
arrays, in registers), so the decoding costs 3 instructions per 16 multiply-adds. Measured on
one core against OpenBLAS on the decoded float32 matrix: docs/performance.md.

Q5_0's 5-bit panels are unpacked to a transient int8 copy for each product (``int8_panels``):
the loop above then stays the int8 one.

``gemm_geglu``: the MLP's gate and up, stacked, in one such product that applies the GeGLU
as it writes its sums, so that a prefill holds neither gate's nor up's ``[T, F]`` output.

Parallel over chunks of panels; each thread takes its chunk's panels for one block of 16
tokens at a time, so that the block's ``x`` and the chunk's panels stay in its L2 cache.
The 16 ``x`` values of a column are read from the rows of ``x`` where they are, each load a
broadcast: copying the block first (as ``[column, token]``, or as rows padded against L1
cache-set conflicts) measured slower on one core on the demo's Q5_0 matrices (70-85 against
115-180 GFLOP/s) and no faster on the others.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from ._llvm import FAST, JIT, _groups, _lanes, _q5_at, _q_at, _scale_at, f32
from .attention import _geglu
from .matvec import PANEL, _group_at

TOKENS = 16  # tokens multiplied by each decoded column: 16 accumulators of 16 lanes
CHUNK = 8  # panels per chunk, about: a chunk's panels and a block's x fit in a core's L2


@njit(inline="always", fastmath=FAST)
def _panel_block(qp, sp, hp, has_shift, x, i, p, G, lo, hi, s):
    """``lo[16 t + l]`` (tokens 0-7) and ``hi[...]`` (8-15) = row ``16 p + l`` of W times
    ``x[i[t]]``. ``G`` is a constant at each call, so the lane loops vectorise fully."""
    nb = _groups(sp)
    lo[:] = 0
    hi[:] = 0
    for b in range(nb):
        start, step = _group_at(b, G, nb)
        for lane in range(PANEL):  # the group's scales and shifts, as float32 lanes
            s[lane] = _scale_at(sp, p, b, lane)
            s[PANEL + lane] = hp[p, b, lane] if has_shift else f32(0)
        for j in range(G):
            c, col = start + step * j, G * b + j  # where column col is stored
            x0, x1, x2, x3 = x[i[0], col], x[i[1], col], x[i[2], col], x[i[3], col]
            x4, x5, x6, x7 = x[i[4], col], x[i[5], col], x[i[6], col], x[i[7], col]
            x8, x9, x10, x11 = x[i[8], col], x[i[9], col], x[i[10], col], x[i[11], col]
            x12, x13, x14, x15 = x[i[12], col], x[i[13], col], x[i[14], col], x[i[15], col]
            for lane in range(PANEL):
                w = s[lane] * _q_at(qp, p, c, lane) - s[PANEL + lane]  # 16 rows' weights
                lo[lane] += w * x0
                lo[16 + lane] += w * x1
                lo[32 + lane] += w * x2
                lo[48 + lane] += w * x3
                lo[64 + lane] += w * x4
                lo[80 + lane] += w * x5
                lo[96 + lane] += w * x6
                lo[112 + lane] += w * x7
                hi[lane] += w * x8
                hi[16 + lane] += w * x9
                hi[32 + lane] += w * x10
                hi[48 + lane] += w * x11
                hi[64 + lane] += w * x12
                hi[80 + lane] += w * x13
                hi[96 + lane] += w * x14
                hi[112 + lane] += w * x15


def _gemm_panels(G: int):
    """The product over panels for groups of ``G`` columns: ``G`` a constant of each kernel, so
    each compiles one loop nest (as ``matvec._matvec_panels``: half the first run's compile
    time of a kernel branching on the group size)."""
    @njit(parallel=True, fastmath=FAST, **JIT)
    def gemm(qp, sp, hp, has_shift, x, chunks, y):
        P, T, R = qp.shape[0], x.shape[0], y.shape[1]
        for ch in prange(chunks):
            lo, hi, s = _lanes(), _lanes(), _lanes()
            i = np.empty(TOKENS, np.int64)  # the block's rows of x
            for t0 in range(0, T, TOKENS):
                for t in range(TOKENS):  # past the last token: the last again, its sums dropped
                    i[t] = min(t0 + t, T - 1)
                for p in range(ch * P // chunks, (ch + 1) * P // chunks):
                    _panel_block(qp, sp, hp, has_shift, x, i, p, G, lo, hi, s)
                    for t in range(min(TOKENS, T - t0)):
                        for lane in range(min(PANEL, R - PANEL * p)):  # the last panel: padding
                            y[t0 + t, PANEL * p + lane] = (lo[16 * t + lane] if t < 8
                                                           else hi[16 * (t - 8) + lane])
    return gemm


def _gemm_geglu(G: int):
    """The product over the stack of an MLP's gate and up (``Packed.stacked``: gate's panels,
    then as many of up's), the GeGLU applied as the sums are written: a thread multiplies a
    block of tokens by gate's panel ``p``, keeps the sums, multiplies by up's panel ``p``
    and writes ``gelu_tanh(gate) * up``. A prefill's MLP then holds one ``[T, F]`` array
    instead of three (gate, up and their GeGLU) and reads none of them back."""
    @njit(parallel=True, fastmath=FAST, **JIT)
    def gemm(qp, sp, hp, has_shift, x, chunks, out):
        P, T = qp.shape[0] // 2, x.shape[0]  # gate's panels; up's are P + p
        for ch in prange(chunks):
            lo, hi, s = _lanes(), _lanes(), _lanes()
            gate_lo, gate_hi = _lanes(), _lanes()  # the block's sums over gate's panel
            i = np.empty(TOKENS, np.int64)  # the block's rows of x
            for t0 in range(0, T, TOKENS):
                for t in range(TOKENS):  # past the last token: the last again, its sums dropped
                    i[t] = min(t0 + t, T - 1)
                for p in range(ch * P // chunks, (ch + 1) * P // chunks):
                    _panel_block(qp, sp, hp, has_shift, x, i, p, G, lo, hi, s)
                    gate_lo[:] = lo
                    gate_hi[:] = hi
                    _panel_block(qp, sp, hp, has_shift, x, i, P + p, G, lo, hi, s)
                    for t in range(min(TOKENS, T - t0)):
                        for lane in range(PANEL):
                            k = 16 * (t % 8) + lane
                            out[t0 + t, PANEL * p + lane] = (
                                _geglu(gate_lo[k], lo[k]) if t < 8 else _geglu(gate_hi[k], hi[k]))
    return gemm


@njit(parallel=True, **JIT)
def unpack5(qp, out):
    """5-bit panels (Q5_0) as int8 panels ``out [P, n, 16]`` of ``q - 16``, positions alike.

    A run of 8 positions at a time goes through ``run``, a ``_lanes`` array on the stack,
    which LLVM knows overlaps no array: both loops then vectorise (written to ``out``
    directly, the loop ran one value at a time)."""
    for p in prange(qp.shape[0]):
        run = _lanes()
        for g in range(qp.shape[1]):
            for lane in range(PANEL):  # constant shifts: byte operations over the 16 lanes
                run[lane] = _q5_at(qp, p, g, 0, lane)
                run[16 + lane] = _q5_at(qp, p, g, 1, lane)
                run[32 + lane] = _q5_at(qp, p, g, 2, lane)
                run[48 + lane] = _q5_at(qp, p, g, 3, lane)
                run[64 + lane] = _q5_at(qp, p, g, 4, lane)
                run[80 + lane] = _q5_at(qp, p, g, 5, lane)
                run[96 + lane] = _q5_at(qp, p, g, 6, lane)
                run[112 + lane] = _q5_at(qp, p, g, 7, lane)
            to = out[p, 8 * g:8 * g + 8].reshape(128)  # [8 positions * 16 lanes]
            for k in range(128):
                to[k] = np.int8(run[k] - f32(16))


def int8_panels(qp: np.ndarray) -> np.ndarray:
    """Panels as the products read them: 5-bit ones (Q5_0) unpacked to a new int8 array,
    others as they are.

    A prefill's product reads each weight once per 16 tokens, so decoding the 5 bits there
    would cost at every block of tokens: it made the product 3.6x slower. Unpacking a
    matrix for its product costs about 0.1 ns a weight (0.3 ms for the demo's gate and up,
    2-4% of their 500-token product) and holds 1 byte a weight only while it runs (2.6 MB).
    Unpacking each chunk of panels into a buffer of its thread instead, reused for all the
    blocks, measured 8-11% slower than the int8 product."""
    if qp.ndim != 4:
        return qp
    out = np.empty((qp.shape[0], 8 * qp.shape[1], PANEL), np.int8)  # [P, n, 16]
    unpack5(qp, out)
    return out


gemm_panels_g32, gemm_panels_g16 = _gemm_panels(32), _gemm_panels(16)
gemm_geglu_g32, gemm_geglu_g16 = _gemm_geglu(32), _gemm_geglu(16)


def gemm_kernel(qp, sp, geglu: bool = False):
    """The kernel of ``gemm_panels`` (``gemm_geglu`` with ``geglu``) for panels ``qp``
    (``int8_panels``) with scales ``sp``: by the group size."""
    cols = qp.shape[1] * (2 if qp.dtype == np.uint8 else 1)  # 4-bit panels: 2 weights a byte
    if geglu:
        return gemm_geglu_g32 if cols // _groups(sp) == 32 else gemm_geglu_g16
    return gemm_panels_g32 if cols // _groups(sp) == 32 else gemm_panels_g16


def gemm_panels(qp, sp, hp, has_shift, x, chunks, y):
    """``y[T, rows] = x[T, :cols] W^T`` for W in panels (``w = scale * q - shift``), float32
    sums; parallel over ``chunks`` chunks of panels. ``x`` may be wider than W (``gemm_rows``:
    its rows padded)."""
    qp = int8_panels(qp)
    gemm_kernel(qp, sp)(qp, sp, hp, has_shift, x, chunks, y)


def gemm_geglu(qp, sp, hp, has_shift, x, chunks, out):
    """``out[:, :F] = gelu_tanh(x Wg^T) * (x Wu^T)`` for gate and up stacked in panels
    (``Packed.stacked``, ``F`` rows each, ``F`` a multiple of 16; ``out`` may be wider:
    ``padded_rows``): float32 sums as ``gemm_panels``, the GeGLU as ``geglu_rows``; parallel
    over ``chunks`` chunks of gate's panels (each with up's alike)."""
    qp = int8_panels(qp)
    gemm_kernel(qp, sp, geglu=True)(qp, sp, hp, has_shift, x, chunks, out)


def gemm_chunks(panels: int, threads: int) -> int:
    """Chunks of about ``CHUNK`` panels, a multiple of ``threads`` (each thread as many)."""
    return max(1, min(panels, threads * -(-panels // (threads * CHUNK))))


PAD = 16  # floats added to each row of x whose length is a multiple of 512 (see gemm_rows)


def gemm_rows(x: np.ndarray) -> np.ndarray:
    """``x [T, cols]`` as ``gemm_panels`` reads it: contiguous float32 rows, and rows of a
    multiple of 512 floats (2 KB) padded by ``PAD``.

    The kernel reads a column of 16 rows at a time. Rows a multiple of 4 KB apart fall in one
    set of the L1 cache (2 KB: two sets), whose 12 ways cannot hold all 16 lines: every read
    then misses. Padded, the demo's ``o`` (1024 columns) and ``down`` (2048) measured 140 and
    167 GFLOP/s on one core, against 100 and 109."""
    T, cols = x.shape
    if cols % 512:
        return np.ascontiguousarray(x, dtype=np.float32)
    base = x.base
    if (isinstance(base, np.ndarray) and base.shape == (T, cols + PAD)
            and base.dtype == x.dtype == np.float32 and base.flags.c_contiguous
            and x.strides == base.strides and x.ctypes.data == base.ctypes.data):
        return base  # x is padded_rows(T, cols)[:, :cols] already: no copy
    padded = padded_rows(T, cols)
    padded[:, :cols] = x
    return padded


def padded_rows(T: int, cols: int) -> np.ndarray:
    """An empty ``[T, cols]`` float32 array for a product's input, with ``PAD`` more columns
    when ``gemm_rows`` would pad it: a kernel that writes its ``[:, :cols]`` spares
    ``gemm_rows`` the copy."""
    return np.empty((T, cols + (0 if cols % 512 else PAD)), np.float32)  # [T, cols (+ PAD)]
