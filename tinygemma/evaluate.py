"""The loss: how surprised the model is by a text, in nats per token.

The cross-entropy of a text is the mean over its positions of ``-log p(next token | the tokens
before it)``: the quantity a language model's training lowers. Its exponential, the perplexity,
is the number of equally likely tokens the model is, on average, choosing between.

    loss = model.loss(ids)                # mean next-token cross-entropy (transformers' labels=ids)
    ppl = tg.perplexity(model, text)      # exp(loss) of the text, BOS first
    for nll in token_nll(model, ids):     # -log p of ids[1:], a chunk of positions at a time
        ...

A text longer than the model's context is scored in windows, as in the Hugging Face guide
"Perplexity of fixed-length models" (https://huggingface.co/docs/transformers/perplexity):
windows of ``window`` tokens start every ``stride`` tokens, and each window scores only the
tokens no earlier window scored, so every token is predicted once, from at least
``window - stride`` tokens of context (all before it in the first window). The default window
is the model's whole context and the default stride half of it; a text that fits in the context
is one window, the exact loss.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

CHUNK = 512  # positions per forward call: bounds the [chunk, vocab] logits (0.5 GB for 262144)


def nll(logits: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """``-log softmax(logits)[t, targets[t]]`` per row, in float64: ``[T, V], [T] -> [T]``.

    The log-softmax is ``z - max(z) - log(sum(exp(z - max(z))))``: subtracting the max keeps
    ``exp`` from overflowing. Float64 so that the sum over 262144 entries adds no rounding
    of its own to the float32 logits.
    """
    z = np.asarray(logits, np.float64)  # [T, V]
    top = z.max(axis=-1)  # [T]
    log_z = top + np.log(np.exp(z - top[:, None]).sum(axis=-1))  # [T]: log of the softmax's denominator
    return log_z - z[np.arange(len(targets)), targets]  # [T]


def token_nll(model, ids, window: int | None = None, stride: int | None = None,
              chunk: int = CHUNK) -> Iterator[np.ndarray]:
    """Yield ``-log p(ids[t] | ids[:t])`` for t = 1 .. T-1 in order, a chunk of positions at a time.

    Windows of ``window`` tokens (default: the model's context) every ``stride`` tokens (default
    ``window // 2``), scored as described in the module docstring. Within a window the positions
    go through one KV cache ``chunk`` at a time, so the logits in memory stay ``[chunk, vocab]``;
    the context a window shares with the previous one is run for its keys and values only.
    """
    ids = np.asarray(ids)
    if ids.ndim != 1 or len(ids) < 2:
        raise ValueError(f"the loss needs a 1-D sequence of at least 2 token ids (one to predict "
                         f"from, one to predict), got shape {ids.shape}")
    context = model.config.max_position_embeddings
    window = context if window is None else int(window)
    stride = window // 2 if stride is None else int(stride)
    if not 2 <= window <= context:
        raise ValueError(f"window must be in [2, {context}] (the model's context), got {window}")
    if not 1 <= stride <= window - 1:
        raise ValueError(f"stride must be in [1, window - 1 = {window - 1}], got {stride}")
    scored = 1  # the next position to score: position 0 has nothing before it
    for begin in range(0, len(ids), stride):
        end = min(begin + window, len(ids))
        part = model.check_ids(ids[begin:end], None)  # [n]: this window, checked
        first = scored - begin  # the first position of the window not scored yet (>= 1)
        cache = model.new_cache(len(part) - 1)
        for s in range(0, first - 1, chunk):  # context already scored: keys and values only
            model.forward(part[s:min(s + chunk, first - 1)], cache=cache, last_only=True)
        for s in range(first - 1, len(part) - 1, chunk):  # the logits at s predict part[s + 1]
            inputs = part[s:min(s + chunk, len(part) - 1)]  # [c]
            yield nll(model.forward(inputs, cache=cache), part[s + 1:s + 1 + len(inputs)])  # [c]
        scored = end
        if end == len(ids):
            return


def perplexity(model, text: str, window: int | None = None, stride: int | None = None) -> float:
    """``exp`` of the mean next-token cross-entropy of ``text``, encoded with BOS first.

    A text longer than ``window`` tokens (default: the context) is scored in strided windows
    (see :func:`token_nll`); a text within it gives ``exp(model.loss(ids))``.
    """
    ids = model.tokenizer.encode(text)  # BOS first
    return float(np.exp(np.concatenate(list(token_nll(model, ids, window, stride))).mean()))
