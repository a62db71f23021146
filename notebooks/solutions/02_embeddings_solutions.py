"""Solutions to the exercises of chapter 02 (embeddings). Run by the hidden last cell of
02_embeddings.ipynb."""

from unittest.mock import patch

import numpy as np

from tinygemma import layers as L


def to_bf16(x):
    """Round float32 values to the nearest bfloat16 (ties to even); returned as float32."""
    b = np.asarray(x, np.float32).view(np.uint32).astype(np.uint64)
    b = ((b + 0x7FFF + ((b >> 16) & 1)) >> 16) << 16
    return b.astype(np.uint32).view(np.float32)


def my_embed(E, ids):
    """Your turn: the rows of the tokens, times sqrt(D) rounded to float32 (not bf16)."""
    D = E.shape[1]  # the hidden size (E.shape[0] is the vocabulary)
    return E[ids].astype(np.float32) * np.float32(np.sqrt(D))  # [T, D]


def safe_sizes(max_d=4096):
    """1. The D whose float32 sqrt(D) survives rounding to bf16 unchanged.

    They are exactly the perfect squares: sqrt(D) of any other integer is irrational, so its
    float32 value uses all 24 significant bits (never just the 8 that bf16 keeps), while the
    integers 1..64 need at most 7 bits. 64 sizes in 1..4096.
    """
    D = np.arange(1, max_d + 1)
    s = np.sqrt(D).astype(np.float32)
    return D[to_bf16(s) == s]


def neighbours_by_dot(model, piece="▁Paris", k=8):
    """2. Nearest tokens by cosine and by plain dot product.

    The two rankings (almost) agree because every row has (almost) the same norm
    (1.028 ... 1.035 in the demo model): dividing by the norms barely changes the order.
    """
    tok, E = model.tokenizer, model.weights["embed"]
    i = tok.piece_to_id(piece)
    norms = np.linalg.norm(E, axis=1)
    dot = E @ E[i]
    cos = dot / (norms * norms[i])
    by_dot = [tok.id_to_piece(int(j)) for j in np.argsort(-dot)[1:k + 1]]
    by_cos = [tok.id_to_piece(int(j)) for j in np.argsort(-cos)[1:k + 1]]
    return by_cos, by_dot


def bf16_trap_in_probability(model, text="def fibonacci(n):"):
    """3. Largest change of the top token's probability over all positions; argmax changes."""
    ids = np.asarray(model.tokenizer.encode(text))

    def embed_bf16_factor(E, ids):
        return E[ids].astype(np.float32) * to_bf16(np.float32(np.sqrt(E.shape[1])))

    good = model.forward(ids)
    with patch.object(L, "embed", embed_bf16_factor):
        bad = model.forward(ids)
    p, q = L.softmax(good.astype(np.float64)), L.softmax(bad.astype(np.float64))
    top = p.argmax(-1)
    dp = np.abs(p[np.arange(len(ids)), top] - q[np.arange(len(ids)), top]).max()
    return float(dp), int(np.sum(p.argmax(-1) != q.argmax(-1)))
