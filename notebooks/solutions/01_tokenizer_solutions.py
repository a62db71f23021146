"""Solutions to the exercises of chapter 01 (the tokenizer). Run by the hidden last cell of
01_tokenizer.ipynb."""

import numpy as np

from tinygemma import layers as L


def byte_fallback(tok, chars="ꙮ☃ŉ🧬𓀀ᚠ"):
    """1. The characters that become byte pieces (as many as their UTF-8 bytes), and when a
    streamed character appears: only at its last byte (the decoder holds the others back)."""
    fallback = {}
    for c in chars:
        ids = tok.encode(c, add_bos=False)
        if all(tok.id_to_piece(i).startswith("<0x") for i in ids):
            assert len(ids) == len(c.encode("utf-8"))
            fallback[c] = ids
    c, ids = next(iter(fallback.items()))
    dec = tok.stream_decoder()
    outputs = [dec.push(i) for i in ids]  # '' until the last byte, then the character
    return fallback, outputs


def digits(tok):
    """2. One token per digit (and per '.' or ','): 17 tokens for pi to 15 decimals, 9 for
    1,000,000. Every number is spelled the same way digit by digit, so the model can learn
    column-wise arithmetic; the price is longer sequences for numbers."""
    return {s: len(tok.encode(s, add_bos=False)) for s in ["3.141592653589793", "1,000,000"]}


def double_bos(model, messages):
    """3. encode(string) adds a BOS in front of the string's own '<bos>': two of them.
    encode(string, add_bos=False) gives exactly apply_chat_template's ids."""
    tok = model.tokenizer
    s = tok.apply_chat_template(messages, tokenize=False)
    twice = tok.encode(s)
    once = tok.encode(s, add_bos=False)
    assert once == tok.apply_chat_template(messages)
    p1 = L.softmax(model.forward(np.asarray(once), last_only=True)[0].astype(np.float64))
    p2 = L.softmax(model.forward(np.asarray(twice), last_only=True)[0].astype(np.float64))
    tv = 0.5 * float(np.abs(p1 - p2).sum())  # total variation distance between the two
    return twice.count(tok.bos_id), once.count(tok.bos_id), tv
