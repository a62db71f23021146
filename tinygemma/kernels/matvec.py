"""Matrix-vector products over compact weights, and :class:`Packed`, the form they read.

Decoding one token is a matrix-vector product per projection, which reads every weight once;
float32 copies would make it read 2x (bf16) to 7x (4-bit) more bytes. So these kernels read
compact weights and decode them in registers, inside the dot product: bf16, float16 and
float32 as stored (``matvec_stored``), the GGUF block types unpacked once to panels of int8,
5- or 4-bit values (``matvec_panels``). Parallel over panels or chunks of rows (``prange``), float32
accumulation; the weights are exactly those of the reference path, only the order of the
additions differs (``fastmath`` reassociation, which lets LLVM vectorise the sums).
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from ._llvm import (FAST, JIT, _as_f32, _groups, _lanes, _prefetch, _q5_at, _q_at, _q_put,
                    _scale_at, _scale_put, f32)
from .quant import STORED, UNPACKED, Unpacking, decode_stored, quantize_int8_g32

TILE_ELEMS = 1 << 21  # float32 elements in one decoded tile (8 MB): fits the L3 cache


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
# Q6_K's, ``d * sc`` per group of 16 with ``d`` float16 per 256 and ``sc`` int8, stay as stored,
# int8 ``[P, n / 256, 18, 16]`` (``_llvm._scale_at``): 1.1 bytes per group against a float32's
# 4, the product computed in the kernels (exact in float32).
# Q4_K's values, 0 to 15, are stored two a byte (``_q_at``): the same loop, a shift and a mask
# more per byte, half the bytes (0.75 bytes a weight with the scales, against 1.25 as int8).
# Q5_0's values, 0 to 31 with its offset of 16 left out (``w = d (q - 16)``), take 5 bits: for
# each run of 8 positions, 4 rows of nibbles as Q4_K's and a row of the fifth bits (``_q5_at``),
# 0.69 bytes a weight with the scales against 1.06 as int8. ``_panel_dot5`` reads a run a step,
# so every shift is a constant and LLVM decodes the 16 lanes with byte operations (GFNI's bit
# matrix where the CPU has it): about two instructions more per 16 weights. The offset costs
# nothing per weight: ``sum_j d (q_j - 16) x_j = d (sum_j q_j x_j - 16 sum_j x_j)``, with x's
# sums per group computed once. From memory, as decoding reads it, the 5-bit matvec is faster
# (35% fewer bytes); in cache, 5-10% slower (docs/performance.md).
# Timings against the row-major kernel: docs/performance.md.

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
    panels ``qp [P, n, 16]`` (int8; or, zeroed, uint8 ``[P, n / 2, 16]`` for 4-bit ``q`` and
    ``[P, n / 8, 5, 16]`` for Q5_0's),
    ``sp``, ``hp [P, n / G, 16]`` (``r0`` a multiple of 16; Q6_K's ``scale`` and ``sp``:
    ``q6_k_scales``' form, see ``_llvm._scale_at``)."""
    n, nb = q.shape[1], _groups(sp)
    G = n // nb
    for i in range(q.shape[0]):
        p, lane = (r0 + i) // PANEL, (r0 + i) % PANEL
        for b in range(nb):
            start, step = _group_at(b, G, nb)
            for j in range(G):
                _q_put(qp, p, start + step * j, lane, q[i, G * b + j])
            if has_shift:
                hp[p, b, lane] = shift[i, b]
        _scale_put(sp, p, lane, scale, i)


@njit(**JIT)
def decode_panels(qp, sp, hp, has_shift, r0, r1, out):
    """Rows ``[r0, r1)`` as float32: ``w = scale * q - shift``, bit for bit the unpacked weights."""
    n, nb = out.shape[1], _groups(sp)
    G = n // nb
    for r in range(r0, r1):
        p, lane = r // PANEL, r % PANEL
        for b in range(nb):
            start, step = _group_at(b, G, nb)
            s = _scale_at(sp, p, b, lane)
            m = hp[p, b, lane] if has_shift else f32(0)
            for j in range(G):
                out[r - r0, G * b + j] = s * _q_at(qp, p, start + step * j, lane) - m


