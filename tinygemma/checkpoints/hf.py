"""Hugging Face checkpoint folders: config.json, (sharded) safetensors, tokenizer.model."""

from __future__ import annotations

import json
import os
import re

from ..config import GemmaConfig
from ..errors import CheckpointError, CheckpointNotFound
from .safetensors_file import load_safetensors
from .weights import Tensor, check_weights, expected_shapes

# The HF Gemma 1 `post_attention_layernorm` is the pre-MLP norm; in Gemma 2/3 it is a real
# post-attention (sandwich) norm and the pre-MLP norm is `pre_feedforward_layernorm`.
_LAYER_NAMES = {
    1: {"input_layernorm": "attn_norm", "post_attention_layernorm": "mlp_norm"},
    2: {"input_layernorm": "attn_norm", "post_attention_layernorm": "post_attn_norm",
        "pre_feedforward_layernorm": "mlp_norm", "post_feedforward_layernorm": "post_mlp_norm"},
}
_LAYER_NAMES[3] = _LAYER_NAMES[2]
_COMMON = {"self_attn.q_proj": "q", "self_attn.k_proj": "k", "self_attn.v_proj": "v",
           "self_attn.o_proj": "o", "self_attn.q_norm": "q_norm", "self_attn.k_norm": "k_norm",
           "mlp.gate_proj": "gate", "mlp.up_proj": "up", "mlp.down_proj": "down"}
# Text weights of multimodal Gemma 3 checkpoints sit under a language-model prefix.
_PREFIX = re.compile(r"^(?:model\.language_model\.|language_model\.model\.|language_model\.|model\.)")
_LAYER = re.compile(r"^layers\.(\d+)\.(.+)\.weight$")
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")  # never unpickled: they run code


def our_name(hf_name: str, family: int) -> str | None:
    """The tinygemma name of an HF tensor, or None for tensors the text model does not use."""
    if hf_name == "lm_head.weight":
        return "lm_head"
    name = _PREFIX.sub("", hf_name)
    if name == "embed_tokens.weight":
        return "embed"
    if name == "norm.weight":
        return "final_norm"
    m = _LAYER.match(name)
    if m:
        part = _LAYER_NAMES[family].get(m.group(2)) or _COMMON.get(m.group(2))
        return f"layers.{m.group(1)}.{part}" if part else None
    return None


def hf_name(ours: str, family: int, prefix: str = "model.") -> str:
    """The HF name of one of ours (the inverse of ``our_name``; for errors)."""
    if ours == "lm_head":
        return "lm_head.weight"
    if ours in ("embed", "final_norm"):
        return prefix + ("embed_tokens.weight" if ours == "embed" else "norm.weight")
    _, i, part = ours.split(".", 2)
    hf_part = {ours: hf for hf, ours in {**_COMMON, **_LAYER_NAMES[family]}.items()}[part]
    return f"{prefix}layers.{i}.{hf_part}.weight"


def hf_shapes(c: GemmaConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor of an HF checkpoint of config ``c``, HF name -> shape ``[out, in]``."""
    return {hf_name(ours, c.family): shape for ours, shape in expected_shapes(c).items()}


def shard_files(folder: str) -> list[str]:
    """The safetensors files of a folder: from the index when sharded, else model.safetensors."""
    index = os.path.join(folder, "model.safetensors.index.json")
    if os.path.exists(index):
        try:
            with open(index, encoding="utf-8") as f:
                weight_map = json.load(f)["weight_map"]
            names = sorted(set(weight_map.values()))
            if not all(isinstance(n, str) for n in names):
                raise TypeError("weight_map values must be file names")
        except (OSError, ValueError, KeyError, TypeError, AttributeError, RecursionError) as e:
            raise CheckpointError(f"{index}: not a safetensors index ({e})") from None
        files = [os.path.join(folder, n) for n in names]
        for p in files:
            if not os.path.exists(p):
                raise CheckpointNotFound(f"{p}: shard named in {index} is missing")
        return files
    single = os.path.join(folder, "model.safetensors")
    if os.path.exists(single):
        return [single]
    others = sorted(n for n in os.listdir(folder) if n.endswith(".safetensors"))
    if others:
        return [os.path.join(folder, n) for n in others]
    pickles = [n for n in os.listdir(folder) if n.endswith(PICKLE_SUFFIXES)]
    if pickles:
        raise CheckpointError(f"{folder}: only pickle checkpoints ({', '.join(pickles)}); "
                              "tinygemma never unpickles. Convert to safetensors, or download "
                              "the model.safetensors files from Hugging Face")
    raise CheckpointNotFound(f"{folder}: no model.safetensors or model-*.safetensors files")


def load_hf(folder: str) -> tuple[GemmaConfig, dict[str, Tensor]]:
    """Config and weights (memory-mapped, our names) of an HF checkpoint folder."""
    config_path = os.path.join(folder, "config.json")
    try:
        config = GemmaConfig.from_json(config_path)
    except CheckpointError as e:  # GemmaConfig's own checks say "config: ...": name the file
        if config_path in str(e):
            raise
        raise CheckpointError(f"{config_path}: {e}") from None
    except RecursionError:  # json recurses: 10^5 nested lists
        raise CheckpointError(f"{config_path}: JSON nested too deeply to be a config") from None
    tensors, origin, prefix = {}, {}, "model."
    for path in shard_files(folder):
        for name_in_file, t in load_safetensors(path).items():
            name = our_name(name_in_file, config.family)
            if name is not None:
                tensors[name], origin[name] = t, f"'{name_in_file}' in {os.path.basename(path)}"
                if name != "lm_head":  # the text model's prefix, to spell a missing tensor
                    m = _PREFIX.match(name_in_file)
                    prefix = m.group(0) if m else ""
    if "lm_head" in tensors and config.tie_word_embeddings:
        del tensors["lm_head"]  # tied: the embedding is the head
    check_weights(tensors, config, folder, origin,
                  lambda ours: hf_name(ours, config.family, prefix))
    return config, tensors
