"""One engine's speed, run in its own process so its peak RSS and its start-up are its own.

    python benchmarks/engines.py ENGINE --model PATH --ids IDS.json --new-tokens N --repeats R
    python benchmarks/engines.py ENGINE --mode startup --model PATH --text "The capital of France is"
    python benchmarks/engines.py ENGINE --mode cold --model PATH --ids IDS.json

ENGINE is ``tinygemma`` (the fast path), ``tinygemma-ref`` (the NumPy reference path),
``tinygemma-int8`` (the fast path with ``quantize="int8"``: for bf16 checkpoints),
``transformers`` (float32 on CPU, sdpa attention, the same checkpoint; a GGUF is dequantised by
transformers' GGUF loader) or ``llama.cpp`` (llama-cpp-python on the same GGUF, native
quantised kernels). Every engine gets the same prompt token ids and decodes greedily with its
KV cache, one token per call. Prints one JSON line: prefill and decode tokens/s (medians),
peak RSS, or ``{"skipped": reason}`` when the engine is not installed.

``--mode startup`` (``tinygemma`` or ``llama.cpp``): what a new process costs before its first
token, as ``tinygemma generate TEXT --max-new-tokens 1`` does: import, load the checkpoint,
tokenize ``--text``, one forward pass, the first token as text. Times are seconds since
``--spawned-at`` (the parent's ``time.time()`` just before it started this process; by default
this script's start, which leaves out the interpreter's own start-up). For tinygemma, where
the time went, each part counted once (exclusive): ``imports`` (tinygemma, NumPy, Numba,
gguf), ``demo file`` (finding and checking the assembled demo GGUF), ``GGUF header``
(metadata, tensor views, config), ``vocabulary`` (the tokenizer: built from the GGUF's
pieces, or from the loader's vocabulary cache), ``panel cache`` (mapping the unpacked panels,
``tinygemma.panel_cache``), ``unpacking`` (GGUF blocks to panels: ``Packed`` construction,
when there is no panel cache yet), ``Numba kernels`` (loading cached machine code, or
compiling), ``forward`` (the rest of the first forward pass) and ``other``; the tinygemma
process then ends as the ``tinygemma`` command does (``os._exit`` after flushing, skipping
Python's teardown), llama-cpp-python's as any Python script. ``--mode cold``: in a new process, a 6-token warm-up prompt and one decoded
token, then the ``--ids`` prompt into an empty cache (cold: the first long prompt, paying for
whatever prefill builds or loads once), then the same prompt again, twice (warm, the median).
"""

from __future__ import annotations

import time

STARTED = time.time()  # this script's start (startup mode: its imports count from here)

import argparse  # noqa: E402
import inspect  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import resource  # noqa: E402
import sys  # noqa: E402
from contextlib import contextmanager  # noqa: E402

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


class Stages:
    """Seconds spent in named stages, each counted once: time inside a stage nested in another
    (a kernel loaded while unpacking) counts for the inner one only. One thread."""

    def __init__(self):
        self.seconds: dict[str, float] = {}
        self._stack: list[str] = []
        self._t = time.perf_counter()

    def _switch(self):
        now = time.perf_counter()
        if self._stack:
            name = self._stack[-1]
            self.seconds[name] = self.seconds.get(name, 0.0) + now - self._t
        self._t = now

    @contextmanager
    def stage(self, name: str):
        self._switch()
        self._stack.append(name)
        try:
            yield
        finally:
            self._switch()
            self._stack.pop()

    def wrap(self, owner, attr: str, name: str) -> None:
        """Count calls of ``owner.attr`` (a function, method or classmethod) as ``name``; an
        attribute that does not exist (the code moved) is left out, its time goes to the
        stage around it."""
        raw = inspect.getattr_static(owner, attr, None)
        if raw is None:
            return
        fn = raw.__func__ if isinstance(raw, (classmethod, staticmethod)) else raw
        stages = self

        def timed(*args, **kwargs):
            with stages.stage(name):
                return fn(*args, **kwargs)
        timed.__wrapped__ = fn
        setattr(owner, attr, type(raw)(timed) if isinstance(raw, (classmethod, staticmethod))
                else timed)