@njit(inline="always")
def _fetch_next(a, p, b):
    """Prefetch groups ``b .. b + 3`` of panel ``p + 1`` of a scale or shift array
    ``[P, nb, 16]``, while panel ``p`` is multiplied.

    Decoding reads each layer's matrices from memory, not from cache. The weights ``q`` are one
    long stream that the hardware prefetcher follows, but a panel's scales (and shifts) are a
    short run in another array, 1-2 KB a panel, that it never picks up: each panel then waited
    for them. Fetching the next panel's ahead made the Q4_K matvec (o, float32 scales and
    shifts) 2.4x faster from memory on one thread, and Q6_K (down) 1.6x; the int8 matvecs with
    float16 scales did not change (docs/performance.md). Q6_K's scales ``[P, nb / 16, 18, 16]``:
    the super-block of groups ``b .. b + 15`` (288 bytes), when ``b`` is its first."""
    if p + 1 < a.shape[0]:
        start = (p + 1) * a.strides[0]  # bytes
        if a.ndim == 4:
            if b % 16 == 0:
                start += (b >> 4) * a.strides[1]
                for line in range(start, start + a.strides[1] + 63, 64):  # each line it spans
                    _prefetch(a, line)
        else:
            start += b * a.strides[1]
            for line in range(start, start + 4 * a.strides[1], 64):  # 64-byte cache lines
                _prefetch(a, line)


@njit(inline="always", fastmath=FAST)
def _panel_dot(qp, sp, hp, has_shift, xs, x, t, p, G, acc):
    """``acc[64:80]`` = the 16 rows of panel ``p`` times ``x[t]``; ``acc[:64]`` are four
    groups' partial sums. ``G`` is a constant at each call, so the loops vectorise fully."""
    nb = _groups(sp)
    acc[64:80] = 0
    b = 0
    while b + 4 <= nb:
        acc[:64] = 0
        o = G * b
        _fetch_next(sp, p, b)
        if has_shift:
            _fetch_next(hp, p, b)
        for j in range(G):
            x0, x1, x2, x3 = x[t, o + j], x[t, o + G + j], x[t, o + 2 * G + j], x[t, o + 3 * G + j]
            c = o + 4 * j  # the four columns o + j, o + G + j, ... stored side by side
            for lane in range(PANEL):
                acc[lane] += _q_at(qp, p, c, lane) * x0
                acc[16 + lane] += _q_at(qp, p, c + 1, lane) * x1
                acc[32 + lane] += _q_at(qp, p, c + 2, lane) * x2
                acc[48 + lane] += _q_at(qp, p, c + 3, lane) * x3
        for lane in range(PANEL):
            acc[64 + lane] += ((_scale_at(sp, p, b, lane) * acc[lane]
                                + _scale_at(sp, p, b + 1, lane) * acc[16 + lane])
                               + (_scale_at(sp, p, b + 2, lane) * acc[32 + lane]
                                  + _scale_at(sp, p, b + 3, lane) * acc[48 + lane]))
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
            acc[64 + lane] += _scale_at(sp, p, b, lane) * acc[lane]
            if has_shift:
                acc[64 + lane] -= hp[p, b, lane] * xs[t, b]
        b += 1


@njit(inline="always", fastmath=FAST)
def _group_sums(x, G, times, xs):
    """``xs[t, b]`` = ``times`` x the sum of ``x[t]`` over group ``b`` of ``G`` columns: what
    a group's shift (or Q5_0's offset of 16) multiplies."""
    for t in range(x.shape[0]):
        for b in range(xs.shape[1]):
            total = f32(0)
            for j in range(G * b, G * b + G):
                total += x[t, j]
            xs[t, b] = times * total


def _matvec_panels(G: int):
    """The matvec over panels for groups of ``G`` columns: ``G`` a constant of each kernel, so
    each compiles one loop nest (a kernel branching on the group size compiled both, twice
    the first run's compile time)."""
    @njit(parallel=True, fastmath=FAST, **JIT)
    def matvec(qp, sp, hp, has_shift, x, y):
        P, T, R = qp.shape[0], x.shape[0], y.shape[1]
        nb = _groups(sp)
        xs = np.empty((T, nb), np.float32)  # x summed per group, for the shifts (np.zeros
        if has_shift:                       # would be one more parallel region: a thread launch)
            _group_sums(x, G, f32(1), xs)
        for p in prange(P):
            acc = _lanes()
            for t in range(T):
                _panel_dot(qp, sp, hp, has_shift, xs, x, t, p, G, acc)
                for lane in range(min(PANEL, R - PANEL * p)):  # the last panel: part padding
                    y[t, PANEL * p + lane] = acc[64 + lane]
    return matvec


matvec_panels_g32, matvec_panels_g16 = _matvec_panels(32), _matvec_panels(16)


