"""The KV cache in float32, bfloat16 or float16 (``tinygemma.kv_cache``).

* writing rounds to nearest even, checked against bit patterns worked out by hand;
* ``nbytes`` by hand, for a tiny model and for Gemma 7B's shapes;
* bad dtypes and a cache too large for the memory are refused with a clear error, before
  anything is allocated or generated (the CLI says it in one line);
* the fast path's kernels, reading the compact cache as stored, equal the reference path,
  which decodes it to float32; a compact cache moves a tiny model's logits only a little.
"""

from __future__ import annotations

import numpy as np
import pytest

import tinygemma as tg
from tiny import gemma_config, write_gguf, write_hf
from tinygemma import cli, kv_cache
from tinygemma import kernels as K
from tinygemma import layers as L
from tinygemma.checkpoints.weights import Weights
from tinygemma.config import GEMMA_7B
from tinygemma.errors import NotEnoughMemory
from tinygemma.kernels import fast_model
from tinygemma.kv_cache import KVCache, from_bf16, to_bf16
from tinygemma.model import Gemma


def bits(x) -> np.ndarray:
    return np.array(x, np.uint32).view(np.float32)


# ---- rounding, by hand -----------------------------------------------------------------------
# (float32 bits, bfloat16 bits): a bfloat16 is the top 16 bits; the low 16 decide the rounding.
BF16_CASES = [
    (0x3F800000, 0x3F80),  # 1.0: exact
    (0x3F808000, 0x3F80),  # 1 + 2^-8, half way between 1 and 1 + 2^-7: ties to even (down)
    (0x3F818000, 0x3F82),  # 1 + 3 * 2^-8, half way, the kept last bit is odd: up to even
    (0x3F808001, 0x3F81),  # just above half way: up
    (0x3F807FFF, 0x3F80),  # just below half way: down
    (0xBFC00000, 0xBFC0),  # -1.5: exact, the sign kept
    (0x7F7FFFFF, 0x7F80),  # float32's largest rounds past bfloat16's largest: inf (as torch)
    (0x7F7F7FFF, 0x7F7F),  # just below half way to it: bfloat16's largest, 3.3895e38
    (0x7F800000, 0x7F80),  # inf
    (0xFF800000, 0xFF80),  # -inf
    (0x00000001, 0x0000),  # the smallest subnormal rounds to 0
    (0x80000000, 0x8000),  # -0.0
    (0x7FC00000, 0x7FC0),  # NaN stays NaN
    (0xFFFFFFFF, 0x7FC0),  # a NaN whose bits would overflow the sum: the quiet NaN
]


@pytest.mark.parametrize("f32_bits, bf16_bits", BF16_CASES, ids=lambda v: hex(v))
def test_bf16_rounds_to_nearest_even(f32_bits, bf16_bits):
    assert int(to_bf16(bits([f32_bits]))[0]) == bf16_bits


def test_bf16_decodes_exactly():
    u = np.array([0x3F80, 0x3F81, 0xBFC0, 0x7F7F, 0x0001, 0x7F80], np.uint16)
    want = [1.0, 1.0078125, -1.5, 3.3895313892515355e38, 2.0 ** -133, np.inf]  # by hand
    np.testing.assert_array_equal(from_bf16(u), np.array(want, np.float32))


def test_float16_cache_rounds_to_nearest_even():
    x = np.array([1 + 2 ** -11, 1 + 3 * 2 ** -11, 65519, 65520, -2.5], np.float32)
    want = [1.0, 1 + 2 ** -9, 65504, np.inf, -2.5]  # half way: to even; 65520 is half way to 2^16
    np.testing.assert_array_equal(kv_cache.encode(x, "float16").astype(np.float32), want)


@pytest.mark.parametrize("dtype, itemsize, rel", [("float32", 4, 0), ("bfloat16", 2, 2 ** -8),
                                                  ("float16", 2, 2 ** -11)])
def test_write_then_read_round_trip(dtype, itemsize, rel):
    cfg = gemma_config()
    cache = KVCache(cfg, 10, dtype)
    rng = np.random.default_rng(0)
    k = rng.standard_normal((1, 3, 16)).astype(np.float32) * 5  # [K, T, d]
    v = rng.standard_normal((1, 3, 16)).astype(np.float32)
    cache.write(1, 4, k, v)
    assert cache.k[1].itemsize == itemsize and cache.dtype == dtype
    got_k, got_v = cache.read(1, 4, 7)
    assert got_k.dtype == np.float32 and got_k.shape == (1, 3, 16)
    # within half a unit in the last place: 8 significant bits (bfloat16), 11 (float16)
    assert np.all(np.abs(got_k - k) <= rel * np.abs(k)) and np.all(np.abs(got_v - v) <= rel * np.abs(v))
    np.testing.assert_array_equal(cache.read(1, 4, 7)[0], got_k)  # reading does not move them
    if dtype == "bfloat16":
        np.testing.assert_array_equal(cache.k[1][:, 4:7], to_bf16(k))  # stored as the bits
    assert not cache.read(1, 0, 4)[0].any() and not cache.read(0, 0, 10)[1].any()


