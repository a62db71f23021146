"""GGUF files (llama.cpp's format): config, tensors and vocabulary.

Metadata becomes a :class:`GemmaConfig` (what the file does not store comes from the
architecture's known values, as transformers' GGUF loader does); llama.cpp tensor names map to
our names; quantised tensors stay as their blocks and decode with ``gguf.quants`` exactly.

Two GGUF conventions differ from Hugging Face: norm weights hold ``1 + w`` (llama.cpp adds the
1 at conversion), so we subtract it once to keep one convention; and tensors are stored
``[out, in]`` in NumPy order already.
"""

from __future__ import annotations

import re

import numpy as np

from ..config import (GEMMA2_SOFTCAPS, MAX_LAYERS, ROPE_BASE, GemmaConfig, family_layer_types,
                      gemma3_query_pre_attn_scalar)
from ..errors import CheckpointError
from .ggml import DECODABLE, GGMLType as Q, dequantize
from .gguf_header import RowReader, TensorInfo, read_gguf
from .weights import BF16Tensor, F16Tensor, Tensor, check_weights

_GLOBAL = {"token_embd": "embed", "output_norm": "final_norm", "output": "lm_head"}
_LAYER_PARTS = {"attn_norm": "attn_norm", "attn_q": "q", "attn_k": "k", "attn_v": "v",
                "attn_output": "o", "attn_q_norm": "q_norm", "attn_k_norm": "k_norm",
                "post_attention_norm": "post_attn_norm", "ffn_norm": "mlp_norm",
                "post_ffw_norm": "post_mlp_norm", "ffn_gate": "gate", "ffn_up": "up",
                "ffn_down": "down"}
_GLOBAL_GGUF = {ours: name for name, ours in _GLOBAL.items()}
_LAYER_PARTS_GGUF = {ours: name for name, ours in _LAYER_PARTS.items()}
_BLK = re.compile(r"^blk\.(\d+)\.(\w+)\.weight$")
_FAMILY = {"gemma": 1, "gemma2": 2, "gemma3": 3}


class GGUFTensor(Tensor):
    """Quantised GGUF blocks as stored (``[rows, bytes per row]`` uint8), decoded by gguf.quants.

    ``read_rows``: the file's :class:`RowReader` for this tensor, with which :meth:`rows` reads
    the few rows it is asked for (the embedding lookup) without mapping the pages around them.
    """

    def __init__(self, data: np.ndarray, qtype, shape: tuple[int, ...],
                 read_rows: RowReader | None = None):
        super().__init__(data, shape)
        self.qtype = qtype
        self.kind = qtype.name
        self.read_rows = read_rows

    def f32(self) -> np.ndarray:
        return dequantize(np.asarray(self.data), self.qtype).reshape(self.shape)

    def rows(self, idx: np.ndarray) -> np.ndarray:
        integers = isinstance(idx, (int, np.integer, list, np.ndarray)) and np.asarray(
            idx).dtype.kind in "iu"
        blocks = self.read_rows(idx) if self.read_rows and integers else self.data[idx]
        return dequantize(np.asarray(blocks), self.qtype)


def config_from_gguf(meta: dict, path: str = "GGUF", vocab: int | None = None) -> GemmaConfig:
    """A config from GGUF metadata; ``vocab`` is the embedding's row count when known."""
    try:
        return _config(meta, path, vocab)
    except CheckpointError as e:  # GemmaConfig's own checks say "config: ...": name the file
        if str(e).startswith(path):
            raise
        raise CheckpointError(f"{path}: GGUF metadata: {e}") from None
    except (TypeError, ValueError, ArithmeticError) as e:  # ArithmeticError: 0 heads, overflow
        raise CheckpointError(f"{path}: GGUF metadata holds a wrong value ({e})") from None


