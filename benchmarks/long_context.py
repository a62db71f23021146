"""Decode speed and memory with a long KV cache, float32 against bfloat16.

    # the demo at 4000 tokens of context, both caches side by side in one process:
    /work/venv/bin/python benchmarks/long_context.py --ab --positions 4000 --rounds 7
    # Gemma-7B-shaped bf16 checkpoint (make_2b_checkpoint.py --shape 7b) at 8192 positions,
    # one process per cache dtype (peak RSS is the process's):
    /work/venv/bin/python benchmarks/long_context.py --model /tmp/gemma-7b-shaped \\
        --positions 8192 --kv-dtype bfloat16 --fill copy --new-tokens 8

``--fill prefill`` (the default) runs the prompt of ``--positions`` tokens through the model.
``--fill copy`` runs only ``--prompt-tokens`` real tokens and fills the rest of the cache with
copies of their key and value rows (prefilling 8192 tokens through a 7B on 2 cores would take
20+ minutes): the attention then reads a full cache of real-looking rows, which is what
decode's speed and memory depend on; the tokens it picks mean nothing.

``--ab`` fills one float32 cache, copies it into a bfloat16 one (rounded), and then decodes
``--new-tokens`` from the same position with each, alternating which goes first, for
``--rounds`` rounds: the machine's drift hits both alike. Prints each round's tokens/s, the
medians and the per-round ratios.

Without ``--ab``: one cache of ``--kv-dtype``, then peak RSS (VmHWM), its anonymous and
file-backed parts (the cache and the memory-mapped weights), MemAvailable at the start, and
decode tokens/s. A cache that with the weights cannot fit is refused before it is allocated
(``tinygemma.errors.NotEnoughMemory``); the message is printed and the exit status is 3.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))


def status(field: str) -> int:
    """A ``/proc/self/status`` field in bytes (VmHWM, RssAnon, RssFile)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    return 0


def fill(model, cache, ids, how: str, prompt_tokens: int) -> None:
    """Bring ``cache`` to ``len(ids)`` positions: a real prefill, or a short one and copies."""
    if how == "prefill":
        for s in range(0, len(ids), 512):
            model.forward(ids[s:s + 512], cache=cache, last_only=True)
        return
    model.forward(ids[:prompt_tokens], cache=cache, last_only=True)
    n = len(ids)
    for i in range(model.config.num_layers):
        k, v = cache.read(i, 0, prompt_tokens)  # [K, p, d] float32
        reps = -(-(n - prompt_tokens) // prompt_tokens)
        k = np.tile(k, (1, reps, 1))[:, :n - prompt_tokens]  # [K, n - p, d]
        v = np.tile(v, (1, reps, 1))[:, :n - prompt_tokens]
        cache.write(i, prompt_tokens, k, v)
    cache.pos = n


def decode(model, cache, start: int, new_tokens: int) -> float:
    """Tokens/s of ``new_tokens`` greedy steps from position ``start``."""
    cache.pos = start
    logits = model.forward(np.array([1]), cache=cache, last_only=True)
    t0 = time.perf_counter()
    for _ in range(new_tokens):
        logits = model.forward(np.array([int(np.argmax(logits[0]))]), cache=cache,
                               last_only=True)
    return new_tokens / (time.perf_counter() - t0)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="checkpoint folder or .gguf (default: the demo)")
    p.add_argument("--positions", type=int, default=4000, help="positions in the cache")
    p.add_argument("--new-tokens", type=int, default=32, help="tokens decoded per measurement")
    p.add_argument("--kv-dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--fill", default="prefill", choices=["prefill", "copy"])
    p.add_argument("--prompt-tokens", type=int, default=64, help="real tokens with --fill copy")
    p.add_argument("--ab", action="store_true", help="float32 and bfloat16 side by side")
    p.add_argument("--rounds", type=int, default=5)
    a = p.parse_args(argv)

    import tinygemma as tg
    from tinygemma.bench import benchmark_prompt
    from tinygemma.errors import NotEnoughMemory
    from tinygemma.kv_cache import available_memory

    free = available_memory()
    t0 = time.perf_counter()
    model = tg.load(a.model) if a.model else tg.load_demo()
    print(f"model {a.model or 'demo Gemma 3 270M'}: weights {model.weights.nbytes / 1e9:.2f} GB; "
          f"MemAvailable {free / 1e9:.2f} GB at the start; {model.threads} threads; load "
          f"{time.perf_counter() - t0:.1f} s", flush=True)
    total = a.positions + a.new_tokens + 1
    ids = benchmark_prompt(model, a.positions)
    if not a.ab:
        try:
            cache = model.new_cache(total, a.kv_dtype)
        except NotEnoughMemory as e:
            print(f"refused ({type(e).__name__}): {e}")
            return 3
        t0 = time.perf_counter()
        fill(model, cache, ids, a.fill, a.prompt_tokens)
        print(f"cache: {a.kv_dtype}, {cache.max_len} positions, {cache.nbytes / 1e9:.3f} GB "
              f"when full; filled to {cache.pos} ({a.fill}) in {time.perf_counter() - t0:.1f} s",
              flush=True)
        rate = decode(model, cache, a.positions, a.new_tokens)
        print(f"decode at position {a.positions}: {rate:.3f} tokens/s over {a.new_tokens} "
              f"tokens")
        print(f"peak RSS {status('VmHWM') / 1e9:.2f} GB (now: anonymous "
              f"{status('RssAnon') / 1e9:.2f} GB, file-backed {status('RssFile') / 1e9:.2f} GB)")
        return 0

    exact = model.new_cache(total, "float32")
    fill(model, exact, ids, a.fill, a.prompt_tokens)
    compact = model.new_cache(total, "bfloat16")
    for i in range(model.config.num_layers):
        compact.write(i, 0, *exact.read(i, 0, a.positions))
    caches = {"float32": exact, "bfloat16": compact}
    decode(model, exact, a.positions, 2)  # warm-up: both kernels loaded
    decode(model, compact, a.positions, 2)
    rates = {d: [] for d in caches}
    for r in range(a.rounds):
        order = list(caches) if r % 2 == 0 else list(caches)[::-1]
        for d in order:
            rates[d].append(decode(model, caches[d], a.positions, a.new_tokens))
        print(f"round {r + 1}: " + ", ".join(f"{d} {rates[d][-1]:.1f}" for d in caches) +
              f" tokens/s; bfloat16 / float32 {rates['bfloat16'][-1] / rates['float32'][-1]:.3f}",
              flush=True)
    ratios = np.array(rates["bfloat16"]) / np.array(rates["float32"])
    print(f"decode at {a.positions} positions, {a.new_tokens} tokens per round, {a.rounds} "
          f"rounds: float32 median {np.median(rates['float32']):.1f}, bfloat16 median "
          f"{np.median(rates['bfloat16']):.1f} tokens/s; per-round ratio bfloat16 / float32 "
          f"median {np.median(ratios):.3f} (min {ratios.min():.3f}, max {ratios.max():.3f}); "
          f"cache {exact.nbytes / 1e6:.0f} MB float32, {compact.nbytes / 1e6:.0f} MB bfloat16")
    return 0


if __name__ == "__main__":
    sys.exit(main())