@njit(inline="always", fastmath=FAST)
def _panel_dot5(qp, sp, xs, x, t, p, acc):
    """``_panel_dot`` for 5-bit panels (Q5_0, groups of 32; no shift): ``w = scale * (q - 16)``
    with ``xs[t, b]`` 16 times group ``b``'s sum of ``x[t]``. A step reads a run of 8
    positions, two columns of each of the four groups, so that every shift is a constant."""
    G, nb = 32, sp.shape[1]
    acc[64:80] = 0
    b = 0
    while b + 4 <= nb:
        acc[:64] = 0
        o = G * b
        _fetch_next(sp, p, b)
        for j in range(0, G, 2):
            g = (o + 4 * j) >> 3  # the run of positions o + 4 j ... o + 4 j + 7
            x0, x1, x2, x3 = x[t, o + j], x[t, o + G + j], x[t, o + 2 * G + j], x[t, o + 3 * G + j]
            x4, x5 = x[t, o + j + 1], x[t, o + G + j + 1]
            x6, x7 = x[t, o + 2 * G + j + 1], x[t, o + 3 * G + j + 1]
            for lane in range(PANEL):
                acc[lane] += _q5_at(qp, p, g, 0, lane) * x0
                acc[16 + lane] += _q5_at(qp, p, g, 1, lane) * x1
                acc[32 + lane] += _q5_at(qp, p, g, 2, lane) * x2
                acc[48 + lane] += _q5_at(qp, p, g, 3, lane) * x3
                acc[lane] += _q5_at(qp, p, g, 4, lane) * x4
                acc[16 + lane] += _q5_at(qp, p, g, 5, lane) * x5
                acc[32 + lane] += _q5_at(qp, p, g, 6, lane) * x6
                acc[48 + lane] += _q5_at(qp, p, g, 7, lane) * x7
        for lane in range(PANEL):
            acc[64 + lane] += ((_as_f32(sp[p, b, lane]) * (acc[lane] - xs[t, b])
                                + _as_f32(sp[p, b + 1, lane]) * (acc[16 + lane] - xs[t, b + 1]))
                               + (_as_f32(sp[p, b + 2, lane]) * (acc[32 + lane] - xs[t, b + 2])
                                  + _as_f32(sp[p, b + 3, lane]) * (acc[48 + lane] - xs[t, b + 3])))
        b += 4
    while b < nb:  # groups after the last span of four: columns in order
        acc[:16] = 0
        for g in range(4 * b, 4 * b + 4):
            o = 8 * g
            for lane in range(PANEL):
                for r in range(8):
                    acc[lane] += _q5_at(qp, p, g, r, lane) * x[t, o + r]
        for lane in range(PANEL):
            acc[64 + lane] += _as_f32(sp[p, b, lane]) * (acc[lane] - xs[t, b])
        b += 1


@njit(parallel=True, fastmath=FAST, **JIT)
def matvec_panels5(qp, sp, hp, has_shift, x, y):
    """``_matvec_panels`` for 5-bit panels (Q5_0; no shift: ``hp``, ``has_shift`` unused)."""
    P, T, R = qp.shape[0], x.shape[0], y.shape[1]
    G, nb = 32, sp.shape[1]
    xs = np.empty((T, nb), np.float32)  # 16 times x summed per group: the offset of q
    _group_sums(x, G, f32(16), xs)
    for p in prange(P):
        acc = _lanes()
        for t in range(T):
            _panel_dot5(qp, sp, xs, x, t, p, acc)
            for lane in range(min(PANEL, R - PANEL * p)):  # the last panel: part padding
                y[t, PANEL * p + lane] = acc[64 + lane]


def matvec_panels(qp, sp, hp, has_shift, x, y):
    """``y[t] = W x[t]`` for W in panels (``w = scale * q - shift``, groups of 32 or 16);
    parallel over panels, float32 sums."""
    if qp.ndim == 4:  # 5-bit panels
        kernel = matvec_panels5
    else:
        kernel = matvec_panels_g32 if x.shape[1] // _groups(sp) == 32 else matvec_panels_g16
    kernel(qp, sp, hp, has_shift, x, y)


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


