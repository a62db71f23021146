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

Parallel over chunks of panels; each thread takes its chunk's panels for one block of 16
tokens at a time, so that the block's ``x`` and the chunk's panels stay in its L2 cache.
The block's rows of ``x`` are first copied to a buffer whose rows are 16 floats longer: rows
of 1024 or 2048 float32 are 4 or 8 KB apart, so 16 of them would fall in the same set of the
L1 cache and evict each other at every column.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from ._llvm import FAST, JIT, _as_f32, _lanes, _q_at, f32
from .matvec import PANEL, _group_at

TOKENS = 16  # tokens multiplied by each decoded column: 16 accumulators of 16 lanes
CHUNK = 8  # panels per chunk, about: a chunk's panels and a block's x fit in a core's L2


@njit(inline="always", fastmath=FAST)
def _panel_block(qp, sp, hp, has_shift, xr, p, G, lo, hi, s):
    """``lo[16 t + l]`` (tokens 0-7) and ``hi[...]`` (8-15) = row ``16 p + l`` of W times
    ``xr[t]``. ``G`` is a constant at each call, so the lane loops vectorise fully."""
    nb = sp.shape[1]
    lo[:] = 0
    hi[:] = 0
    for b in range(nb):
        start, step = _group_at(b, G, nb)
        for lane in range(PANEL):  # the group's scales and shifts, as float32 lanes
            s[lane] = _as_f32(sp[p, b, lane])
            s[PANEL + lane] = hp[p, b, lane] if has_shift else f32(0)
        for j in range(G):
            c, col = start + step * j, G * b + j  # where column col is stored
            x0, x1, x2, x3 = xr[0, col], xr[1, col], xr[2, col], xr[3, col]
            x4, x5, x6, x7 = xr[4, col], xr[5, col], xr[6, col], xr[7, col]
            x8, x9, x10, x11 = xr[8, col], xr[9, col], xr[10, col], xr[11, col]
            x12, x13, x14, x15 = xr[12, col], xr[13, col], xr[14, col], xr[15, col]
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


@njit(parallel=True, fastmath=FAST, **JIT)
def gemm_panels(qp, sp, hp, has_shift, x, chunks, y):
    """``y[T, rows] = x[T, cols] W^T`` for W in panels (``w = scale * q - shift``), float32
    sums; parallel over ``chunks`` chunks of panels."""
    P, (T, n), R = qp.shape[0], x.shape, y.shape[1]
    G = n // sp.shape[1]
    for ch in prange(chunks):
        lo, hi, s = _lanes(), _lanes(), _lanes()
        xr = np.empty((TOKENS, n + 16), np.float32)  # this thread's block of x (rows padded)
        for t0 in range(0, T, TOKENS):
            for t in range(TOKENS):  # past the last token: the last again, its sums dropped
                xr[t, :n] = x[min(t0 + t, T - 1)]
            for p in range(ch * P // chunks, (ch + 1) * P // chunks):
                if G == 32:
                    _panel_block(qp, sp, hp, has_shift, xr, p, 32, lo, hi, s)
                else:
                    _panel_block(qp, sp, hp, has_shift, xr, p, 16, lo, hi, s)
                for t in range(min(TOKENS, T - t0)):
                    for lane in range(min(PANEL, R - PANEL * p)):  # the last panel: padding
                        y[t0 + t, PANEL * p + lane] = (lo[16 * t + lane] if t < 8
                                                       else hi[16 * (t - 8) + lane])


def gemm_chunks(panels: int, threads: int) -> int:
    """Chunks of about ``CHUNK`` panels, a multiple of ``threads`` (each thread as many)."""
    return max(1, min(panels, threads * -(-panels // (threads * CHUNK))))
