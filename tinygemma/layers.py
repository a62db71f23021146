"""The components of Gemma as pure NumPy functions: no I/O, no globals.

This is the reference path: every function computes in float32 exactly the way Hugging Face
transformers does, so that the logits match it. The fast path (``kernels/``) is tested equal
to these functions.

Shape legend: ``T`` tokens, ``S`` key positions, ``D`` hidden size, ``H`` query heads,
``K`` key/value heads, ``G = H / K`` query heads per KV head, ``d`` head_dim, ``F`` MLP width,
``V`` vocabulary.

Papers: Gemma (Gemma Team, 2024), RoFormer (Su et al., 2021, RoPE), "Fast Transformer Decoding:
One Write-Head is All You Need" (Shazeer, 2019, MQA), GQA (Ainslie et al., 2023), "GLU Variants
Improve Transformer" (Shazeer, 2020, GeGLU), RMSNorm (Zhang & Sennrich, 2019), Gemma 2 and
Gemma 3 technical reports (soft-capping, sandwich norms, local attention, QK-norm).
"""

from __future__ import annotations

import numpy as np

f32 = np.float32  # the activation dtype of the reference path


def embed(E: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """Token embedding scaled by ``sqrt(D)`` (Gemma paper, section 2).

    ``x = E[ids] * sqrt(D)``. The factor is rounded to float32 (the activation dtype), as
    transformers does; rounding it to bf16 instead (sqrt(2048) = 45.25 -> 45.25, but
    sqrt(3072) = 55.43 -> 55.5) is a known trap that shifts every activation.
    """
    x = E[ids].astype(f32)  # [T, D]
    return x * f32(np.sqrt(E.shape[1]))  # [T, D]


def rms_norm(x: np.ndarray, w: np.ndarray, eps: float = 1e-6) -> np.ndarray:
    """RMSNorm with Gemma's ``(1 + w)`` scale, in float32.

    ``y = x / sqrt(mean(x^2) + eps) * (1 + w)``: the stored weight ``w`` is a zero-centred
    offset, so a freshly initialised norm is the identity scale.
    """
    x = x.astype(f32)  # [..., N]
    ms = np.mean(x * x, axis=-1, keepdims=True)  # [..., 1]
    return x / np.sqrt(ms + f32(eps)) * (f32(1) + w.astype(f32))  # [..., N]


def rope_angles(positions: np.ndarray, head_dim: int, base: float = 10_000.0,
                scale: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """cos and sin of the RoPE angles ``m * theta_i``, ``theta_i = base^(-2i/d)`` (RoFormer eq. 15).

    Computed in float32 exactly as transformers does (inverse frequencies and their products
    with the positions in float32): a lower precision visibly moves the logits at long range.
    ``scale`` is linear position interpolation (Gemma 3 global layers on 4B and up).
    """
    i = np.arange(0, head_dim, 2, dtype=f32)  # [d/2]
    inv_freq = f32(1) / (f32(base) ** (i / f32(head_dim)))  # [d/2]
    inv_freq = inv_freq / f32(scale)  # [d/2]
    angles = positions.astype(f32)[:, None] * inv_freq[None, :]  # [T, d/2]
    angles = np.concatenate([angles, angles], axis=-1)  # [T, d]: the same angle for both halves
    return np.cos(angles), np.sin(angles)  # [T, d], [T, d]


def rope(x: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
    """Rotary position embedding, split-halves layout (``rotate_half``, as in Gemma and NeoX).

    Dimension ``i`` is paired with dimension ``i + d/2`` (NOT with its neighbour ``i + 1`` as in
    the interleaved layout): ``x' = x * cos + rotate_half(x) * sin``.
    """
    half = x.shape[-1] // 2
    rotated = np.concatenate([-x[..., half:], x[..., :half]], axis=-1)  # [..., T, d]
    return x * cos + rotated * sin  # [..., T, d]


def softcap(x: np.ndarray, cap: float) -> np.ndarray:
    """Logit soft-capping (Gemma 2): ``cap * tanh(x / cap)`` keeps logits within (-cap, cap)."""
    return f32(cap) * np.tanh(x / f32(cap))


def first_key(q_pos, window: int | None):
    """The first key position a query at ``q_pos`` sees (positions: an int or an array).

    0 on a global layer (``window`` None); a sliding window of ``W`` holds ``W`` keys
    including the current one, so there ``q - W + 1`` (never below 0). The one rule of which
    keys a query sees: :func:`causal_mask` is built on it and the KV cache is read from here on.
    """
    if window is None:
        return np.zeros_like(q_pos)
    return np.maximum(np.asarray(q_pos) - window + 1, 0)


def causal_mask(q_pos: np.ndarray, k_pos: np.ndarray, window: int | None = None) -> np.ndarray:
    """Which keys each query may see: from its :func:`first_key` up to its own position.

    On a sliding-window layer that is ``q - W < k <= q``; on a global one every ``k <= q``.
    """
    q, k = np.asarray(q_pos)[:, None], np.asarray(k_pos)[None, :]  # [T, 1], [1, S]
    return (first_key(q, window) <= k) & (k <= q)  # [T, S]


def softmax(x: np.ndarray) -> np.ndarray:
    """Softmax over the last axis, in float32, stable (the max is subtracted)."""
    e = np.exp(x - np.max(x, axis=-1, keepdims=True))
    return e / np.sum(e, axis=-1, keepdims=True)


def attention(q: np.ndarray, k: np.ndarray, v: np.ndarray, mask: np.ndarray, scale: float,
              cap: float | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Scaled dot-product attention for MHA, MQA and GQA in one function.

    ``softmax(q k^T * scale + mask) v``. The ``H`` query heads are split into ``K`` groups of
    ``G = H / K``; every group reads one key/value head. ``K = 1`` is multi-query attention
    (Gemma 1 2B, Gemma 3 270M and 1B), ``K = H`` multi-head (Gemma 1 7B), in between
    grouped-query (Gemma 2, Gemma 3 4B and up).
    Returns the output ``[H, T, d]`` and the attention probabilities ``[H, T, S]``.
    """
    H, T, d = q.shape
    K, S, _ = k.shape
    qg = q.reshape(K, (H // K) * T, d)  # [K, G*T, d]: the G heads sharing a KV head
    scores = qg @ k.transpose(0, 2, 1) * f32(scale)  # [K, G*T, S]
    if cap is not None:
        scores = softcap(scores, cap)  # [K, G*T, S] (Gemma 2)
    scores = np.where(np.tile(mask, (H // K, 1)), scores, -np.inf)  # [K, G*T, S]
    probs = softmax(scores).reshape(H, T, S)  # [H, T, S]
    return weigh_values(probs, v), probs  # [H, T, d], [H, T, S]


def weigh_values(probs: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Each query's average of the values, weighted by its attention probabilities: ``probs v``.

    ``probs [H, T, S]``, ``v [K, S, d]``: the ``G = H / K`` heads of a group read one KV head.
    """
    H, T, S = probs.shape
    K, _, d = v.shape
    out = probs.reshape(K, (H // K) * T, S) @ v  # [K, G*T, d]
    return out.reshape(H, T, d)  # [H, T, d]


def gelu_tanh(x: np.ndarray) -> np.ndarray:
    """GELU, tanh approximation: ``0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))``.

    Gemma always uses this approximation, even where an old config.json says ``"gelu"``.
    """
    c = f32(np.sqrt(2.0 / np.pi))
    return f32(0.5) * x * (f32(1) + np.tanh(c * (x + f32(0.044715) * x * x * x)))


def geglu(gate: np.ndarray, up: np.ndarray) -> np.ndarray:
    """The GeGLU gate (Shazeer 2020): ``gelu_tanh(x W_gate^T) * (x W_up^T)``.

    The MLP is ``down(geglu(gate(x), up(x)))``: the GELU of one projection gates the other.
    """
    return gelu_tanh(gate) * up  # [T, F]


def linear(x: np.ndarray, w: np.ndarray) -> np.ndarray:
    """A bias-free linear layer; weights are stored ``[out, in]`` as in the checkpoints."""
    return x @ w.T  # [T, in] -> [T, out]