# ---- nbytes, by hand ------------------------------------------------------------------------
def test_nbytes_by_hand():
    cfg = gemma_config()  # 2 layers, 1 KV head of 16
    assert KVCache(cfg, 10).nbytes == 2 * 2 * 1 * 10 * 16 * 4  # k and v, layers, heads, pos, d
    assert KVCache(cfg, 10, "bfloat16").nbytes == 1280
    assert KVCache(cfg, 10, "float16").nbytes == 1280
    # 2 x 28 layers x 16 heads x 256 dims x 2 bytes = 458,752 bytes a position
    assert KVCache(GEMMA_7B, 2, "bfloat16").nbytes == 2 * 458_752
    assert kv_cache.position_bytes(GEMMA_7B, "bfloat16") * 8192 == 3_758_096_384  # 3.76 GB
    assert kv_cache.position_bytes(GEMMA_7B, "float32") * 8192 == 7_516_192_768  # 7.52 GB


# ---- bad values -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory):
    return str(write_gguf(tmp_path_factory.mktemp("kv") / "tiny.gguf"))


@pytest.mark.parametrize("bad", ["bf16", "float64", "", None, np.float16])
def test_bad_dtype_names_the_choices(tiny_path, bad):
    model = tg.load(tiny_path)
    for call in (lambda: tg.load(tiny_path, kv_dtype=bad if bad is not None else 3),
                 lambda: model.new_cache(4, dtype=bad if bad is not None else 3),
                 lambda: KVCache(model.config, 4, bad)):
        with pytest.raises(ValueError, match="'float32', 'bfloat16', 'float16' or 'auto'"):
            call()
    with pytest.raises(ValueError, match="concrete dtype"):
        KVCache(model.config, 4, "auto")


def test_defaults_reference_float32_fast_auto(tiny_path):
    assert tg.load(tiny_path, fast=False).new_cache(4).dtype == "float32"
    assert tg.load(tiny_path, fast=False, kv_dtype="float16").new_cache(4).dtype == "float16"
    fast = tg.load(tiny_path)
    assert fast.kv_dtype == "auto" and fast.new_cache(4).dtype == "float32"  # a tiny model fits
    assert fast.new_cache(4, "bfloat16").dtype == "bfloat16"  # per cache
    assert tg.load(tiny_path, kv_dtype="bfloat16").new_cache(4).dtype == "bfloat16"


# ---- memory: auto and the refusal ---------------------------------------------------------
def with_memory(monkeypatch, n):
    monkeypatch.setattr(kv_cache, "available_memory", lambda: int(n))


def test_auto_keeps_float32_while_it_fits_comfortably(monkeypatch, tiny_path):
    model = tg.load(tiny_path)
    f32 = kv_cache.position_bytes(model.config, "float32") * 100 + model.weights.nbytes
    reserve = 10**9  # kept for the process, out of what weights and cache may take
    with_memory(monkeypatch, f32 / 0.8 + reserve)  # exactly 80% of the usable memory: float32
    assert model.new_cache(100).dtype == "float32"
    with_memory(monkeypatch, f32 / 0.8 + reserve - 1)
    assert model.new_cache(100).dtype == "bfloat16"
    with_memory(monkeypatch, 1)  # not even bfloat16 fits: refused
    with pytest.raises(NotEnoughMemory):
        model.new_cache(100)


def test_a_reserve_is_kept_for_the_process(monkeypatch, tiny_path):
    model = tg.load(tiny_path, kv_dtype="float32")
    need = kv_cache.position_bytes(model.config, "float32") * 100 + model.weights.nbytes
    with_memory(monkeypatch, need + 10**9)  # leaves exactly 1 GB (the reserve): accepted
    assert model.new_cache(100).nbytes == need - model.weights.nbytes
    with_memory(monkeypatch, need + 10**9 - 1)
    with pytest.raises(NotEnoughMemory, match="less 1.00 GB kept for the process itself"):
        model.new_cache(100)


