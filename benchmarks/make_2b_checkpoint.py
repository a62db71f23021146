"""Write a Gemma-2B- or 7B-shaped bf16 checkpoint with random weights, for benchmarks.

    /work/venv/bin/python benchmarks/make_2b_checkpoint.py [FOLDER]   # default /tmp/gemma-2b-shaped
    /work/venv/bin/python benchmarks/make_2b_checkpoint.py --shape 7b [FOLDER]  # /tmp/gemma-7b-shaped

The layout is a Hugging Face folder as Google publishes it: ``config.json`` (Gemma 1 2B:
hidden 2048, 18 layers, 8 query heads, 1 KV head of 256, MLP 16384, vocabulary 256000, tied
embedding, 5.0 GB; Gemma 1 7B: hidden 3072, 28 layers, 16 query heads and 16 KV heads of 256,
MLP 24576, 17.1 GB) and ``model-0000N-of-0000M.safetensors`` shards with
``model.safetensors.index.json``.
Decoding speed does not depend on the weight values, so they are random bf16 numbers of a sane
scale (repeated from a pool of a few million, to write 5 GB quickly). The safetensors files are
written here (8-byte header length, JSON header, raw bytes), streamed from the pool: the
safetensors package would want every tensor in memory, and NumPy has no bf16 for it (bf16 is
uint16 here). Tensor names and shapes come from tinygemma (``checkpoints.hf.hf_shapes``). There is no tokenizer: benchmarks use token ids. Never commit the output.
"""

from __future__ import annotations

import argparse
import json
import os
import struct
import sys

import numpy as np

from tinygemma.checkpoints.hf import hf_shapes
from tinygemma.config import GemmaConfig

CONFIG = {
    "architectures": ["GemmaForCausalLM"], "model_type": "gemma", "torch_dtype": "bfloat16",
    "vocab_size": 256000, "hidden_size": 2048, "intermediate_size": 16384,
    "num_hidden_layers": 18, "num_attention_heads": 8, "num_key_value_heads": 1,
    "head_dim": 256, "max_position_embeddings": 8192, "rms_norm_eps": 1e-6,
    "rope_theta": 10000.0, "hidden_act": "gelu_pytorch_tanh",
    "hidden_activation": "gelu_pytorch_tanh", "attention_bias": False,
    "tie_word_embeddings": True, "bos_token_id": 2, "eos_token_id": 1, "pad_token_id": 0,
}
SHAPES = {"2b": CONFIG, "7b": {**CONFIG, "hidden_size": 3072, "intermediate_size": 24576,
                               "num_hidden_layers": 28, "num_attention_heads": 16,
                               "num_key_value_heads": 16}}
SHARD_BYTES = 2 << 30


def bf16_pool(n: int, seed: int = 0) -> np.ndarray:
    """``n`` random bf16 values (uint16), normal with standard deviation 0.02."""
    x = (np.random.default_rng(seed).standard_normal(n) * 0.02).astype(np.float32)
    return (x.view(np.uint32) >> 16).astype(np.uint16)


def write_shard(path: str, tensors: list[tuple[str, tuple[int, ...]]], pool: np.ndarray) -> None:
    header, offset = {}, 0
    for name, shape in tensors:
        nbytes = int(np.prod(shape)) * 2
        header[name] = {"dtype": "BF16", "shape": list(shape),
                        "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    header["__metadata__"] = {"format": "pt"}
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # data starts 8-byte aligned
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        start = 0
        for name, shape in tensors:
            n = int(np.prod(shape))
            while n:  # the pool, rotated, until the tensor is full
                k = min(n, len(pool) - start)
                f.write(pool[start:start + k].tobytes())
                n -= k
                start = (start + k) % (len(pool) - 7)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", choices=sorted(SHAPES), default="2b")
    p.add_argument("folder", nargs="?", default=None,
                   help="where to write it (default /tmp/gemma-<shape>-shaped)")
    a = p.parse_args(argv)
    folder, config = a.folder or f"/tmp/gemma-{a.shape}-shaped", SHAPES[a.shape]
    os.makedirs(folder, exist_ok=True)
    pool = bf16_pool(1 << 24)
    shards, current, size = [], [], 0
    for name, shape in hf_shapes(GemmaConfig.from_dict(config)).items():
        nbytes = int(np.prod(shape)) * 2
        if current and size + nbytes > SHARD_BYTES:
            shards.append(current)
            current, size = [], 0
        current.append((name, shape))
        size += nbytes
    shards.append(current)
    weight_map, total = {}, 0
    for i, tensors in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        write_shard(os.path.join(folder, fname), tensors, pool)
        for name, shape in tensors:
            weight_map[name] = fname
            total += int(np.prod(shape)) * 2
        print(f"wrote {fname} ({len(tensors)} tensors)", flush=True)
    with open(os.path.join(folder, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=1)
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(config, f, indent=1)
    print(f"{folder}: Gemma-{a.shape.upper()}-shaped bf16 checkpoint, {total / 1e9:.2f} GB of "
          "weights")
    return 0


if __name__ == "__main__":
    sys.exit(main())
