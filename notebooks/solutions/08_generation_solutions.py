"""Solutions to the exercises of chapter 08 (generation)."""

import numpy as np

from tinygemma.generate import next_token_probs


def my_next_token_probs(logits, temperature, top_k=None, top_p=None):
    """Your turn: temperature, then top-k, then top-p on what top-k kept, renormalised."""
    z = np.asarray(logits, np.float64) / temperature  # [V]
    if top_k is not None and top_k < len(z):
        z = np.where(z >= np.sort(z)[-top_k], z, -np.inf)  # the k largest logits survive
    p = np.exp(z - z.max())
    p /= p.sum()  # [V] softmax
    if top_p is not None and top_p < 1:
        order = np.argsort(-p)  # most likely first
        above = np.cumsum(p[order]) - p[order]  # probability of the tokens ranked above
        p[order[above >= top_p]] = 0  # the token that crosses top_p stays in
        p /= p.sum()
    return p


def min_p_probs(logits, temperature, min_p):
    """1. Keep tokens with p >= min_p * max(p), renormalise."""
    p = next_token_probs(logits, temperature)  # [V]
    p = np.where(p >= min_p * p.max(), p, 0.0)
    return p / p.sum()


def greedy_with_penalty(model, ids, max_new_tokens=40, penalty=1.3):
    """2. Greedy decoding with CTRL's repetition penalty on every token already in the text
    (the prompt's too). The penalty also pushes away words that should come back: names,
    "the", the subject of the text."""
    ids = [int(i) for i in ids]
    cache = model.new_cache(len(ids) + max_new_tokens)
    logits = model.forward(np.asarray(ids), cache=cache, last_only=True)[0]  # [V]: prefill
    new = []
    for step in range(max_new_tokens):
        seen = np.unique(ids + new)  # the tokens already in the text
        z = logits.copy()
        z[seen] = np.where(z[seen] > 0, z[seen] / penalty, z[seen] * penalty)  # always lower
        new.append(int(np.argmax(z)))
        if step + 1 < max_new_tokens:
            logits = model.forward(np.array(new[-1:]), cache=cache, last_only=True)[0]  # decode
    return new


def repeated_ngrams(tokens, n=4):
    """2. How many runs of n tokens already occurred earlier in the sequence."""
    seen, repeats = set(), 0
    for i in range(len(tokens) - n + 1):
        gram = tuple(tokens[i:i + n])
        repeats += gram in seen
        seen.add(gram)
    return repeats


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