def test_GEMMA_7B_float32_cache_refused_by_its_reserve(monkeypatch):
    # The 7B-shaped case measured on a 24 GB machine: 17.08 GB of bf16 weights and 8201
    # positions of 2 x 28 x 16 x 256 x 4 bytes = 7.52 GB; MemAvailable 24.73 GB would leave
    # 0.13 GB to the process in float32: refused. The bfloat16 cache (3.76 GB) is accepted.
    weights, f32 = 17_075_361_792, 8201 * 917_504  # bytes
    with_memory(monkeypatch, 24_730_000_000)
    assert weights + f32 == 24_599_812_096 < 24_730_000_000  # fits without a reserve
    kv_cache.check_fits(GEMMA_7B, 8201, "bfloat16", weights)
    with pytest.raises(NotEnoughMemory) as e:
        kv_cache.check_fits(GEMMA_7B, 8201, "float32", weights)
    assert str(e.value) == (
        "a KV cache of 8201 positions in float32 takes 7.52 GB; with the weights (17.08 GB) "
        "that is 24.60 GB, more than the 24.73 GB of memory available (MemAvailable) less "
        "1.00 GB kept for the process itself: use a compact cache, --kv-dtype bfloat16 "
        "(kv_dtype='bfloat16': 3.76 GB), or fewer positions")
    assert kv_cache.resolve(GEMMA_7B, 8201, "auto", weights) == "bfloat16"


def test_refused_before_generating(monkeypatch, tiny_path):
    model = tg.load(tiny_path, kv_dtype="float32")
    total = len(model.tokenizer.encode("a b")) + 20
    weights = model.weights.nbytes
    f32 = kv_cache.position_bytes(model.config, "float32") * total
    with_memory(monkeypatch, 10**9 + weights + 0.75 * f32)  # bfloat16 fits, float32 not
    with pytest.raises(NotEnoughMemory) as e:
        next(tg.stream(model, "a b", max_new_tokens=20))
    assert isinstance(e.value, MemoryError) and isinstance(e.value, tg.TinyGemmaError)
    msg = str(e.value)
    assert f"a KV cache of {total} positions in float32 takes {f32:,} bytes" in msg
    assert f"--kv-dtype bfloat16 (kv_dtype='bfloat16': {f32 // 2:,} bytes)" in msg
    assert "MemAvailable" in msg
    assert model.new_cache(total, "bfloat16").nbytes == f32 // 2  # what the hint says fits


