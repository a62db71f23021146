"""Solutions to the exercises of chapter 07 (the decoder block)."""

import numpy as np

from tinygemma import layers as L


def output_layer_by_hand(model, tape):
    """1. Final RMSNorm, then the tied embedding as the output layer: logits = RMSNorm(x) E^T."""
    c, W = model.config, model.weights
    x = tape[f"layers.{c.num_layers - 1}.resid_mlp"][-1]  # [D] the last position
    h = L.rms_norm(x, W["final_norm"], c.rms_norm_eps)  # [D]
    logits = W["embed"] @ h  # [V, D] @ [D] -> [V]
    return logits, int(np.argmax(logits))


def who_writes_most(model, tape):
    """2. The layers whose MLP and attention add the largest vectors at the last position."""
    n = model.config.num_layers
    mlp = [np.linalg.norm(tape[f"layers.{i}.post_mlp_norm"][-1]) for i in range(n)]
    attn = [np.linalg.norm(tape[f"layers.{i}.post_attn_norm"][-1]) for i in range(n)]
    return int(np.argmax(mlp)), int(np.argmax(attn))


def block_parameters(c):
    """3. q, k, v, o projections + gate, up, down + 4 norms of D + QK-norms of d (Gemma 3)."""
    D, d, F = c.hidden_size, c.head_dim, c.intermediate_size
    attention = D * c.num_heads * d * 2 + D * c.num_kv_heads * d * 2  # q and o, k and v
    mlp = 3 * D * F
    norms = 4 * D + 2 * d
    return attention + mlp + norms
