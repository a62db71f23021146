"""What a compact KV cache (bfloat16, float16) costs in accuracy against the float32 cache.

    /work/venv/bin/python benchmarks/kv_accuracy.py            # the demo and a tiny random model

For each model, on the fast path (tested equal to the reference on every cache dtype):

* teacher-forced over a long text: the text goes through one KV cache per dtype in chunks of
  512 positions (as ``model.loss`` and ``tinygemma perplexity`` score it); at every position
  the largest difference of any logit from the float32 cache's, whether the top-1 token is
  the same, and the loss (mean next-token cross-entropy, nats) and its perplexity;
* greedy generation: the first 2048 tokens of the text as a prompt, then ``--new-tokens``
  greedy tokens with each cache; how many agree with the float32 cache's before the first
  difference.

The demo reads the PSF licence that ships with CPython (``LICENSE.txt`` of the standard
library, about 14 KB of English: a text every Python has, unchanged within a version). The
tiny model (``tests/tiny.py``: Gemma 3, random weights, 4 layers, 4 heads over 1 KV head of 64)
reads random token ids; its loss only measures the change.
"""

from __future__ import annotations

import argparse
import os
import sys
import sysconfig
import tempfile

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "tests"))

DTYPES = ("float32", "bfloat16", "float16")
CHUNK = 512


def licence_text() -> str:
    path = os.path.join(sysconfig.get_paths()["stdlib"], "LICENSE.txt")
    with open(path, encoding="utf-8") as f:
        return f.read()


def teacher_forced(model, ids) -> dict:
    """Per dtype: max |logit - float32's|, top-1 agreement and the loss, over ``ids``."""
    from tinygemma.evaluate import nll
    caches = {d: model.new_cache(len(ids), d) for d in DTYPES}
    diff = {d: 0.0 for d in DTYPES}
    same = {d: 0 for d in DTYPES}
    losses = {d: [] for d in DTYPES}
    scale = 0.0
    for s in range(0, len(ids) - 1, CHUNK):
        part = ids[s:min(s + CHUNK, len(ids) - 1)]  # [c]: the logits at s predict ids[s + 1]
        targets = ids[s + 1:s + 1 + len(part)]
        exact = None
        for d in DTYPES:
            logits = model.forward(part, cache=caches[d])  # [c, V]
            if exact is None:
                exact, top = logits, logits.argmax(-1)
                scale = max(scale, float(np.abs(logits).max()))
            diff[d] = max(diff[d], float(np.abs(logits - exact).max()))
            same[d] += int((logits.argmax(-1) == top).sum())
            losses[d].append(nll(logits, targets))
    n = len(ids) - 1
    return {d: {"max_logit_diff": diff[d], "logit_scale": scale, "top1_agree": same[d] / n,
                "loss": float(np.concatenate(losses[d]).mean()), "positions": n} for d in DTYPES}


def greedy(model, prompt, new_tokens: int) -> dict:
    """Per dtype: the greedy tokens after ``prompt``, and their agreement with float32's."""
    out = {}
    for d in DTYPES:
        cache = model.new_cache(len(prompt) + new_tokens, d)
        logits = model.forward(prompt, cache=cache, last_only=True)
        tokens = []
        for _ in range(new_tokens):
            tokens.append(int(np.argmax(logits[0])))
            logits = model.forward(np.array(tokens[-1:]), cache=cache, last_only=True)
        out[d] = tokens
    ref = out["float32"]
    first = {d: next((i for i, (a, b) in enumerate(zip(ref, t)) if a != b), len(ref))
             for d, t in out.items()}
    return {d: {"agree_before_first_difference": first[d], "new_tokens": new_tokens}
            for d in DTYPES}


def report(name: str, tf: dict, gr: dict, prompt_len: int) -> None:
    print(f"\n{name}: teacher-forced over {tf['float32']['positions']} positions "
          f"(largest |logit| {tf['float32']['logit_scale']:.1f}); greedy after a "
          f"{prompt_len}-token prompt")
    print("| cache | max logit diff | top-1 same | loss (nats) | perplexity | greedy tokens "
          "equal to float32's |")
    print("|---|---|---|---|---|---|")
    base = tf["float32"]["loss"]
    for d in DTYPES:
        t, g = tf[d], gr[d]
        change = "" if d == "float32" else f" ({100 * (np.exp(t['loss'] - base) - 1):+.3f}%)"
        print(f"| {d} | {t['max_logit_diff']:.3g} | {100 * t['top1_agree']:.2f}% | "
              f"{t['loss']:.5f} | {np.exp(t['loss']):.4f}{change} | "
              f"{g['agree_before_first_difference']}/{g['new_tokens']} |")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--new-tokens", type=int, default=256)
    p.add_argument("--prompt-tokens", type=int, default=2048)
    a = p.parse_args(argv)
    import tinygemma as tg
    from tiny import write_hf

    demo = tg.load_demo()
    ids = np.asarray(demo.tokenizer.encode(licence_text()), np.int64)
    prompt = ids[:a.prompt_tokens]
    report("demo (Gemma 3 270M, Q4_K_M)", teacher_forced(demo, ids),
           greedy(demo, prompt, a.new_tokens), len(prompt))
    del demo

    with tempfile.TemporaryDirectory() as tmp:
        path = write_hf(os.path.join(tmp, "tiny"), family=3, hidden_size=256,
                        intermediate_size=512, num_hidden_layers=4, num_attention_heads=4,
                        num_key_value_heads=1, head_dim=64, vocab_size=512)
        tiny = tg.load(path)
        ids = np.random.default_rng(0).integers(0, 512, 3000)
        prompt = ids[:a.prompt_tokens]
        report("tiny random Gemma 3 (tests/tiny.py)", teacher_forced(tiny, ids),
               greedy(tiny, prompt, a.new_tokens), len(prompt))
    return 0


if __name__ == "__main__":
    sys.exit(main())