def unpacking(tensor, quantize: str | None = None, wide: bool = False
              ) -> tuple[str, Unpacking | None]:
    """The kind :class:`Packed` gives ``tensor`` (``"int8"`` when ``quantize="int8"`` applies)
    and how it is unpacked to panels; None: read as stored. ``wide``: 5-bit weights (Q5_0) in
    int8 panels, to be stacked with int8 ones (``stack_unpacking``)."""
    kind = getattr(tensor, "kind", "f32")
    if quantize == "int8" and kind in STORED and tensor.shape[1] % 32 == 0:
        return "int8", Unpacking(unpack=None, group=32, shift=False, f16_scale=False, bits=8)
    if kind in STORED:
        return kind, None
    if kind in UNPACKED:
        how = UNPACKED[kind]
        return kind, how._replace(bits=8) if wide and how.bits == 5 else how
    raise ValueError(f"no fast kernel for weights of type {kind}; load with fast=False")


def stack_unpacking(tensors: list, quantize: str | None = None) -> list[bool] | None:
    """``wide`` for each of ``tensors`` (matrices of one input) so that their panels stack
    (``stackable``): as their own types give them, else with 5-bit parts widened to int8 (the
    demo's q, k are Q5_0 and v Q8_0 in half its layers: a single matvec for the three is
    worth their few int8 bytes); None when they cannot stack."""
    for wide in (False, True):
        hows = [unpacking(t, quantize, wide) for t in tensors]
        if all(h is not None for _, h in hows) and stackable(
                [panel_format(h, *t.shape) for (_, h), t in zip(hows, tensors)],
                [t.shape[0] for t in tensors]):
            return [wide] * len(tensors)
    return None


def panel_format(how: Unpacking, rows: int, cols: int) -> tuple:
    """What panels must share to be stacked: columns, the arrays' shapes past the panel axis
    and types, the shift (``Packed.format`` of the panels ``how`` gives)."""
    return (cols, how.shift) + tuple((shape[1:], np.dtype(dtype).str) for shape, dtype
                                     in panel_arrays(how, rows, cols).values())


