"""Solutions to the exercises of chapter 08 (generation)."""

import numpy as np

from tinygemma.generate import next_token_probs


def min_p_probs(logits, temperature, min_p):
    """1. Keep tokens with p >= min_p * max(p), renormalise."""
    p = next_token_probs(logits, temperature)  # [V]
    p = np.where(p >= min_p * p.max(), p, 0.0)
    return p / p.sum()


def kv_cache_bytes(config, tokens, bytes_per_value=4):
    """2. Keys and values, per layer, per KV head, per position, per head dimension."""
    return 2 * config.num_layers * config.num_kv_heads * tokens * config.head_dim * bytes_per_value


def entropy_along(model, prompt_ids, new_ids):
    """3. Entropy (bits) of the next-token distribution before each new token."""
    seq = np.concatenate([prompt_ids, new_ids])
    logits = model.forward(seq)[len(prompt_ids) - 1:-1]  # [N, V]: the steps that chose new_ids
    out = []
    for z in logits:
        p = next_token_probs(z, 1.0)
        p = p[p > 0]
        out.append(float(-(p * np.log2(p)).sum()))
    return np.array(out)
