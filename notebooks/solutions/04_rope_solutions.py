"""Solutions to the exercises of chapter 04 (RoPE). Run by the hidden last cell of 04_rope.ipynb."""

import numpy as np

from tinygemma import layers as L


def my_rope(x, cos, sin):
    """Your turn: split-halves RoPE, x * cos + rotate_half(x) * sin."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]  # dimension i turns with dimension i + d/2
    rotated = np.concatenate([-x2, x1], axis=-1)  # rotate_half(x): [..., T, d]
    return x * cos + rotated * sin  # [..., T, d]


def relative_on_real_vectors(model, tape, shifts=(0, 1, 10, 100, 1000, 10_000, 100_000)):
    """1. The score of layer 0's last query (head 0) and first key, both moved by the same shift.

    Undo RoPE (rotate by -m theta) to get the raw vectors, then rotate them to positions
    (m + s, n + s). The score is constant up to float32 rounding of the angles m * theta_i:
    an angle near 1e5 radians has an ulp of ~0.008 rad, so by shift 1e5 the drift is visible.
    """
    c = model.config
    T, d = tape["layers.0.q"].shape[1], c.head_dim
    cos, sin = L.rope_angles(np.arange(T), d, c.rope_base(0))
    q_raw = L.rope(tape["layers.0.q"][0, -1:], cos[-1:], -sin[-1:])  # [1, d]
    k_raw = L.rope(tape["layers.0.k"][0, :1], cos[:1], -sin[:1])  # [1, d]
    m, n = T - 1, 0
    out = []
    for s in shifts:
        cq, sq = L.rope_angles(np.array([m + s]), d, c.rope_base(0))
        ck, sk = L.rope_angles(np.array([n + s]), d, c.rope_base(0))
        out.append(float((L.rope(q_raw, cq, sq) @ L.rope(k_raw, ck, sk).T)[0, 0]))
    return np.array(out)


def rope_interleaved(x, cos, sin):
    """RoPE on the pairs (2i, 2i + 1) (the layout Gemma does NOT use)."""
    d = x.shape[-1]
    c, s = cos[..., : d // 2], sin[..., : d // 2]
    even, odd = x[..., 0::2], x[..., 1::2]
    out = np.empty_like(x)
    out[..., 0::2] = even * c - odd * s
    out[..., 1::2] = even * s + odd * c
    return out


def convert_interleaved(Wq, num_heads, head_dim):
    """2. Rows of W_q [H*d, D] reordered head by head: the even rows of a head, then its odd rows.

    Then the split-halves pair (i, i + d/2) of the converted head is the interleaved pair
    (2i, 2i + 1) of the original one, and every score is unchanged.
    """
    perm = np.concatenate([np.arange(0, head_dim, 2), np.arange(1, head_dim, 2)])
    rows = np.concatenate([h * head_dim + perm for h in range(num_heads)])
    return Wq[rows]


def check_conversion(seed=0, H=2, d=16, D=24, T=7):
    """The scores of converted weights under L.rope equal the original under rope_interleaved."""
    rng = np.random.default_rng(seed)
    Wq, Wk = rng.standard_normal((2, H * d, D)).astype(np.float32)
    x = rng.standard_normal((T, D)).astype(np.float32)
    cos, sin = L.rope_angles(np.arange(T), d)
    heads = lambda y: y.reshape(T, H, d).transpose(1, 0, 2)  # [H, T, d]
    qi, ki = rope_interleaved(heads(x @ Wq.T), cos, sin), rope_interleaved(heads(x @ Wk.T), cos, sin)
    Wq2, Wk2 = convert_interleaved(Wq, H, d), convert_interleaved(Wk, H, d)
    qh, kh = L.rope(heads(x @ Wq2.T), cos, sin), L.rope(heads(x @ Wk2.T), cos, sin)
    return float(np.abs(qi @ ki.transpose(0, 2, 1) - qh @ kh.transpose(0, 2, 1)).max())


def half_precision_angles(head_dim=256, n=8192, base=10_000.0):
    """3. RoPE angles computed in float16 (inverse frequencies and products), against float32.

    float16 has 11 significant bits: between 4096 and 8192 its numbers are 4 apart, so the
    angle m * theta_0 = m of the fastest pair is off by up to 2 radians. Returns the largest
    angle error and the first position where it exceeds 0.1 radian.
    """
    i = np.arange(0, head_dim, 2)
    inv16 = (np.float16(1) / np.float16(base) ** (i.astype(np.float16) / np.float16(head_dim)))
    pos = np.arange(n)
    a16 = pos.astype(np.float16)[:, None] * inv16[None, :]  # [n, d/2] in float16
    cos32, sin32 = L.rope_angles(pos, head_dim, base)
    a32 = np.arctan2(sin32[:, : head_dim // 2], cos32[:, : head_dim // 2])
    err = np.abs(np.angle(np.exp(1j * (a16.astype(np.float64) - a32))))  # wrapped to [0, pi]
    first = int(np.argmax(err.max(-1) > 0.1))
    return float(err.max()), first