def test_cli_refuses_float32_in_one_line_and_bfloat16_runs(monkeypatch, capsys, tiny_path):
    model = tg.load(tiny_path)
    total = len(model.tokenizer.encode("a b")) + 8
    f32 = kv_cache.position_bytes(model.config, "float32") * total
    with_memory(monkeypatch, 10**9 + model.weights.nbytes + 0.75 * f32)
    argv = ["generate", "a b", "--model", tiny_path, "--max-new-tokens", "8", "--ignore-eos"]
    assert cli.main([*argv, "--kv-dtype", "float32"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("tinygemma: error: a KV cache of") and "--kv-dtype bfloat16" in err[-1]
    assert cli.main([*argv, "--kv-dtype", "bfloat16"]) == 0
    assert "error" not in capsys.readouterr().err


def test_cli_says_when_auto_picks_bfloat16(monkeypatch, capsys, tiny_path):
    model = tg.load(tiny_path)
    total = len(model.tokenizer.encode("a b")) + 8
    f32 = kv_cache.position_bytes(model.config, "float32") * total
    argv = ["generate", "a b", "--model", tiny_path, "--max-new-tokens", "8"]
    with_memory(monkeypatch, 10**9 + model.weights.nbytes + f32)  # fits, not comfortably
    assert cli.main(argv) == 0
    assert f"note: the KV cache of {total} positions is bfloat16" in capsys.readouterr().err
    with_memory(monkeypatch, 10**9 + 10 * (model.weights.nbytes + f32))
    assert cli.main(argv) == 0
    assert "note: the KV cache" not in capsys.readouterr().err


@pytest.mark.parametrize("command", [["generate", "hi"], ["chat"], ["perplexity", "f.txt"]])
def test_cli_kv_dtype_reaches_the_model(monkeypatch, capsys, tiny_path, tmp_path, command):
    loaded = []
    real = tg.load
    monkeypatch.setattr(tg, "load", lambda *a, **kw: loaded.append(real(*a, **kw)) or loaded[-1])
    monkeypatch.setattr(cli, "run_generate", lambda model, ids, args: [])
    monkeypatch.setattr("builtins.input", lambda prompt: (_ for _ in ()).throw(EOFError))
    (tmp_path / "f.txt").write_text("a b a b a b")
    monkeypatch.chdir(tmp_path)
    assert cli.main([*command, "--model", tiny_path, "--kv-dtype", "float16"]) == 0
    assert loaded[-1].kv_dtype == "float16"
    with pytest.raises(SystemExit) as e:
        cli.main([*command, "--model", tiny_path, "--kv-dtype", "int8"])
    assert e.value.code == 2
    assert "invalid choice: 'int8'" in capsys.readouterr().err


def test_bench_kv_dtype(capsys, tiny_path):
    from tinygemma.bench import main as bench_main
    assert bench_main(["--model", tiny_path, "--prompt-tokens", "4", "--new-tokens", "2",
                       "--repeats", "1", "--no-roofline", "--kv-dtype", "bfloat16"]) == 0
    assert "tinygemma (fast)" in capsys.readouterr().out


# ---- the kernels read the compact cache as the reference does ---------------------------------
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("H, Kv", [(4, 1), (4, 2), (2, 2)], ids=["MQA", "GQA", "MHA"])
@pytest.mark.parametrize("window, cap", [(None, None), (5, None), (None, 50.0)])
def test_attend_on_a_compact_cache_equals_reference(dtype, H, Kv, window, cap):
    rng = np.random.default_rng(H * 7 + Kv)
    d, S = 16, 24
    cfg = gemma_config(num_heads=H, num_kv_heads=Kv, head_dim=d, attn_logit_softcap=cap,
                       sliding_window=window, layer_types=("sliding_attention" if window else
                                                           "full_attention",) * 2)
    ref, fast = Gemma(cfg, Weights({})), K.FastGemma(cfg, Weights({}))
    cache, exact = KVCache(cfg, S, dtype), KVCache(cfg, S)
    for i in range(2):
        cache.write(i, 0, rng.standard_normal((Kv, S, d)) * 3, rng.standard_normal((Kv, S, d)))
        exact.write(i, 0, *cache.read(i, 0, S))  # the decoded values, in float32
    for start, T in [(0, 1), (6, 1), (7, K.SMALL_T), (S - 2, 2), (0, 12), (3, 21)]:
        q = (rng.standard_normal((H, T, d)) * 3).astype(np.float32)
        positions = np.arange(start, start + T)
        want, _ = ref.attend(q, exact, 1, positions, False)
        np.testing.assert_array_equal(ref.attend(q, cache, 1, positions, False)[0], want)
        got, _ = fast.attend(q, cache, 1, positions, False)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("threads", [1, 3])
@pytest.mark.parametrize("window", [0, 150])
def test_attend_cache_kernel_reads_compact_keys(dtype, threads, window):
    """The kernel on the stored bits (uint16, float16 as int16), keys split over threads."""
    rng = np.random.default_rng(threads + window)
    H, Kv, T, d, pos0 = 4, 1, 2, 16, 310
    first = max(0, pos0 - window + 1) if window else 0
    q = (rng.standard_normal((H, T, d)) * 2).astype(np.float32)
    k, v = (kv_cache.encode(rng.standard_normal((Kv, pos0 + T + 5, d)), dtype) for _ in range(2))
    kf, vf = kv_cache.decode(k), kv_cache.decode(v)
    mask = L.causal_mask(np.arange(pos0, pos0 + T), np.arange(first, pos0 + T), window or None)
    want, _ = L.attention(q, kf[:, first:pos0 + T], vf[:, first:pos0 + T], mask, 0.25)
    got = np.full_like(q, np.nan)
    K.attend_cache(q, fast_model.kernel_view(k), fast_model.kernel_view(v), pos0, first,
                   window, 0.25, 0.0, threads, got)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("family", [1, 2, 3])
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_tiny_model_compact_cache_fast_equals_reference(tmp_path, family, dtype):
    """A tiny random checkpoint (tests/tiny.py): token-by-token decoding with a compact cache
    gives the reference path's logits on the same compact cache, and differs from the float32
    cache's by rounding only (the keys and values hold 8 or 11 significant bits)."""
    path = write_hf(tmp_path / "m", family=family, num_hidden_layers=3)
    ref, fast = tg.load(path, fast=False), tg.load(path)
    ids = np.random.default_rng(family).integers(0, 300, 40)
    exact = ref.forward(ids)  # [T, V], float32 cache
    logits = {}
    for name, model in (("ref", ref), ("fast", fast)):
        cache = model.new_cache(len(ids), dtype)
        out = [model.forward(ids[:10], cache=cache)]  # a prefill, then one token at a time
        out += [model.forward(ids[j:j + 1], cache=cache) for j in range(10, len(ids))]
        logits[name] = np.concatenate(out)
    scale = float(np.abs(exact).max())
    assert np.abs(logits["fast"] - logits["ref"]).max() <= 1e-4 * scale
    moved = np.abs(logits["ref"] - exact).max()
    assert 0 < moved <= (2e-2 if dtype == "bfloat16" else 3e-3) * scale, moved
