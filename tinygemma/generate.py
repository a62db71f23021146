"""Text generation: KV-cache decoding, greedy and sampled (temperature, top-k, top-p), streaming.

One forward step per new token: the prompt fills a preallocated cache in one pass (prefill),
then each new token attends to the cache (decode), so a token costs one pass over the weights.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np

from .layers import softmax


def check_sampling(max_new_tokens: int, temperature: float, top_k: int | None,
                   top_p: float | None, seed: int | None = None) -> None:
    """Reject impossible sampling settings with a message naming the argument."""
    if not isinstance(max_new_tokens, (int, np.integer)) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be an integer >= 0, got {max_new_tokens!r}")
    if not np.isfinite(temperature) or temperature < 0:
        raise ValueError(f"temperature must be >= 0 (0 is greedy), got {temperature!r}")
    if top_k is not None and (not isinstance(top_k, (int, np.integer)) or top_k < 1):
        raise ValueError(f"top_k must be an integer >= 1, got {top_k!r}")
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p!r}")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, (int, np.integer))
                             or seed < 0):
        raise ValueError(f"seed must be an integer >= 0 (or None), got {seed!r}")


def next_token_probs(logits: np.ndarray, temperature: float, top_k: int | None = None,
                     top_p: float | None = None) -> np.ndarray:
    """The distribution the next token is drawn from ``[V]`` (temperature > 0).

    ``softmax(logits / temperature)`` restricted to the ``top_k`` most likely tokens, then to
    the smallest set whose probability reaches ``top_p`` (nucleus sampling, Holtzman et al.
    2019), renormalised. The largest logit is subtracted before dividing by the temperature,
    so a temperature too small for ``logits / temperature`` to be finite (1e-320) gives the
    limit, greedy (ties shared), not NaN.
    """
    z = logits.astype(np.float64)  # [V]
    with np.errstate(over="ignore"):  # a vanishing temperature sends the others to -inf
        z = (z - z.max()) / temperature  # [V] <= 0: the most likely token at 0, never inf - inf
    if top_k is not None and top_k < len(z):
        kth = np.partition(z, -top_k)[-top_k]
        z = np.where(z >= kth, z, -np.inf)  # [V]
    p = softmax(z)  # [V]
    if top_p is not None and top_p < 1:
        order = np.argsort(-p, kind="stable")  # [V] most likely first
        before = np.cumsum(p[order]) - p[order]  # probability of the tokens ranked above
        p[order[before >= top_p]] = 0  # keep a token while the ones above it fall short of top_p
        p /= p.sum()
    return p


def pick(logits: np.ndarray, temperature: float, top_k, top_p, rng: np.random.Generator) -> int:
    """Greedy at temperature 0, else a draw from :func:`next_token_probs`."""
    if temperature == 0:
        return int(np.argmax(logits))
    p = next_token_probs(logits, temperature, top_k, top_p)
    return int(rng.choice(len(p), p=p))


def generate_ids(model, ids: Sequence[int], max_new_tokens: int = 32, temperature: float = 0.0,
                 top_k: int | None = None, top_p: float | None = None, seed: int | None = None,
                 ignore_eos: bool = False, hooks: dict | None = None) -> Iterator[int]:
    """New token ids, one at a time, until ``max_new_tokens`` or a stop token.

    Stop tokens are the tokenizer's EOS and ``<end_of_turn>`` (ends a chat turn); they are not
    yielded. ``ignore_eos`` generates through them. ``hooks`` (see ``Gemma.forward``) apply at
    every forward step: the prompt's, then each new token's.
    """
    check_sampling(max_new_tokens, temperature, top_k, top_p, seed)
    ids = model.check_ids(ids, None)
    total = len(ids) + max_new_tokens
    if total > model.config.max_position_embeddings:
        raise ValueError(f"the prompt ({len(ids)} tokens) plus max_new_tokens ({max_new_tokens}) "
                         f"exceeds the context of {model.config.max_position_embeddings} tokens")
    if max_new_tokens == 0:
        return
    stop = set() if ignore_eos else set(model.tokenizer.stop_ids)
    rng = np.random.default_rng(seed)
    cache = model.new_cache(total)
    logits = model.forward(ids, cache=cache, last_only=True, hooks=hooks)[0]  # prefill: [V]
    for step in range(max_new_tokens):
        token = pick(logits, temperature, top_k, top_p, rng)
        if token in stop:
            return
        yield token
        if step + 1 < max_new_tokens:
            logits = model.forward(np.array([token]), cache=cache, last_only=True,
                                   hooks=hooks)[0]  # [V]


def prompt_ids(model, prompt) -> list[int]:
    """Token ids of a prompt given as text (BOS prepended) or as ids."""
    if isinstance(prompt, str):
        if not prompt:
            raise ValueError("the prompt is empty")
        return model.tokenizer.encode(prompt)
    ids = [int(i) for i in prompt]
    if not ids:
        raise ValueError("the prompt is empty")
    return ids


def stream(model, prompt, max_new_tokens: int = 32, temperature: float = 0.0,
           top_k: int | None = None, top_p: float | None = None, seed: int | None = None,
           ignore_eos: bool = False, hooks: dict | None = None) -> Iterator[str]:
    """Text pieces of the continuation as they are generated.

    A character spread over several byte tokens comes out whole, once its last byte arrives;
    the pieces joined are exactly ``tokenizer.decode(new_ids)``.
    """
    decoder = model.tokenizer.stream_decoder()
    for token in generate_ids(model, prompt_ids(model, prompt), max_new_tokens, temperature,
                              top_k, top_p, seed, ignore_eos, hooks):
        piece = decoder.push(token)
        if piece:
            yield piece
    tail = decoder.flush()
    if tail:
        yield tail


def generate(model, prompt, max_new_tokens: int = 32, temperature: float = 0.0,
             top_k: int | None = None, top_p: float | None = None, seed: int | None = None,
             ignore_eos: bool = False, hooks: dict | None = None) -> str:
    """The continuation only: the decode of the new ids, not stripped."""
    return "".join(stream(model, prompt, max_new_tokens, temperature, top_k, top_p, seed,
                          ignore_eos, hooks))
