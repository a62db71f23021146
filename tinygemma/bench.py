"""``tinygemma bench``: prefill and decode speed of a model on this machine.

* prefill: tokens per second to the first new token of a ``prompt_tokens`` prompt (one forward
  pass over the prompt into an empty KV cache, logits of the last position only), twice:
  *cold*, the first long prompt of the process (after a short warm-up prompt, as a user's first
  question after a greeting: whatever a model prepares on its first long prompt counts here),
  and *warm*, the same prompt again;
* decode: tokens per second generating ``new_tokens`` greedily after it, one
  ``model.forward([token], cache=cache, last_only=True)`` per token.

Warm prefill and decode are the median over ``repeats`` runs, after a warm-up (Numba loads its
cached kernels on the first call); cold prefill is one run, the first. The memory-bandwidth
roofline -- the decode speed if reading the weights once per token were the only cost -- comes from a streaming read measured in the same run. The
comparison with transformers and llama.cpp is ``benchmarks/run.py``.
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import time

import numpy as np

TEXT = ("The history of the written word is a history of the tools that carried it: clay "
        "tablets, papyrus, parchment, paper and the printing press, and each new medium changed "
        "who could read, what was written down and how ideas travelled between cities. ")


def benchmark_prompt(model, n: int, seed: int = 0) -> np.ndarray:
    """``n`` token ids: English text when the model has a tokenizer, else random ids."""
    try:
        tok = model.tokenizer
        ids = tok.encode(TEXT * (n // 20 + 2))[:n]
        if len(ids) == n:
            return np.asarray(ids, np.int64)
    except Exception:  # no tokenizer (a bare checkpoint): speed does not depend on the ids
        pass
    rng = np.random.default_rng(seed)
    return rng.integers(3, min(model.config.vocab_size, 32_000), n).astype(np.int64)


def peak_rss_bytes() -> int:
    """This process's peak resident set size: VmHWM on Linux (``ru_maxrss`` would include a
    parent's peak carried over exec), else ``ru_maxrss`` (KB on Linux, bytes on macOS)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


def weight_bytes(model) -> int:
    """Bytes of every weight tensor as stored (bf16, GGUF blocks, ...)."""
    return int(model.weights.nbytes)


def decode_bytes(model) -> int:
    """Bytes one decoded token reads: every matrix once, the embedding as the LM head."""
    return int(sum(t.nbytes for t in model.weights.tensors.values() if len(t.shape) == 2))


def bench(model, prompt_tokens: int = 500, new_tokens: int = 64, repeats: int = 3,
          ids=None) -> dict:
    """Prefill (cold: the first long prompt; warm: median over ``repeats``) and decode
    tokens/s of ``model`` (median over ``repeats``), and peak RSS."""
    ids = benchmark_prompt(model, prompt_tokens) if ids is None else np.asarray(ids, np.int64)
    # Warm-up: load (or compile) every kernel the timed runs use: a prompt of a few tokens
    # more than the matvec takes (the prefill's kernels), a short one (matvec), a decode step.
    warm = model.new_cache(len(ids) + 3)
    model.forward(ids[:min(len(ids), 24)], cache=warm, last_only=True)
    model.forward(ids[:2], cache=warm, last_only=True)
    model.forward(ids[2:3], cache=warm, last_only=True)
    del warm  # one KV cache at a time, as one generation holds: the peak RSS is a user's
    t0 = time.perf_counter()  # cold: the first long prompt
    model.forward(ids, cache=model.new_cache(len(ids)), last_only=True)
    cold = time.perf_counter() - t0
    prefill, decode, generated = [], [], []
    for _ in range(repeats):
        cache = model.new_cache(len(ids) + new_tokens)
        t0 = time.perf_counter()
        logits = model.forward(ids, cache=cache, last_only=True)
        prefill.append(time.perf_counter() - t0)
        out = []
        t0 = time.perf_counter()
        for _ in range(new_tokens):
            token = int(np.argmax(logits[0]))
            out.append(token)
            logits = model.forward(np.array([token]), cache=cache, last_only=True)
        decode.append(time.perf_counter() - t0)
        generated = out
        del cache  # before the next run's: one cache at a time
    return {
        "prompt_tokens": len(ids), "new_tokens": new_tokens, "repeats": repeats,
        "prefill_s": float(np.median(prefill)), "decode_s": float(np.median(decode)),
        "prefill_tok_s": len(ids) / float(np.median(prefill)),
        "prefill_cold_s": cold, "prefill_cold_tok_s": len(ids) / cold,
        "decode_tok_s": new_tokens / float(np.median(decode)) if new_tokens else float("nan"),
        "peak_rss_bytes": peak_rss_bytes(), "weight_bytes": weight_bytes(model),
        "decode_bytes": decode_bytes(model), "generated": generated,
    }


