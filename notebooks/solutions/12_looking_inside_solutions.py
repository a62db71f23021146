"""Solutions to the exercises of chapter 12 (looking inside)."""

import numpy as np

from tinygemma import lens


def previous_token_head(model, tape):
    """1. Mean attention from each query t >= 1 to key t - 1, over all layers and heads."""
    c = model.config
    best, where = -1.0, None
    for i in range(c.num_layers):
        p = tape[f"layers.{i}.attn_probs"]  # [H, T, T]
        prev = np.diagonal(p, offset=-1, axis1=1, axis2=2).mean(-1)  # [H]: p[h, t, t-1]
        h = int(np.argmax(prev))
        if prev[h] > best:
            best, where = prev[h], (i, h)
    return where


def first_layer_in_top(model, tape, target, k=10):
    """2. The first layer whose output ranks the target among the lens's top k."""
    ranks = lens.logit_lens(model, tape, targets=[target], k=1).target_ranks[:, 0]  # [L + 1]
    inside = np.nonzero(ranks[1:] < k)[0]  # row 0 is the embedding
    return int(inside[0]) if inside.size else None


def joint_ablation(model, ids, effect, good, bad, n=3):
    """3. Zero the n most harmful heads at once; compare with the sum of separate effects."""
    flat = np.argsort(effect, axis=None)[:n]  # most negative first
    heads = [tuple(int(x) for x in np.unravel_index(f, effect.shape)) for f in flat]
    base = model.forward(ids, last_only=True)[0]
    with lens.ablate_heads(model, set(heads)):
        z = model.forward(ids, last_only=True)[0]
    joint = float((z[good] - z[bad]) - (base[good] - base[bad]))
    return heads, joint, float(sum(effect[h] for h in heads))
