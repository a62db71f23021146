"""Stepping through a forward pass: the names ``model.trace(ids)`` records, and layer diffs.

``model.trace(ids)`` returns a dict with, in order of computation::

    embed                          [T, D]     scaled token embeddings
    layers.{i}.attn_norm           [T, D]     pre-attention RMSNorm output
    layers.{i}.q / k / v           [H|K, T, d] after QK-norm and RoPE (v: no RoPE)
    layers.{i}.attn_probs          [H, T, T]  softmax(q k^T * scale + mask)
    layers.{i}.attn_out            [T, D]     attention output after the o projection
    layers.{i}.post_attn_norm      [T, D]     Gemma 2/3 sandwich norm of attn_out
    layers.{i}.resid_attn          [T, D]     residual stream after the attention sub-layer
    layers.{i}.mlp_norm            [T, D]     pre-MLP RMSNorm output
    layers.{i}.gate / up           [T, F]     the two GeGLU projections (gate before GELU)
    layers.{i}.mlp_out             [T, D]     MLP output after the down projection
    layers.{i}.post_mlp_norm       [T, D]     Gemma 2/3 sandwich norm of mlp_out
    layers.{i}.resid_mlp           [T, D]     residual stream after the block (the layer output)
    final_norm                     [T, D]
    logits                         [T, V]
"""

from __future__ import annotations

import numpy as np

# How far our float32 forward may sit from transformers' float32 forward, as a fraction of the
# largest reference value: max|ours - theirs| <= PARITY_RTOL * max|theirs|. Measured on the real
# Gemma 3 270M (the five prompts of tests/fixtures/demo_ref.npz, 6 to 2056 tokens): at most
# 4e-6 of the scale, the rounding of two summation orders, so 1e-4 leaves 25x of headroom. The
# subtlest real mistakes land above it on the same model: the erf GELU where Gemma uses the
# tanh approximation gives 4.6e-4, sqrt(D) rounded to bfloat16 6.1e-4; 1e-3 would pass both.
PARITY_RTOL = 1e-4

SUBLAYER_NAMES = ("attn_norm", "q", "k", "v", "attn_probs", "attn_out", "post_attn_norm",
                  "resid_attn", "mlp_norm", "gate", "up", "mlp_out", "post_mlp_norm", "resid_mlp")


def hidden_state_names(num_layers: int) -> list[str]:
    """Our names for transformers' ``hidden_states``: the embeddings, the output of every layer
    but the last, then the last layer's output after the final norm (``L + 1`` entries)."""
    return ["embed"] + [f"layers.{i}.resid_mlp" for i in range(num_layers - 1)] + ["final_norm"]


def layer_diffs(tape: dict[str, np.ndarray], reference: np.ndarray,
                num_layers: int) -> list[tuple[str, float, float]]:
    """``(name, max|ours - reference|, max|reference|)`` along the residual stream.

    ``reference`` is ``[L + 1, T, D]``, transformers' ``output_hidden_states``.
    """
    names = hidden_state_names(num_layers)
    return [(n, float(np.max(np.abs(tape[n] - ref))), float(np.max(np.abs(ref))))
            for n, ref in zip(names, reference)]


def first_drift(tape: dict[str, np.ndarray], reference: np.ndarray, num_layers: int,
                rtol: float = PARITY_RTOL) -> str:
    """A report naming the first intermediate whose error exceeds ``rtol`` of its scale."""
    rows = layer_diffs(tape, reference, num_layers)
    lines = [f"  {n:24s} max|Δ| {d:.3g}  (scale {s:.3g})" for n, d, s in rows]
    bad = next((n for n, d, s in rows if d > rtol * max(s, 1e-30)), None)
    head = f"first drifting intermediate: {bad}" if bad else "no intermediate drifts"
    return "\n".join([head, *lines])