def tinygemma_stages() -> Stages:
    """A :class:`Stages` counting tinygemma's start-up parts (module docstring)."""
    import numba.core.dispatcher

    import tinygemma.checkpoints.gguf_file
    import tinygemma.kernels.matvec
    import tinygemma.loader
    import tinygemma.panel_cache
    import tinygemma.tokenizer
    st = Stages()
    st.wrap(tinygemma.loader, "demo_path", "demo file")
    st.wrap(tinygemma.loader, "load_gguf", "GGUF header")
    st.wrap(tinygemma.tokenizer.Tokenizer, "from_gguf", "vocabulary")
    st.wrap(tinygemma.tokenizer.Tokenizer, "__init__", "vocabulary")
    st.wrap(tinygemma.loader, "_cached_vocabulary", "vocabulary")
    st.wrap(tinygemma.panel_cache, "load", "panel cache")
    st.wrap(tinygemma.kernels.matvec.Packed, "__init__", "unpacking")
    st.wrap(numba.core.dispatcher.Dispatcher, "compile", "Numba kernels")
    return st


def startup_tinygemma(path, text, threads, spawned_at):
    """Seconds since ``spawned_at`` to the first token of ``text`` (module docstring)."""
    t_main = STARTED  # tinygemma was imported then, before NumPy (top of this file)
    if threads:
        os.environ["TINYGEMMA_THREADS"] = str(threads)
    import tinygemma as tg
    import tinygemma.kernels  # noqa: F401  (the fast path imports it when loading)
    t_imports = time.time()
    st = tinygemma_stages()
    with st.stage("other"):
        model = tg.load_demo() if path is None else tg.load(path)
        ids = model.tokenizer.encode(text)
        with st.stage("forward"):
            logits = model.forward(np.asarray(ids), last_only=True)  # [1, V]
        first = model.tokenizer.decode([int(np.argmax(logits[0]))])
    t_first = time.time()
    parts = {"Python start-up": t_main - spawned_at, "imports": t_imports - t_main, **st.seconds}
    return {"first_token_s": t_first - spawned_at, "stages": parts, "prompt_tokens": len(ids),
            "first_token": first, "detail": f"numba {__import__('numba').__version__}"}


def llama_cpp_module(path):
    """``llama_cpp``, or why it cannot run ``path`` (a dict with ``"skipped"``)."""
    try:
        import llama_cpp
    except ImportError:
        return {"skipped": "llama-cpp-python not installed"}
    if path is None or os.path.isdir(path):
        return {"skipped": "llama.cpp reads GGUF files only"}
    return llama_cpp


def open_llama(llama_cpp, path, n_ctx, threads):
    """A llama.cpp model on ``threads`` threads (0: every core), for ``n_ctx`` positions; and
    the thread count."""
    n = threads or os.cpu_count()
    return llama_cpp.Llama(model_path=path, n_ctx=n_ctx, n_batch=512, n_ubatch=512, n_threads=n,
                           n_threads_batch=n, logits_all=False, verbose=False), n


def startup_llama_cpp(path, text, threads, spawned_at):
    t_main = STARTED
    llama_cpp = llama_cpp_module(path)
    if isinstance(llama_cpp, dict):
        return llama_cpp
    t_imports = time.time()
    llm, n = open_llama(llama_cpp, path, 64, threads)
    t_load = time.time()
    ids = llm.tokenize(text.encode(), add_bos=True)
    llm.eval(ids)
    logits = np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(llm.n_vocab(),))
    first = llm.detokenize([int(np.argmax(logits))]).decode(errors="replace")
    t_first = time.time()
    parts = {"Python start-up": t_main - spawned_at, "imports": t_imports - t_main,
             "load": t_load - t_imports, "first forward": t_first - t_load}
    return {"first_token_s": t_first - spawned_at, "stages": parts, "prompt_tokens": len(ids),
            "first_token": first, "detail": f"llama-cpp-python {llama_cpp.__version__}, {n} threads"}


