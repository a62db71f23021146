"""Solutions to the exercises of chapter 03 (RMSNorm). Run by the hidden last cell of
03_rmsnorm.ipynb."""

from unittest.mock import patch

import numpy as np

from tinygemma import layers as L


def my_rms_norm(x, w, eps=1e-6):
    """Your turn: RMSNorm with Gemma's (1 + w) scale, in float32, over the last axis."""
    x = x.astype(np.float32)  # [..., N]
    rms = np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + np.float32(eps))  # [..., 1]
    return x / rms * (1 + w.astype(np.float32))  # [..., N]


def eps_threshold(eps=1e-6, shrink=0.01):
    """1. With RMS r the output is multiplied by r / sqrt(r^2 + eps) = 1 / sqrt(1 + eps / r^2).

    It falls below 1 - shrink when eps / r^2 > 1 / (1 - shrink)^2 - 1, i.e. for
    r < sqrt(eps / (1 / (1 - shrink)^2 - 1)) = 7.0e-3 for eps = 1e-6 and 1 %.
    Returns the threshold and the shrinkage measured with L.rms_norm just below and above it.
    """
    r = np.sqrt(eps / (1 / (1 - shrink) ** 2 - 1))
    x = np.ones(64, np.float32)
    w = np.zeros(64, np.float32)
    measured = [float(1 - L.rms_norm(x * np.float32(s), w, eps)[0]) for s in (0.9 * r, 1.1 * r)]
    return float(r), measured


def one_added_twice(model, text="The capital of France is"):
    """2. Scale 2 + w instead of 1 + w (the GGUF value used as w). The prediction is lost.

    The relative error of a scale is (2 + w) / (1 + w) - 1 = 1 / (1 + w): large where |1 + w|
    is small (the QK-norms, ~1.5-2.5: +40-65 %; the first post-norms, below 1), negligible
    where it is large (deep post-norms, 100-300: under 1 %).
    """
    def rms_norm_twice(x, w, eps=1e-6):
        x = x.astype(np.float32)
        ms = np.mean(x * x, axis=-1, keepdims=True)
        return x / np.sqrt(ms + np.float32(eps)) * (np.float32(2) + w.astype(np.float32))

    tok, W, c = model.tokenizer, model.weights, model.config
    ids = np.asarray(tok.encode(text))
    with patch.object(L, "rms_norm", rms_norm_twice):
        logits = model.forward(ids, last_only=True)[0]
    top = tok.id_to_piece(int(np.argmax(logits)))
    rel = {n: float(np.median([1 / np.median(np.abs(1 + W[f"layers.{i}.{n}"]))
                               for i in range(c.num_layers)]))
           for n in ["attn_norm", "post_attn_norm", "mlp_norm", "post_mlp_norm", "q_norm", "k_norm"]}
    return top, rel


def unit_post_norm(model, tape):
    """3. What an untrained (w = 0) post-norm would let the attention sub-layer add, per layer,
    relative to the size of the residual stream it is added to.

    A unit-scale RMSNorm output has RMS 1, while the stream grows to RMS ~1000: deep layers
    would add almost nothing (ratio ~1e-3). The learned scales grow with depth to keep the
    contributions in proportion.
    """
    c = model.config
    rms = lambda a: float(np.sqrt(np.mean(a.astype(np.float64) ** 2)))
    zero = np.zeros(c.hidden_size, np.float32)
    unit = [rms(L.rms_norm(tape[f"layers.{i}.attn_out"], zero, c.rms_norm_eps)) /
            rms(tape[f"layers.{i}.resid_attn"]) for i in range(c.num_layers)]
    learned = [rms(tape[f"layers.{i}.post_attn_norm"]) / rms(tape[f"layers.{i}.resid_attn"])
               for i in range(c.num_layers)]
    return np.array(unit), np.array(learned)
