"""Attention over the KV cache, the prefill's masked softmax, and the elementwise layers.

* ``attend_cache``: attention of a few new queries over the KV cache, multi-query aware: the
  keys and values of a shared KV head are read once for all the query heads of its group.
* ``masked_softmax``: in a prefill, between two BLAS products, with a vectorised ``_exp``.
* ``rms_norm_rows``, ``rope_rows``, ``geglu_rows``: RMSNorm, RoPE and the GeGLU gate in one
  pass each.

Each is tested equal to its NumPy twin in ``layers.py`` (``tests/test_kernels.py``).
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from ._llvm import FAST, JIT, _as_f32, _exp, f32

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
        lo = max(first, _first_key(p, window)) - first
        _, total = _exp_span(scores[row], lo, p - first + 1, scale, cap)  # keys [lo, p] are seen
        seen = scores[row, lo:p - first + 1]
        for s in range(seen.shape[0]):
            seen[s] = seen[s] / total


# ---- the elementwise layers (serial: in a prefill they run beside BLAS's threads) ---------
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
