"""Attention over the KV cache, the prefill's masked softmax, and the elementwise layers.

* ``attend_cache``: attention of a few new queries over the KV cache, multi-query aware: the
  keys and values of a shared KV head are read once for all the query heads of its group.
* ``attend_prefill``: attention of a prefill's many queries, 16 at a time, each tile only
  over the keys its queries may see, with a vectorised ``_exp``.
* ``rms_norm_rows``, ``rope_rows``, ``geglu_rows``: RMSNorm, RoPE and the GeGLU gate in one
  pass each.

Each is tested equal to its NumPy twin in ``layers.py`` (``tests/test_kernels.py``).
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from ._llvm import FAST, JIT, _as_f32, _exp, _lanes, f32

KEYS_PER_PART = 64  # decode attention: split a KV head's keys over threads from 2 x this many


@njit(inline="always")
def _first_key(p, window):
    """``layers.first_key`` for one query at ``p``; the kernels take ``window`` 0 for none."""
    return 0 if window <= 0 else max(0, p - window + 1)


# ---- attention over the KV cache -------------------------------------------------------------
@njit(inline="always", fastmath=FAST)
def _exp_span(x, lo, hi, scale, cap):
    """In place: ``x[lo:hi] = exp(x[lo:hi] * scale - m)`` with ``m`` their max, soft-capped
    first when ``cap`` > 0 (Gemma 2), and 0 outside ``[lo, hi)`` (the keys a query may not
    see). Returns ``m`` and the sum, so that the softmax is ``x / sum``; an empty span gives
    ``-inf, 0``.

    The loops run over the slice from index 0: with ``range(lo, hi)`` Numba must handle a
    negative index at every element, and the loops do not vectorise."""
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

    q ``[H, T, d]``; k, v ``[K, S, d]`` (the whole cache of one layer, float32 or compact:
    bfloat16 bits as uint16, float16 bits as int16, decoded in registers by ``_as_f32``, as
    the matvec kernels decode weights); out ``[H, T, d]``.
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
                    acc += q[kh * G + i // T, i % T, j] * _as_f32(key[j])
                e[i, s - s0] = acc
        for i in range(n):
            p = pos0 + i % T
            lo = max(first, _first_key(p, window))  # keys [lo, p] are seen
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
                        o[i, j] += w * _as_f32(val[j])
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


# ---- prefill attention: many queries ------------------------------------------------------
QUERIES = 16  # prefill attention: queries per tile, 16 accumulators of 16 lanes (as gemm.py)


@njit(inline="always", fastmath=FAST)
def _scores_tile(qt, k, kh, s, d, lo, hi):
    """``lo[16 r + l]`` (keys r = 0-7), ``hi[...]`` (8-15) = ``qt[:, l] . k[kh, s[r]]``: 16
    queries (lanes, ``qt`` their ``[d, 16]`` transpose) times 16 keys, each key's element a
    broadcast."""
    _zero(lo, hi)
    s0, s1, s2, s3, s4, s5, s6, s7 = s[0], s[1], s[2], s[3], s[4], s[5], s[6], s[7]
    s8, s9, s10, s11, s12, s13, s14, s15 = s[8], s[9], s[10], s[11], s[12], s[13], s[14], s[15]
    for j in range(d):
        _fma_tile(qt[j], _as_f32(k[kh, s0, j]), _as_f32(k[kh, s1, j]), _as_f32(k[kh, s2, j]),
                  _as_f32(k[kh, s3, j]), _as_f32(k[kh, s4, j]), _as_f32(k[kh, s5, j]),
                  _as_f32(k[kh, s6, j]), _as_f32(k[kh, s7, j]), _as_f32(k[kh, s8, j]),
                  _as_f32(k[kh, s9, j]), _as_f32(k[kh, s10, j]), _as_f32(k[kh, s11, j]),
                  _as_f32(k[kh, s12, j]), _as_f32(k[kh, s13, j]), _as_f32(k[kh, s14, j]),
                  _as_f32(k[kh, s15, j]), lo, hi)


@njit(inline="always", fastmath=FAST)
def _fma_tile(w, x0, x1, x2, x3, x4, x5, x6, x7, x8, x9, x10, x11, x12, x13, x14, x15, lo, hi):
    """``lo[16 r + l] += w[l] x_r`` (r < 8), ``hi[16 (r - 8) + l] += w[l] x_r``: 16 lanes of
    ``w`` times 16 broadcasts, into 16 accumulators kept in registers."""
    for lane in range(QUERIES):
        a = _as_f32(w[lane])
        lo[lane] += a * x0
        lo[16 + lane] += a * x1
        lo[32 + lane] += a * x2
        lo[48 + lane] += a * x3
        lo[64 + lane] += a * x4
        lo[80 + lane] += a * x5
        lo[96 + lane] += a * x6
        lo[112 + lane] += a * x7
        hi[lane] += a * x8
        hi[16 + lane] += a * x9
        hi[32 + lane] += a * x10
        hi[48 + lane] += a * x11
        hi[64 + lane] += a * x12
        hi[80 + lane] += a * x13
        hi[96 + lane] += a * x14
        hi[112 + lane] += a * x15


@njit(inline="always")
def _tile_out(lo, hi, out, rows):
    """``out[r, l]`` = the tile's sums ``lo[16 r + l]`` (r < 8), ``hi[16 (r - 8) + l]``, for
    its first ``rows`` rows."""
    for r in range(min(rows, 8)):
        for lane in range(QUERIES):
            out[r, lane] = lo[16 * r + lane]
    for r in range(8, rows):
        for lane in range(QUERIES):
            out[r, lane] = hi[16 * (r - 8) + lane]


@njit(inline="always")
def _zero(lo, hi):
    """Loops, not ``lo[:] = 0``: with a slice assignment LLVM kept the sums in memory."""
    for lane in range(128):
        lo[lane] = 0
        hi[lane] = 0


@njit(fastmath=FAST, **JIT)
def _scores(qt, k, kh, s0, e):
    """``e[m, l] = qt[:, l] . k[kh, s0 + m]``: a tile's 16 queries (``qt``, ``[d, 16]``) times
    its keys, 16 at a time. A function of its own, not inlined: inside the large kernel LLVM
    kept the sums in memory."""
    n, d = e.shape[0], qt.shape[0]
    lo, hi = _lanes(), _lanes()
    idx = np.empty(QUERIES, np.int64)
    for m0 in range(0, n, QUERIES):
        for r in range(QUERIES):  # past the last key: the last again, its scores dropped
            idx[r] = s0 + min(m0 + r, n - 1)
        _scores_tile(qt, k, kh, idx, d, lo, hi)
        _tile_out(lo, hi, e[m0:], min(QUERIES, n - m0))


@njit(fastmath=FAST, **JIT)
def _values(e, v, kh, s0, total, out):
    """``out[i, j] = sum_m e[m, i] v[kh, s0 + m, j] / total[i]`` for the tile's queries
    ``i < len(out)``: 16 dimensions of a value row (lanes) times the 16 queries' weights of
    its key, each a broadcast (see ``_scores``). Value rows are read 16 elements at a time:
    ``attend_prefill`` pads them to a multiple of 16."""
    n, d = e.shape[0], out.shape[1]
    lo, hi = _lanes(), _lanes()
    sums = np.empty((QUERIES, QUERIES), np.float32)  # [query, dimension]
    for j0 in range(0, d, QUERIES):
        _zero(lo, hi)
        for m in range(n):
            x = e[m]
            _fma_tile(v[kh, s0 + m, j0:], x[0], x[1], x[2], x[3], x[4], x[5], x[6], x[7], x[8],
                      x[9], x[10], x[11], x[12], x[13], x[14], x[15], lo, hi)
        _tile_out(lo, hi, sums, out.shape[0])
        for i in range(out.shape[0]):
            for j in range(min(QUERIES, d - j0)):  # the last 16: part padding
                out[i, j0 + j] = sums[i, j] / total[i]


@njit(fastmath=FAST, **JIT)
def _softmax(e, s0, p0, queries, first, window, scale, cap, total):
    """In place, ``e[m, i] = exp(e[m, i] * scale - max)`` over the keys ``s0 + m`` query ``i``
    (at position ``p0 + i``; past ``queries``, the last query again) may see, 0 elsewhere, and
    ``total[i]`` their sum: the softmax is ``e / total``. Down the keys, the 16 queries in
    SIMD lanes."""
    m = _lanes()  # per query: the max of its scores
    seen0, seen1 = np.empty(QUERIES, np.int64), np.empty(QUERIES, np.int64)
    for i in range(QUERIES):  # query i sees e's rows [seen0, seen1]
        p = p0 + min(i, queries - 1)
        seen0[i] = max(first, _first_key(p, window)) - s0
        seen1[i] = p - s0
        m[i] = -np.inf
        total[i] = 0
    for s in range(e.shape[0]):
        for i in range(QUERIES):
            x = e[s, i] * f32(scale)
            if cap > 0:
                x = f32(cap) * np.tanh(x / f32(cap))
            x = x if seen0[i] <= s <= seen1[i] else f32(-np.inf)
            e[s, i] = x
            m[i] = max(m[i], x)
    for s in range(e.shape[0]):
        for i in range(QUERIES):
            x = _exp(e[s, i] - m[i])  # exp(-inf) = 0: the keys not seen
            e[s, i] = x
            total[i] += x


@njit(parallel=True, fastmath=FAST, **JIT)
def attend_prefill(q, k, v, pos0, first, window, scale, cap, out):
    """``softmax(q k^T * scale) v`` for many queries (a prefill), 16 at a time.

    q ``[H, T, d]`` at positions ``pos0 + t``; k, v ``[K, S, d]`` the whole cache of one layer
    (float32, or bfloat16 / float16 bits decoded in registers, as ``attend_cache``); out
    ``[H, T, d]``. Query ``t`` sees keys ``first <= s <= pos0 + t`` and, with a ``window``
    > 0, only ``s > pos0 + t - window``; ``cap`` > 0 soft-caps the scores (Gemma 2).

    Parallel over tiles of 16 queries of one head. A tile multiplies only by the keys its
    queries may see (about half of the causal square, a band of ``window`` keys on local
    layers): its scores ``e[key, query]`` (16 queries side by side, so that the masked
    softmax runs down the keys with the queries in SIMD lanes), then ``e^T v``. Both products
    keep 16 x 16 sums in registers, as ``gemm.py`` does. The tiles of the first and the last
    queries alternate, so that each thread's contiguous share of them costs about as much.
    """
    H, T, d = q.shape
    G = H // k.shape[0]
    tiles = -(-T // QUERIES)
    if d % QUERIES:  # value rows are read 16 elements at a time: pad them with zeros
        padded = np.zeros((v.shape[0], v.shape[1], d + QUERIES - d % QUERIES), v.dtype)
        padded[:, :, :d] = v
        v = padded
    for task in prange(H * tiles):
        h, j = task % H, task // H
        b = j // 2 if j % 2 == 0 else tiles - 1 - j // 2  # first and last tiles alternate
        kh, t0 = h // G, b * QUERIES
        lo_key = max(first, _first_key(pos0 + t0, window))  # the first key the tile sees
        n = pos0 + min(T, t0 + QUERIES) - lo_key  # keys up to its last query's
        qt = np.empty((d, QUERIES), np.float32)  # the tile's queries, transposed
        for i in range(QUERIES):  # past the last query: the last again, its output dropped
            t = min(t0 + i, T - 1)
            for j2 in range(d):
                qt[j2, i] = q[h, t, j2]
        e = np.empty((n, QUERIES), np.float32)  # [keys, queries]
        _scores(qt, k, kh, lo_key, e)
        total = np.empty(QUERIES, np.float32)  # per query: the sum of its exp
        _softmax(e, lo_key, pos0 + t0, min(QUERIES, T - t0), first, window, scale, cap, total)
        _values(e, v, kh, lo_key, total, out[h, t0:t0 + QUERIES])


# ---- the elementwise layers (serial: a prefill of bf16 weights runs them beside BLAS) ------
@njit(fastmath=FAST, **JIT)
def rms_norm_rows(x, scale, eps, out):
    """``out = x / sqrt(mean(x^2) + eps) * scale`` per row of x ``[R, N]``; ``scale = 1 + w``.

    ``layers.rms_norm`` in one pass per row instead of seven NumPy operations, each of which
    costs more than the arithmetic for a decoded token's vector."""
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


@njit(inline="always", fastmath=FAST)
def _geglu(x, u):
    """``gelu_tanh(x) * u`` (``layers.geglu``) of one gate value ``x`` and up value ``u``.

    ``0.5 (1 + tanh z) = sigmoid(2z)``, so ``gelu_tanh(x) = x sigmoid(2z)`` with
    ``z = sqrt(2/pi) (x + 0.044715 x^3)``; the sigmoid comes from ``e = exp(-2|z|)``, which
    never overflows: ``1 / (1 + e)`` for ``z >= 0``, ``e / (1 + e)`` below."""
    z = f32(np.sqrt(2.0 / np.pi)) * (x + f32(0.044715) * x * x * x)
    e = _exp(f32(-2) * abs(z))
    s = (f32(1) if z >= 0 else e) / (f32(1) + e)
    return x * s * u


@njit(fastmath=FAST, **JIT)
def geglu_rows(gate, up, out):
    """``out = gelu_tanh(gate) * up`` (``layers.geglu``), vectorised (``_geglu``)."""
    for r in range(gate.shape[0]):
        for j in range(gate.shape[1]):
            out[r, j] = _geglu(gate[r, j], up[r, j])
