"""Solutions to the exercises of chapter 05 (attention). Run by the hidden last cell of
05_attention_mha_vs_mqa.ipynb."""

import numpy as np

import tinygemma as tg
from tinygemma.checkpoints.weights import Tensor, Weights
from tinygemma.config import SLIDING


def my_attention(q, k, v, mask, scale, cap=None):
    """Your turn: copy each key/value head for the G query heads of its group, then softmax
    attention with the mask, in float32."""
    H, K = q.shape[0], k.shape[0]
    G = H // K  # query heads per key/value head
    k, v = np.repeat(k, G, axis=0), np.repeat(v, G, axis=0)  # [H, S, d]: head h reads h // G
    scores = q @ k.transpose(0, 2, 1) * np.float32(scale)  # [H, T, S]
    if cap is not None:
        scores = cap * np.tanh(scores / cap)  # soft-cap before the mask (Gemma 2)
    scores = np.where(mask, scores, -np.inf)  # [H, T, S]: the future is unseen
    e = np.exp(scores - scores.max(axis=-1, keepdims=True))
    probs = e / e.sum(axis=-1, keepdims=True)  # [H, T, S], each row sums to 1
    return probs @ v, probs  # [H, T, d], [H, T, S]


def kv_cache_bytes(num_layers, kv_heads, head_dim, positions_per_layer, nbytes=2):
    """2 (k and v) x K x d x bytes, summed over the layers' kept positions."""
    return 2 * kv_heads * head_dim * nbytes * int(np.sum(positions_per_layer))


def local_caches():
    """1. Full vs windowed caches (bf16), in MiB.

    Gemma 2 2B at 8192: 26 layers x 8192 positions -> 832 MiB; with its 13 local layers keeping
    4096 -> 624 MiB. Demo (Gemma 3 270M) at 32768: 576 MiB; with 15 local layers keeping 512
    -> 103.5 MiB (the 3 global layers hold almost all of it).
    """
    MiB = 2 ** 20
    g2_full = kv_cache_bytes(26, 4, 256, [8192] * 26)
    g2_win = kv_cache_bytes(26, 4, 256, [4096 if i % 2 == 0 else 8192 for i in range(26)])
    demo_types = [SLIDING if (i + 1) % 6 else "full_attention" for i in range(18)]
    d_full = kv_cache_bytes(18, 1, 256, [32768] * 18)
    d_win = kv_cache_bytes(18, 1, 256, [512 if t == SLIDING else 32768 for t in demo_types])
    return {"gemma2_2b": (g2_full / MiB, g2_win / MiB), "demo": (d_full / MiB, d_win / MiB)}


def mean_pool_to_mqa(model):
    """2. An MHA model turned into MQA by averaging its key and value projection heads."""
    c = model.config
    K, d, D = c.num_kv_heads, c.head_dim, c.hidden_size
    tensors = dict(model.weights.tensors)
    for i in range(c.num_layers):
        for n in ("k", "v"):
            w = model.weights[f"layers.{i}.{n}"].reshape(K, d, D)  # [K*d, D] -> [K, d, D]
            tensors[f"layers.{i}.{n}"] = Tensor(w.mean(0))  # [d, D]
    return tg.Gemma(c.replace(num_kv_heads=1), Weights(tensors))


def pooled_logit_change(model, ids):
    """How far the logits move (relative to their scale), and how many argmaxes survive."""
    a = model.forward(ids)
    b = mean_pool_to_mqa(model).forward(ids)
    return float(np.abs(a - b).max() / np.abs(a).max()), float(np.mean(a.argmax(-1) == b.argmax(-1)))


def induction_on_random_tokens(model, n=12, seed=0, layer=5):
    """3. <bos> + r + r for random ids r: the layer's induction scores, and how often the model's
    argmax in the second copy is the next token of the repetition."""
    rng = np.random.default_rng(seed)
    r = rng.integers(1000, 200_000, n)
    ids = np.concatenate([[model.tokenizer.bos_id], r, r])
    tape = model.trace(ids)
    P = tape[f"layers.{layer}.attn_probs"]  # [H, T, T]
    second = np.arange(1 + n, 2 * n)  # queries in the second copy that have a next token
    scores = P[:, second, second - n + 1].mean(-1)  # [H]
    predicted = tape["logits"][second].argmax(-1)
    accuracy = float(np.mean(predicted == ids[second + 1]))
    return scores, accuracy