def memory_bandwidth(gigabytes: float = 1.0, repeats: int = 5) -> float:
    """Bytes per second of a streaming read of a 1 GB array, the best of one thread and all.

    ``np.max`` over equal parts of the array, one part per thread (NumPy releases the GIL in
    reductions). The array is much larger than any cache, so this is what reading the weights
    once per token can reach at best: the decode roofline is this divided by the bytes a token
    reads.
    """
    from concurrent.futures import ThreadPoolExecutor

    a = np.ones(int(gigabytes * (1 << 30)) // 4, np.float32)
    cores = os.cpu_count() or 1
    best = float("inf")
    with ThreadPoolExecutor(cores) as pool:
        for threads in sorted({1, cores}):
            parts = np.array_split(a, threads)
            for _ in range(repeats):
                t0 = time.perf_counter()
                list(pool.map(np.max, parts))
                best = min(best, time.perf_counter() - t0)
    return a.nbytes / best


def format_table(rows: list[dict], columns: list[str] | None = None) -> str:
    """A Markdown table of ``rows`` (dicts); floats to 3 significant figures, None as '-'."""
    columns = columns or list(dict.fromkeys(k for r in rows for k in r))

    def cell(v):
        if v is None or (isinstance(v, float) and np.isnan(v)):
            return "-"
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 100 else f"{v:.0f}"
        return str(v)

    body = [[cell(r.get(c)) for c in columns] for r in rows]
    widths = [max(len(c), *(len(b[i]) for b in body)) if body else len(c)
              for i, c in enumerate(columns)]

    def line(cells):
        return "| " + " | ".join(x.ljust(w) for x, w in zip(cells, widths)) + " |"

    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(columns), sep, *(line(b) for b in body)])


def result_row(name: str, r: dict, roofline_tok_s: float | None = None) -> dict:
    row = {"engine": name, "cold prefill tok/s": r["prefill_cold_tok_s"],
           "warm prefill tok/s": r["prefill_tok_s"], "decode tok/s": r["decode_tok_s"],
           "peak RSS MB": r["peak_rss_bytes"] / 1e6, "weights MB": r["weight_bytes"] / 1e6}
    if roofline_tok_s:
        row["decode % of roofline"] = 100 * r["decode_tok_s"] / roofline_tok_s
    return row


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="tinygemma bench", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Prefill and decode speed of a model on this machine, with the memory-"
                    "bandwidth roofline\n(the decode speed if reading the weights once per "
                    "token were the only cost).",
        epilog="prefill: tokens per second to the first new token of the prompt; decode: tokens "
               "per second\ngenerating greedily after it. cold prefill: the first long prompt "
               "of the process,\nafter a short warm-up prompt; prefill (warm) and decode: the "
               "median of the repeats.\n\nexamples:\n  tinygemma bench\n"
               "  tinygemma bench --model path/to/gemma-2b --prompt-tokens 128 --threads 1\n\n"
               "The comparison with transformers and llama.cpp is benchmarks/run.py.")
    p.add_argument("--model", metavar="PATH",
                   help="checkpoint folder or .gguf (default: the demo Gemma 3 270M)")
    p.add_argument("--prompt-tokens", type=int, default=500, metavar="N",
                   help="prompt length for the prefill, >= 3 (default 500)")
    p.add_argument("--new-tokens", type=int, default=64, metavar="N",
                   help="tokens to decode after the prompt, >= 1 (default 64)")
    p.add_argument("--repeats", type=int, default=3, metavar="N",
                   help="runs of each measurement; the median is shown (default 3)")
    p.add_argument("--threads", type=int, default=None, metavar="N",
                   help="threads for the kernels, as TINYGEMMA_THREADS=N (default: every core "
                        "this process may use)")
    p.add_argument("--kv-dtype", choices=("auto", "float32", "bfloat16", "float16"),
                   default=None, help="how the KV cache stores keys and values (default: "
                                      "float32 while it fits comfortably, else bfloat16)")
    p.add_argument("--reference", action="store_true",
                   help="also time the pure NumPy reference path (slow)")
    p.add_argument("--no-roofline", action="store_true",
                   help="skip the memory-bandwidth measurement (it allocates 1 GB)")
    a = p.parse_args(argv)
    if a.prompt_tokens < 3 or a.new_tokens < 1 or a.repeats < 1:
        p.error("--prompt-tokens must be >= 3, --new-tokens and --repeats >= 1")
    if a.threads is not None:
        if a.threads < 1:
            p.error(f"--threads must be >= 1, got {a.threads}")
        os.environ["TINYGEMMA_THREADS"] = str(a.threads)  # read when the model is built
    from .loader import load, load_demo

    def open_model(fast):
        kw = {"fast": fast, "kv_dtype": a.kv_dtype}
        return load(a.model, **kw) if a.model else load_demo(**kw)

    t0 = time.perf_counter()
    model = open_model(True)
    load_s = time.perf_counter() - t0
    ids = benchmark_prompt(model, a.prompt_tokens)
    results = [("tinygemma (fast)", bench(model, a.prompt_tokens, a.new_tokens, a.repeats, ids))]
    if a.reference:
        del model
        results.append(("tinygemma (reference)",
                        bench(open_model(False), a.prompt_tokens, a.new_tokens, 1, ids)))
    roofline = None
    lines = []
    if not a.no_roofline:
        bw = memory_bandwidth()
        roofline = bw / results[0][1]["decode_bytes"]
        lines.append(f"memory bandwidth {bw / 1e9:.1f} GB/s; a token reads "
                     f"{results[0][1]['decode_bytes'] / 1e6:.0f} MB of weights: decode roofline "
                     f"{roofline:.0f} tokens/s")
    print(f"model {a.model or 'demo Gemma 3 270M (Q4_K_M GGUF)'}, loaded in {load_s:.1f} s; "
          f"prompt {a.prompt_tokens} tokens, {a.new_tokens} new tokens, median of {a.repeats}; "
          f"{os.cpu_count()} CPUs")
    print(format_table([result_row(n, r, roofline) for n, r in results]))
    for line in lines:
        print(line)
    if a.reference:
        print("(peak RSS is of this process, which ran both paths)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