def cold_tinygemma(path, ids, threads):
    """A 6-token prompt and a decoded token, then ``ids`` cold, then twice warm; seconds."""
    if threads:
        os.environ["TINYGEMMA_THREADS"] = str(threads)
    import tinygemma as tg
    t0 = time.perf_counter()
    model = tg.load(path)
    load_s = time.perf_counter() - t0
    cache = model.new_cache(8)
    logits = model.forward(ids[:6], cache=cache, last_only=True)
    model.forward(np.array([int(np.argmax(logits[0]))]), cache=cache, last_only=True)
    st = tinygemma_stages()
    times = []
    for k in range(3):
        cache = model.new_cache(len(ids) + 1)
        t0 = time.perf_counter()
        with st.stage("forward" if k == 0 else "warm"):
            model.forward(ids, cache=cache, last_only=True)
        times.append(time.perf_counter() - t0)
    stages = {k: v for k, v in st.seconds.items() if k != "warm"}
    return {"cold_s": times[0], "warm_s": float(np.median(times[1:])), "load_s": load_s,
            "stages": stages, "detail": f"numba {__import__('numba').__version__}"}


def cold_llama_cpp(path, ids, threads):
    llama_cpp = llama_cpp_module(path)
    if isinstance(llama_cpp, dict):
        return llama_cpp
    t0 = time.perf_counter()
    llm, n = open_llama(llama_cpp, path, len(ids) + 8, threads)
    load_s = time.perf_counter() - t0
    ids = [int(i) for i in ids]
    llm.eval(ids[:6])
    logits = np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(llm.n_vocab(),))
    llm.eval([int(np.argmax(logits))])
    times = []
    for _ in range(3):
        llm.reset()
        t0 = time.perf_counter()
        llm.eval(ids)
        times.append(time.perf_counter() - t0)
    return {"cold_s": times[0], "warm_s": float(np.median(times[1:])), "load_s": load_s,
            "detail": f"llama-cpp-python {llama_cpp.__version__}, {n} threads"}


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
    llama_cpp = llama_cpp_module(path)
    if isinstance(llama_cpp, dict):
        return llama_cpp
    t0 = time.perf_counter()
    llm, n = open_llama(llama_cpp, path, len(ids) + new_tokens + 8, threads)
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
    p.add_argument("--mode", default="speed", choices=["speed", "startup", "cold"])
    p.add_argument("--model", default=None, help="checkpoint (startup: default the demo)")
    p.add_argument("--ids", default=None, help="JSON file with the prompt token ids")
    p.add_argument("--text", default="The capital of France is", help="startup's prompt")
    p.add_argument("--spawned-at", type=float, default=STARTED,
                   help="startup: the parent's time.time() when it started this process")
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--tf-dtype", default="float32", choices=["float32", "bfloat16", "auto"])
    a = p.parse_args(argv)
    if a.mode == "startup":
        if a.engine not in ("tinygemma", "llama.cpp"):
            p.error("--mode startup measures tinygemma or llama.cpp")
        run = startup_tinygemma if a.engine == "tinygemma" else startup_llama_cpp
        r = run(a.model, a.text, a.threads, a.spawned_at)
        print("RESULT " + json.dumps(r), flush=True)
        if a.engine == "tinygemma":  # ends as the tinygemma command does (cli.run)
            sys.stderr.flush()
            os._exit(0)
        return 0
    if a.model is None or a.ids is None:
        p.error("--model and --ids are needed (except for --mode startup)")
    with open(a.ids) as f:
        ids = np.asarray(json.load(f), np.int64)
    if a.mode == "cold":
        if a.engine not in ("tinygemma", "llama.cpp"):
            p.error("--mode cold measures tinygemma or llama.cpp")
        r = (cold_tinygemma if a.engine == "tinygemma" else cold_llama_cpp)(a.model, ids,
                                                                               a.threads)
        if "skipped" not in r:
            r.update(cold_tok_s=len(ids) / r["cold_s"], warm_tok_s=len(ids) / r["warm_s"],
                     peak_rss_bytes=peak_rss(), prompt_tokens=len(ids))
        print("RESULT " + json.dumps(r), flush=True)
        return 0
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