def panel_arrays(how: Unpacking, rows: int, cols: int) -> dict[str, tuple[tuple, type]]:
    """Shapes and types of the panels of a ``[rows, cols]`` matrix (see :class:`Packed`):
    ``q``, ``scale`` and, for weights with a shift, ``shift``."""
    P, ng = -(-rows // PANEL), cols // how.group
    q = {8: ((P, cols, PANEL), np.int8), 5: ((P, cols // 8, 5, PANEL), np.uint8),
         4: ((P, cols // 2, PANEL), np.uint8)}
    arrays = {"q": q[how.bits],
              "scale": (((P, ng // 16, 18, PANEL), np.int8) if how.super_scales  # Q6_K
                        else ((P, ng, PANEL), np.int16 if how.f16_scale else np.float32))}
    if how.shift:
        arrays["shift"] = ((P, ng, PANEL), np.float32)
    return arrays


def stackable(formats: list, rows: list[int]) -> bool:
    """Whether matrices of these ``Packed.format()`` and row counts can be one stack: all
    panels alike, and all but the last with whole panels (rows a multiple of 16)."""
    return (formats[0] is not None and all(f == formats[0] for f in formats)
            and not any(r % PANEL for r in rows[:-1]))


class Packed:
    """One weight matrix ``[rows, cols]`` in the form the kernels read.

    bf16, float16 and float32 are read as stored (``data``). GGUF blocks, and bf16/f16/f32
    with ``quantize="int8"``, become panels (see ``to_panels``): ``q`` int8 ``[P, cols, 16]``
    (uint8 ``[P, cols / 2, 16]``, two weights a byte, for Q4_K; uint8 ``[P, cols / 8, 5, 16]``,
    5 bits a weight, for Q5_0 unless ``wide``), ``scale`` (float16 bits as
    int16 for Q8_0/Q5_0/Q4_0, else float32) and, for Q4_K/Q5_K, ``shift``
    ``[P, cols / G, 16]``, where ``P = ceil(rows / 16)``; Q6_K's ``scale``: int8
    ``[P, cols / 256, 18, 16]``, sub-scales and float16 super-scales as stored.
    ``matvec(x, y)``: ``y[T, rows] = x[T, cols] W^T``; ``decode(r0, r1, out)``: rows
    ``[r0, r1)`` of W in float32, bit for bit the reference path's weights.
    """

    def __init__(self, tensor, quantize: str | None = None, out: dict | None = None,
                 wide: bool = False):
        """``out``: arrays ``q``, ``scale``, ``shift`` shaped as ``panel_arrays`` says (views
        of a panel cache file being written, zeroed) to unpack into instead of new ones;
        ``wide``: 5-bit weights in int8 panels (see ``unpacking``)."""
        kind, how = unpacking(tensor, quantize, wide)
        self.kind, self.shape = kind, tuple(tensor.shape)
        rows, cols = self.shape
        data = stored_bytes(tensor)
        if kind == "int8":
            w, tile = data.view(STORED[tensor.kind]), np.empty((min(rows, self._step()), cols),
                                                               np.float32)

            def fill(r0, r1, q, scale, shift):  # float32 rows, rounded to int8 per group of 32
                decode_stored(w, r0, r1, tile[: r1 - r0])
                quantize_int8_g32(tile[: r1 - r0], q, scale)
            self._panels(data, fill, how, out)
        elif how is None:
            self.data = data.view(STORED[kind])
        else:
            self._panels(data, lambda r0, r1, q, scale, shift: how.unpack(data[r0:r1], q, scale,
                                                                          shift), how, out)

    @classmethod
    def of_panels(cls, kind: str, shape: tuple[int, int], q, scale, shift) -> Packed:
        """A matrix over panels already laid out (a stack, a panel cache file); ``shift``
        None when the weights have none."""
        p = cls.__new__(cls)
        p.kind, p.shape, p.has_shift = kind, tuple(shape), shift is not None
        p.q, p.scale = q, scale
        p.shift = shift if shift is not None else np.zeros((1, 1, 1), np.float32)
        return p

    def _step(self) -> int:
        """Rows unpacked at a time: a multiple of 16, about ``TILE_ELEMS`` weights."""
        return max(PANEL, TILE_ELEMS // self.shape[1] // PANEL * PANEL)

    def _panels(self, data, fill, how: Unpacking, out: dict | None) -> None:
        """Panels from ``fill(r0, r1, q, scale, shift)``, which writes rows ``[r0, r1)``
        unpacked (row-major, float32 scales), a tile of rows at a time. The stored rows are
        read once: each tile's pages of a memory-mapped file then leave this process's RSS
        (the embedding lookup reads its few rows from the file again)."""
        rows, cols = self.shape
        has_shift, f16_scale = how.shift, how.f16_scale
        self.has_shift = has_shift
        if out is None:
            # zeroed for 4- and 5-bit q: to_panels ORs the bits in
            out = {k: (np.zeros if how.bits < 8 and k == "q" else np.empty)(shape, dtype)
                   for k, (shape, dtype) in panel_arrays(how, rows, cols).items()}
            for a in out.values():
                a[-1] = 0  # the last panel's rows past the matrix: weight 0
        self.q, self.scale = out["q"], out["scale"]
        self.shift = out["shift"] if has_shift else np.zeros((1, 1, 1), np.float32)
        ng = cols // how.group
        step = min(rows, self._step())
        q = np.empty((step, cols), np.int8)
        scale = np.empty((step, ng), np.float32)
        shift = np.empty((step, ng if has_shift else 1), np.float32)
        for r0 in range(0, rows, step):
            n = min(rows, r0 + step) - r0
            fill(r0, r0 + n, q[:n], scale[:n], shift[:n])
            if how.super_scales:  # Q6_K: sub-scales and super-scales as stored
                s = how.super_scales(data[r0:r0 + n])
            else:
                s = scale[:n].astype(np.float16).view(np.int16) if f16_scale else scale[:n]  # exact
            to_panels(q[:n], s, shift[:n], has_shift, r0, self.q, self.scale, self.shift)
            release_pages(data[r0:r0 + n])

    def format(self) -> tuple | None:
        """What panels must share to be stacked (``stacked``); None if read as stored."""
        if self.kind in STORED:
            return None
        arrays = (self.q, self.scale, self.shift)[:2 + self.has_shift]
        return (self.shape[1], self.has_shift) + tuple((a.shape[1:], a.dtype.str) for a in arrays)

    @classmethod
    def stacked(cls, parts: list[Packed]) -> Packed | None:
        """Matrices of one input (q, k, v; gate, up) stacked into one, so that a single matvec
        reads them all. Each part's arrays are rebound to views of its rows of the stack, so
        that the panels are not kept twice. None (and the parts left alone) unless all are
        panels alike (``format``: columns, groups, value and scale types, shift) and all but
        the last have whole panels (rows a multiple of 16)."""
        if not stackable([p.format() for p in parts], [p.shape[0] for p in parts]):
            return None
        first = parts[0]
        stack = cls.of_panels("+".join(sorted({p.kind for p in parts})),
                              (sum(p.shape[0] for p in parts), first.shape[1]),
                              np.concatenate([p.q for p in parts]),
                              np.concatenate([p.scale for p in parts]),
                              np.concatenate([p.shift for p in parts]) if first.has_shift
                              else None)
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
