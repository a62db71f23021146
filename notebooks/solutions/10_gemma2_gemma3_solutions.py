"""Solutions to the exercises of chapter 10 (Gemma 2 and Gemma 3)."""

import numpy as np

import tinygemma as tg


def softcap_off(g2, ids):
    """1. tanh is increasing, so capping keeps the order of the logits: the argmax is the same."""
    capped = g2.forward(ids)
    uncapped = tg.Gemma(g2.config.replace(final_logit_softcap=None), g2.weights).forward(ids)
    changed = int(np.sum(capped.argmax(-1) != uncapped.argmax(-1)))
    return changed, float(np.abs(capped - uncapped).max())


def reach(g3, length=200, seed=0):
    """2. With only local layers a token reaches W - 1 positions further back per layer.

    Changing every token before position j leaves the last logits unchanged exactly when j is
    out of reach, and that is monotone in j: a binary search finds the first position in reach.
    """
    c = g3.config.replace(layer_types=("sliding_attention",) * g3.config.num_layers)
    local = tg.Gemma(c, g3.weights)
    rng = np.random.default_rng(seed)
    ids = np.concatenate([[2], rng.integers(3, c.vocab_size, length - 1)])
    last = local.forward(ids, last_only=True)

    def unchanged_before(j):  # replace tokens 1 .. j-1 (position 0 is BOS)
        changed = ids.copy()
        changed[1:j] = np.where(ids[1:j] == 3, 4, 3)
        return np.array_equal(local.forward(changed, last_only=True), last)

    lo, hi = 1, length  # unchanged_before(lo) holds (nothing changed); find the largest such j
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if unchanged_before(mid):
            lo = mid
        else:
            hi = mid - 1
    first = lo  # tokens before `first` do not matter; the one at `first` does
    return first, length - 1 - c.num_layers * (c.sliding_window - 1)


def wavelengths(head_dim, bases, context):
    """3. The wavelength of pair i is 2 pi base^(2i/d); the longest is the last pair."""
    i = np.arange(head_dim // 2)
    longest, n_long = {}, {}
    for base in bases:
        w = 2 * np.pi * base ** (2 * i / head_dim)
        longest[base] = float(w[-1])
        n_long[base] = int(np.sum(w > context))
    return longest, n_long