def _config(meta: dict, path: str, vocab: int | None) -> GemmaConfig:
    arch = meta.get("general.architecture")
    if arch not in _FAMILY:
        raise CheckpointError(f"{path}: architecture {arch!r} is not gemma, gemma2 or gemma3")
    family = _FAMILY[arch]

    def get(key, default=None, required=True):
        v = meta.get(f"{arch}.{key}", default)
        if v is None and required:
            raise CheckpointError(f"{path}: GGUF metadata {arch}.{key} is missing")
        return v

    n_layers, hidden, n_heads = get("block_count"), get("embedding_length"), get("attention.head_count")
    if not isinstance(n_layers, int) or not 1 <= n_layers <= MAX_LAYERS:  # sizes tuples below
        raise CheckpointError(f"{path}: GGUF metadata {arch}.block_count {n_layers!r} is not a "
                              f"layer count (1 to {MAX_LAYERS})")
    head_dim = get("attention.key_length", hidden // n_heads)
    vocab = vocab or len(meta.get("tokenizer.ggml.tokens", ()))
    if not vocab:
        raise CheckpointError(f"{path}: no token_embd.weight tensor and no vocabulary")
    window = get("attention.sliding_window", required=False)
    caps = GEMMA2_SOFTCAPS if family == 2 else (None, None)  # what llama.cpp assumes unstored
    qpas = None
    if family == 2:
        qpas = get("attention.query_pre_attn_scalar", head_dim, required=False)
    elif family == 3:  # not stored in GGUF
        qpas = gemma3_query_pre_attn_scalar(hidden, n_heads, head_dim)
    return GemmaConfig(
        family=family, vocab_size=int(vocab), hidden_size=int(hidden),
        intermediate_size=int(get("feed_forward_length")), num_layers=int(n_layers),
        num_heads=int(n_heads), num_kv_heads=int(get("attention.head_count_kv", n_heads)),
        head_dim=int(head_dim), max_position_embeddings=int(get("context_length", 8192)),
        rms_norm_eps=float(get("attention.layer_norm_rms_epsilon", 1e-6)),
        rope_theta=float(get("rope.freq_base", ROPE_BASE)),
        rope_local_theta=ROPE_BASE,
        rope_scaling_factor=float(get("rope.scaling.factor", 1.0, required=False) or 1.0),
        query_pre_attn_scalar=qpas,
        attn_logit_softcap=get("attn_logit_softcapping", caps[0], False),
        final_logit_softcap=get("final_logit_softcapping", caps[1], False),
        sliding_window=int(window) if window and family > 1 else None,
        layer_types=family_layer_types(family, n_layers),  # GGUF does not store them
        sandwich_norms=family > 1, qk_norm=family == 3)


def _tensor(t: TensorInfo) -> Tensor:
    plain = {Q.F32: (np.float32, Tensor), Q.F16: (np.float16, F16Tensor),
             Q.BF16: (np.uint16, BF16Tensor)}
    if t.qtype in plain:
        dtype, cls = plain[t.qtype]
        return cls(t.data.view(dtype).reshape(t.shape))
    try:  # decoding one row proves gguf.quants knows this type (DECODABLE: known to)
        if t.qtype not in DECODABLE:
            dequantize(np.asarray(t.data[:1]), t.qtype)
    except (NotImplementedError, ValueError, KeyError) as e:
        raise CheckpointError(f"tensor {t.name!r}: quantisation type {t.qtype.name} "
                              f"cannot be decoded by gguf.quants ({e})") from None
    return GGUFTensor(t.data, t.qtype, t.shape, t.rows)


def _our_name(name: str) -> str | None:
    if name.endswith(".weight") and name[:-7] in _GLOBAL:
        return _GLOBAL[name[:-7]]
    m = _BLK.match(name)
    if m and m.group(2) in _LAYER_PARTS:
        return f"layers.{m.group(1)}.{_LAYER_PARTS[m.group(2)]}"
    return None


def _gguf_name(ours: str) -> str:
    """The GGUF name of one of ours (the inverse of ``_our_name``; for errors)."""
    if ours in _GLOBAL_GGUF:
        return _GLOBAL_GGUF[ours] + ".weight"
    _, i, part = ours.split(".", 2)
    return f"blk.{i}.{_LAYER_PARTS_GGUF[part]}.weight"


def load_gguf(path: str):
    """(config, tensors in our names, metadata) of a GGUF file; the metadata holds the vocabulary."""
    f = read_gguf(path)
    embd = [t.shape[0] for t in f.tensors if t.name == "token_embd.weight"]
    config = config_from_gguf(f.metadata, path, embd[0] if embd else None)
    tensors, origin = {}, {}
    for t in f.tensors:
        name = _our_name(t.name)
        if name is None:
            continue
        try:
            tensor = _tensor(t)
        except CheckpointError as e:
            raise CheckpointError(f"{path}: {e}") from None
        if name.endswith("norm"):  # GGUF stores 1 + w; keep the HF convention (w)
            tensor = Tensor(tensor.f32() - np.float32(1))
        tensors[name], origin[name] = tensor, repr(t.name)
    if "lm_head" in tensors:  # llama.cpp writes output.weight only when the head is not tied
        config = config.replace(tie_word_embeddings=False)
    check_weights(tensors, config, path, origin, _gguf_name)
    f.release_pages()  # what loading read (header, norms, a row of each tensor): not needed now
    return config, tensors, f.metadata
