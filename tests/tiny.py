"""Tiny random Gemma checkpoints for tests: a Hugging Face folder or a GGUF file in a few KB.

    from tiny import write_hf, write_gguf   # tests/ is on sys.path under pytest
    config = gemma_config(2, num_heads=4)       # a GemmaConfig, no file
    folder = write_hf(tmp_path / "g3", family=3)             # config.json + model.safetensors
    path = write_gguf(tmp_path / "g3.gguf", family=3)         # F32 tensors, a tiny vocabulary
    path = write_gguf(tmp_path / "q.gguf", qtype="Q8_0")      # quantised matrices

F16 and F32 safetensors files are written by the safetensors package; bf16 ones by hand
(8-byte header length, JSON header, data; bf16 stored as uint16), since NumPy has no bfloat16
for the package to write. The GGUF file is written with ``gguf.GGUFWriter``; its norms hold
``1 + w`` as llama.cpp stores them. Tensor shapes and the family's defaults come from tinygemma.
Any config field can be overridden: ``write_hf(p, num_hidden_layers=1, vocab_size=300)``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import struct
from pathlib import Path

import numpy as np

from tinygemma.checkpoints.hf import hf_shapes as _shapes
from tinygemma.config import GEMMA2_SOFTCAPS, ROPE_BASE, GemmaConfig

MODEL_TYPES = {1: "gemma", 2: "gemma2", 3: "gemma3_text"}
GGUF_ARCH = {1: "gemma", 2: "gemma2", 3: "gemma3"}


def tiny_config(family: int = 3, **overrides) -> dict:
    """A transformers-style config.json dict of a tiny Gemma 1, 2 or 3 (4.x style)."""
    d = {"model_type": MODEL_TYPES[family], "vocab_size": 300, "hidden_size": 32,
         "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
         "num_key_value_heads": 1, "head_dim": 16, "max_position_embeddings": 8192,
         "rms_norm_eps": 1e-6, "rope_theta": ROPE_BASE, "hidden_activation": "gelu_pytorch_tanh"}
    if family == 2:
        d.update(query_pre_attn_scalar=16, attn_logit_softcapping=GEMMA2_SOFTCAPS[0],
                 final_logit_softcapping=GEMMA2_SOFTCAPS[1], sliding_window=4)
    if family == 3:
        d.update(query_pre_attn_scalar=16, sliding_window=4, rope_theta=1_000_000.0,
                 rope_local_base_freq=ROPE_BASE)  # five local layers to one global
    d.update(overrides)
    return d


def gemma_config(family: int = 3, **fields) -> GemmaConfig:
    """``tiny_config(family)`` as a GemmaConfig, with ``fields`` (GemmaConfig's names)
    replaced: for tests that build a model without writing a checkpoint."""
    return dataclasses.replace(GemmaConfig.from_dict(tiny_config(family)), **fields)


def hf_shapes(cfg: dict) -> dict[str, tuple[int, ...]]:
    """HF tensor names -> shapes ``[out, in]`` of a config dict."""
    return _shapes(GemmaConfig.from_dict(cfg))


def random_tensors(cfg: dict, seed: int = 0) -> dict[str, np.ndarray]:
    """Random float32 weights for every HF tensor of a config (norm offsets near 0)."""
    rng = np.random.default_rng(seed)
    out = {}
    for name, shape in hf_shapes(cfg).items():
        scale = 0.1 if "norm" in name else 1.0 / np.sqrt(shape[-1])
        out[name] = (rng.standard_normal(shape) * scale).astype(np.float32)
    return out


def to_bf16(x: np.ndarray) -> np.ndarray:
    """float32 -> bf16 bits (uint16), round to nearest even."""
    u = np.ascontiguousarray(x, np.float32).view(np.uint32).astype(np.uint64)
    return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)


def safetensors_bytes(tensors: dict[str, np.ndarray], dtype: str = "BF16",
                      metadata: dict | None = None) -> bytes:
    """A safetensors file as bytes; float32 arrays are stored as ``dtype`` (BF16, F16, F32)."""
    if dtype != "BF16":
        from safetensors.numpy import save
        as_dtype = {"F16": "<f2", "F32": "<f4"}[dtype]
        return save({n: x.astype(as_dtype) for n, x in tensors.items()}, metadata)
    header, blobs, at = {}, [], 0
    if metadata is not None:
        header["__metadata__"] = metadata
    for name, x in tensors.items():
        raw = to_bf16(x).tobytes()
        header[name] = {"dtype": "BF16", "shape": list(x.shape), "data_offsets": [at, at + len(raw)]}
        blobs.append(raw)
        at += len(raw)
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)  # the format pads the header to 8 bytes with spaces
    return struct.pack("<Q", len(text)) + text + b"".join(blobs)


def write_hf(folder, family: int = 3, seed: int = 0, dtype: str = "BF16", shards: int = 1,
             tensors: dict[str, np.ndarray] | None = None, **overrides) -> Path:
    """A tiny random HF checkpoint folder: config.json and (sharded) safetensors. No tokenizer."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    cfg = tiny_config(family, **overrides)
    (folder / "config.json").write_text(json.dumps(cfg))
    tensors = random_tensors(cfg, seed) if tensors is None else tensors
    if shards == 1:
        (folder / "model.safetensors").write_bytes(safetensors_bytes(tensors, dtype))
        return folder
    names = list(tensors)
    weight_map = {}
    for s in range(shards):
        file = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        part = {n: tensors[n] for n in names[s::shards]}
        (folder / file).write_bytes(safetensors_bytes(part, dtype))
        weight_map.update({n: file for n in part})
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": weight_map}))
    return folder


# ---- GGUF -------------------------------------------------------------------------------------
_GGUF_PARTS = {"input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q",
               "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
               "self_attn.o_proj": "attn_output", "self_attn.q_norm": "attn_q_norm",
               "self_attn.k_norm": "attn_k_norm", "mlp.gate_proj": "ffn_gate",
               "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
               "pre_feedforward_layernorm": "ffn_norm", "post_feedforward_layernorm": "post_ffw_norm"}


def gguf_name(hf_name: str, family: int) -> str:
    if hf_name == "model.embed_tokens.weight":
        return "token_embd.weight"
    if hf_name == "model.norm.weight":
        return "output_norm.weight"
    _, _, i, rest = hf_name.split(".", 3)
    part = rest[: -len(".weight")]
    if part == "post_attention_layernorm":  # Gemma 1: the pre-MLP norm; Gemma 2/3: post-attention
        return f"blk.{i}.{'ffn_norm' if family == 1 else 'post_attention_norm'}.weight"
    return f"blk.{i}.{_GGUF_PARTS[part]}.weight"


def tiny_vocab(n: int) -> tuple[list[str], list[int]]:
    """Pieces and token types of a tiny Gemma-like vocabulary: specials, 256 bytes, letters."""
    pieces = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"]
    types = [3, 3, 3, 2, 3, 3]  # CONTROL, UNKNOWN
    pieces += [f"<0x{b:02X}>" for b in range(256)]
    types += [6] * 256  # BYTE
    extra = ["▁"] + [chr(c) for c in range(ord("a"), ord("z") + 1)] + \
            ["▁" + chr(c) for c in range(ord("a"), ord("z") + 1)]
    while len(pieces) < n:
        pieces.append(extra.pop(0) if extra else f"tok{len(pieces)}")
        types.append(1)
    return pieces[:n], types[:n]


def write_gguf(path, family: int = 3, seed: int = 0, qtype: str | None = None,
               vocab: bool = True, tensors: dict[str, np.ndarray] | None = None,
               **overrides) -> Path:
    """A tiny random GGUF file; ``qtype`` (e.g. "Q8_0") quantises the 2-D matrices.

    With ``vocab`` it carries a tiny tokenizer vocabulary (``vocab_size`` >= 262 pieces).
    """
    import gguf
    from gguf.quants import quantize

    path = Path(path)
    cfg = tiny_config(family, **overrides)
    arch = GGUF_ARCH[family]
    w = gguf.GGUFWriter(os.fspath(path), arch)
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(cfg["hidden_size"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(cfg["num_attention_heads"])
    w.add_head_count_kv(cfg["num_key_value_heads"])
    w.add_key_length(cfg["head_dim"])
    w.add_value_length(cfg["head_dim"])
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    w.add_rope_freq_base(cfg["rope_theta"])
    if family > 1:
        w.add_sliding_window(cfg["sliding_window"])
    if family == 2:
        w.add_float32(f"{arch}.attn_logit_softcapping", cfg["attn_logit_softcapping"])
        w.add_float32(f"{arch}.final_logit_softcapping", cfg["final_logit_softcapping"])
    if vocab:
        pieces, types = tiny_vocab(cfg["vocab_size"])
        w.add_tokenizer_model("llama")
        w.add_token_list(pieces)
        w.add_token_scores([0.0] * len(pieces))
        w.add_token_types(types)
        w.add_bos_token_id(2)
        w.add_eos_token_id(1)
        w.add_pad_token_id(0)
        w.add_unk_token_id(3)
    tensors = random_tensors(cfg, seed) if tensors is None else tensors
    for hf_name, x in tensors.items():
        name = gguf_name(hf_name, family)
        if x.ndim == 1:  # llama.cpp stores norms as 1 + w
            w.add_tensor(name, (x + np.float32(1)).astype(np.float32))
        elif qtype is not None:
            q = getattr(gguf.GGMLQuantizationType, qtype)
            w.add_tensor(name, quantize(x, q), raw_dtype=q)
        else:
            w.add_tensor(name, x.astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


__all__ = ["tiny_config", "hf_shapes", "random_tensors", "to_bf16", "safetensors_bytes",
           "write_hf", "write_gguf", "gguf_name", "tiny_vocab"]
