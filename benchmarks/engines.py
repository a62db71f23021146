"""One engine's prefill and decode speed, run in its own process so its peak RSS is its own.

    python benchmarks/engines.py ENGINE --model PATH --ids IDS.json --new-tokens N --repeats R

ENGINE is ``tinygemma`` (the fast path), ``tinygemma-ref`` (the NumPy reference path),
``tinygemma-int8`` (the fast path with ``quantize="int8"``: for bf16 checkpoints),
``transformers`` (float32 on CPU, sdpa attention, the same checkpoint; a GGUF is dequantised by
transformers' GGUF loader) or ``llama.cpp`` (llama-cpp-python on the same GGUF, native
quantised kernels). Every engine gets the same prompt token ids and decodes greedily with its
KV cache, one token per call. Prints one JSON line: prefill and decode tokens/s (medians),
peak RSS, or ``{"skipped": reason}`` when the engine is not installed.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time

if len(sys.argv) > 1 and sys.argv[1].startswith("tinygemma"):
    import tinygemma  # noqa: F401  before NumPy, as the tinygemma command does (OpenBLAS spin)

import numpy as np  # noqa: E402


def peak_rss() -> int:
    """Peak RSS of this process image: VmHWM (ru_maxrss would carry the parent's over exec).

    Kept apart from tinygemma.bench.peak_rss_bytes: this script also runs in the transformers
    and llama.cpp environments, where tinygemma may not be installed."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def timed_runs(prefill, step, ids, new_tokens, repeats):
    """prefill(ids) -> logits of the last position; step(token) -> logits. Medians, seconds."""
    pre, dec = [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        logits = prefill(ids)
        pre.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        out = []
        for _ in range(new_tokens):
            out.append(int(np.argmax(logits)))
            logits = step(out[-1])
        dec.append(time.perf_counter() - t0)
    return float(np.median(pre)), float(np.median(dec)), out


def run_tinygemma(path, ids, new_tokens, repeats, fast, threads, quantize=None):
    if threads:
        os.environ["TINYGEMMA_THREADS"] = str(threads)  # at most this many, like the others
    import tinygemma as tg
    t0 = time.perf_counter()
    model = tg.load(path, fast=fast, quantize=quantize)
    load_s = time.perf_counter() - t0
    from tinygemma.bench import bench
    r = bench(model, len(ids), new_tokens, repeats, ids=ids)
    return {"prefill_s": r["prefill_s"], "decode_s": r["decode_s"], "load_s": load_s,
            "generated": r["generated"], "weight_bytes": r["weight_bytes"],
            "decode_bytes": r["decode_bytes"],
            "detail": f"fast={fast}, quantize={quantize}, numba {__import__('numba').__version__}"}


def run_transformers(path, ids, new_tokens, repeats, threads, dtype="float32"):
    try:
        import torch
        import transformers
        from transformers import AutoModelForCausalLM
    except ImportError as e:
        return {"skipped": f"transformers/torch not installed ({e.name})"}
    torch.set_num_threads(threads or os.cpu_count())
    torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "auto": "auto"}[dtype]
    t0 = time.perf_counter()
    if os.path.isdir(path):
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype,
                                                     attn_implementation="sdpa")
    else:
        model = AutoModelForCausalLM.from_pretrained(os.path.dirname(path),
                                                     gguf_file=os.path.basename(path),
                                                     dtype=torch_dtype,
                                                     attn_implementation="sdpa")
    model.eval()
    load_s = time.perf_counter() - t0
    state = {}

    @torch.inference_mode()
    def prefill(x):
        out = model(torch.tensor([x]), use_cache=True, logits_to_keep=1)
        state["past"] = out.past_key_values
        return out.logits[0, -1].float().numpy()

    @torch.inference_mode()
    def step(token):
        out = model(torch.tensor([[token]]), past_key_values=state["past"], use_cache=True)
        state["past"] = out.past_key_values
        return out.logits[0, -1].float().numpy()

    prefill(list(ids[:2]))
    step(int(ids[2]))  # warm-up
    pre, dec, gen = timed_runs(prefill, step, list(ids), new_tokens, repeats)
    return {"prefill_s": pre, "decode_s": dec, "load_s": load_s, "generated": gen,
            "detail": f"torch {torch.__version__}, transformers {transformers.__version__}, "
                      f"{next(model.parameters()).dtype}, sdpa, {torch.get_num_threads()} threads"}


def run_llama_cpp(path, ids, new_tokens, repeats, threads):
    try:
        import llama_cpp
    except ImportError:
        return {"skipped": "llama-cpp-python not installed"}
    if os.path.isdir(path):
        return {"skipped": "llama.cpp reads GGUF files only"}
    n = threads or os.cpu_count()
    t0 = time.perf_counter()
    llm = llama_cpp.Llama(model_path=path, n_ctx=len(ids) + new_tokens + 8, n_batch=512,
                          n_ubatch=512, n_threads=n, n_threads_batch=n, logits_all=False,
                          verbose=False)
    load_s = time.perf_counter() - t0
    vocab = llm.n_vocab()

    def logits():
        return np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(vocab,))

    def prefill(x):
        llm.reset()
        llm.eval(x)
        return logits()

    def step(token):
        llm.eval([token])
        return logits()

    prefill(list(ids[:2]))
    step(int(ids[2]))  # warm-up
    pre, dec, gen = timed_runs(prefill, step, [int(i) for i in ids], new_tokens, repeats)
    return {"prefill_s": pre, "decode_s": dec, "load_s": load_s, "generated": gen,
            "detail": f"llama-cpp-python {llama_cpp.__version__}, {n} threads, native GGUF types"}


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("engine", choices=["tinygemma", "tinygemma-ref", "tinygemma-int8",
                                      "transformers", "llama.cpp"])
    p.add_argument("--model", required=True)
    p.add_argument("--ids", required=True, help="JSON file with the prompt token ids")
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--tf-dtype", default="float32", choices=["float32", "bfloat16", "auto"])
    a = p.parse_args(argv)
    with open(a.ids) as f:
        ids = np.asarray(json.load(f), np.int64)
    try:
        if a.engine.startswith("tinygemma"):
            r = run_tinygemma(a.model, ids, a.new_tokens, a.repeats, a.engine != "tinygemma-ref",
                              a.threads, "int8" if a.engine == "tinygemma-int8" else None)
        elif a.engine == "transformers":
            r = run_transformers(a.model, ids, a.new_tokens, a.repeats, a.threads, a.tf_dtype)
        else:
            r = run_llama_cpp(a.model, ids, a.new_tokens, a.repeats, a.threads)
    except ImportError as e:
        r = {"skipped": f"{e}"}
    if "skipped" not in r:
        r.update(prefill_tok_s=len(ids) / r["prefill_s"], decode_tok_s=a.new_tokens / r["decode_s"],
                 peak_rss_bytes=peak_rss(), prompt_tokens=len(ids), new_tokens=a.new_tokens,
                 repeats=a.repeats)
    print("RESULT " + json.dumps(r))
    return 0


if __name__ == "__main__":
    sys.exit(main())
