"""One configuration dataclass for the whole Gemma family (1, 2 and 3).

It is read from a Hugging Face ``config.json`` in either style in use:

* transformers 4.x files: ``rope_theta``, ``hidden_act`` / ``hidden_activation``, Gemma 3's
  ``rope_local_base_freq``, ``rope_scaling`` and ``sliding_window_pattern``;
* transformers 5.x files: ``rope_parameters`` (nested per layer type for Gemma 3),
  ``layer_types`` and ``dtype``;

or from GGUF metadata (see :func:`tinygemma.checkpoints.gguf_file.config_from_gguf`).
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass

from .errors import CheckpointError

FULL, SLIDING = "full_attention", "sliding_attention"
# Every name a Gemma config.json uses for its activation; all mean the tanh approximation
# (official Gemma code uses it even where an early config.json says "gelu").
_GELUS = {"gelu", "gelu_pytorch_tanh", "gelu_new", "gelu_tanh"}
MAX_LAYERS = 1024  # Gemma's deepest has 62; a larger count is a corrupt file, not a model

# ---- the family's rules, for what a checkpoint leaves unsaid ------------------------------------
ROPE_BASE = 10_000.0  # RoPE theta of Gemma 1/2 and of Gemma 3's local layers
GEMMA3_GLOBAL_EVERY = 6  # Gemma 3: five local layers to one global (``sliding_window_pattern``)
GEMMA2_SOFTCAPS = (50.0, 30.0)  # Gemma 2's attention and final logit soft-caps


def family_layer_types(family: int, n_layers: int, pattern: int = GEMMA3_GLOBAL_EVERY
                       ) -> tuple[str, ...]:
    """FULL or SLIDING per layer, where the checkpoint does not list them."""
    if family == 2:  # transformers: even layers slide, odd layers are global
        return tuple(SLIDING if i % 2 == 0 else FULL for i in range(n_layers))
    if family == 3:  # every `pattern`-th layer is global
        return tuple(FULL if (i + 1) % pattern == 0 else SLIDING for i in range(n_layers))
    return (FULL,) * n_layers


def gemma3_query_pre_attn_scalar(hidden: int, n_heads: int, head_dim: int) -> int:
    """llama.cpp's rule, for GGUF files that do not store it: 27B scales by hidden/heads."""
    return hidden // n_heads if (hidden, n_heads) == (5376, 32) else head_dim


@dataclass(frozen=True)
class LayerSpec:
    """How one layer attends, fixed once from the config (as deepmind's gemma fixes
    ``attn_type`` and ``rope_base_frequency`` per block at construction)."""

    window: int | None  # W keys a query sees, itself included; None: every key up to it
    rope_base: float  # RoPE theta
    rope_scale: float  # linear position scaling (global layers of Gemma 3 4B and up)
    softcap: float | None  # attention logit soft-cap (Gemma 2)


@dataclass(frozen=True)
class GemmaConfig:
    """The hyper-parameters of one Gemma model.

    Letters used in shape comments across the package:
    ``T`` tokens, ``S`` key positions, ``D`` hidden size, ``H`` query heads,
    ``K`` key/value heads, ``d`` head_dim, ``F`` MLP width, ``V`` vocabulary.

    ``layer_specs[i]`` is layer ``i``'s :class:`LayerSpec`, built once from these fields.
    """

    family: int  # 1, 2 or 3
    vocab_size: int  # V
    hidden_size: int  # D
    intermediate_size: int  # F
    num_layers: int
    num_heads: int  # H
    num_kv_heads: int  # K: 1 is MQA (2B), H is MHA (7B), in between is GQA
    head_dim: int  # d (H * d != D on Gemma 7B)
    max_position_embeddings: int = 8192
    rms_norm_eps: float = 1e-6
    rope_theta: float = ROPE_BASE  # RoPE base of global (full-attention) layers
    rope_local_theta: float = ROPE_BASE  # RoPE base of sliding-window layers (Gemma 3)
    rope_scaling_factor: float = 1.0  # linear position scaling on global layers (Gemma 3 4B+)
    query_pre_attn_scalar: float | None = None  # attention scale is this ** -0.5 (Gemma 2/3)
    attn_logit_softcap: float | None = None  # Gemma 2: 50
    final_logit_softcap: float | None = None  # Gemma 2: 30
    sliding_window: int | None = None  # W keys, the current one included
    layer_types: tuple[str, ...] = ()  # FULL or SLIDING per layer
    sandwich_norms: bool = False  # post-attention and post-MLP norms (Gemma 2/3)
    qk_norm: bool = False  # RMSNorm of q and k over head_dim (Gemma 3)
    tie_word_embeddings: bool = True

    def __post_init__(self):
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers",
                     "num_heads", "num_kv_heads", "head_dim", "max_position_embeddings"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise CheckpointError(f"config: {name} must be a positive integer, "
                                      f"got {getattr(self, name)!r}")
        if self.num_layers > MAX_LAYERS:
            raise CheckpointError(f"config: {self.num_layers} layers; at most {MAX_LAYERS}")
        if not self.layer_types:
            object.__setattr__(self, "layer_types", (FULL,) * self.num_layers)
        if len(self.layer_types) != self.num_layers:
            raise CheckpointError(
                f"config: {len(self.layer_types)} layer_types for {self.num_layers} layers")
        if self.num_heads % self.num_kv_heads:
            raise CheckpointError(f"config: num_heads {self.num_heads} is not a multiple of "
                                  f"num_kv_heads {self.num_kv_heads}")
        if SLIDING in self.layer_types and not self.sliding_window:
            raise CheckpointError("config: sliding-window layers but no sliding_window")
        local = LayerSpec(self.sliding_window, self.rope_local_theta, 1.0, self.attn_logit_softcap)
        full = LayerSpec(None, self.rope_theta, self.rope_scaling_factor, self.attn_logit_softcap)
        # not a field: built here from the fields, so replace() rebuilds it
        object.__setattr__(self, "layer_specs",
                           tuple(local if t == SLIDING else full for t in self.layer_types))

    @property
    def attn_scale(self) -> float:
        """The factor on q·k: ``head_dim**-0.5`` (Gemma 1) or ``query_pre_attn_scalar**-0.5``."""
        return (self.query_pre_attn_scalar or self.head_dim) ** -0.5

    def window(self, layer: int) -> int | None:
        """Sliding window of a layer, or None for global attention."""
        return self.layer_specs[layer].window

    def rope_base(self, layer: int) -> float:
        return self.layer_specs[layer].rope_base

    def rope_scale(self, layer: int) -> float:
        return self.layer_specs[layer].rope_scale

    def replace(self, **changes) -> "GemmaConfig":
        return dataclasses.replace(self, **changes)

    # ---- readers ---------------------------------------------------------------------------
    @classmethod
    def from_json(cls, path: str | os.PathLike) -> "GemmaConfig":
        try:
            with open(path, encoding="utf-8") as f:
                d = json.load(f)
        except FileNotFoundError:
            raise CheckpointError(f"{path}: no config.json (a Hugging Face checkpoint folder "
                                  "holds config.json, *.safetensors and tokenizer.model)") from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise CheckpointError(f"{path}: cannot read config.json: {e}") from None
        if not isinstance(d, dict):
            raise CheckpointError(f"{path}: config.json is not a JSON object")
        return cls.from_dict(d, where=str(path))

    @classmethod
    def from_dict(cls, d: dict, where: str = "config") -> "GemmaConfig":
        """Read a transformers ``config.json`` dict, 4.x or 5.x style."""
        if "text_config" in d:  # Gemma 3 multimodal: the language model is the text config
            d = {**d["text_config"], "model_type": d["text_config"].get("model_type", "gemma3_text")}
        model_type = d.get("model_type", "")
        family = {"gemma": 1, "gemma2": 2, "gemma3": 3, "gemma3_text": 3}.get(model_type)
        if family is None:
            raise CheckpointError(f"{where}: model_type {model_type!r} is not Gemma 1, 2 or 3")
        act = d.get("hidden_activation") or d.get("hidden_act") or "gelu_pytorch_tanh"
        if act not in _GELUS:  # Gemma's MLP is GeGLU; old files say "gelu" but mean tanh
            raise CheckpointError(f"{where}: activation {act!r} is not Gemma's GELU")
        try:
            n_layers = d["num_hidden_layers"]
            if not isinstance(n_layers, int) or not 1 <= n_layers <= MAX_LAYERS:  # sizes tuples
                raise CheckpointError(f"{where}: num_hidden_layers {n_layers!r} is not a "
                                      f"layer count (1 to {MAX_LAYERS})")
            n_heads = d["num_attention_heads"]
            hidden = d["hidden_size"]
            head_dim = d.get("head_dim") or hidden // n_heads
            global_rope, local_rope = _rope(d, family)
            return cls(
                family=family,
                vocab_size=d["vocab_size"],
                hidden_size=hidden,
                intermediate_size=d["intermediate_size"],
                num_layers=n_layers,
                num_heads=n_heads,
                num_kv_heads=d.get("num_key_value_heads") or n_heads,
                head_dim=head_dim,
                max_position_embeddings=d.get("max_position_embeddings", 8192),
                rms_norm_eps=d.get("rms_norm_eps", 1e-6),
                rope_theta=global_rope[0],
                rope_scaling_factor=global_rope[1],
                rope_local_theta=local_rope[0],
                query_pre_attn_scalar=d.get("query_pre_attn_scalar") if family > 1 else None,
                attn_logit_softcap=d.get("attn_logit_softcapping") if family > 1 else None,
                final_logit_softcap=d.get("final_logit_softcapping") if family > 1 else None,
                sliding_window=d.get("sliding_window") if family > 1 else None,
                layer_types=_layer_types(d, family, n_layers),
                sandwich_norms=family > 1,
                qk_norm=family == 3,
                tie_word_embeddings=d.get("tie_word_embeddings", True),
            )
        except KeyError as e:
            raise CheckpointError(f"{where}: config.json lacks {e.args[0]!r}") from None
        except TypeError as e:
            raise CheckpointError(f"{where}: config.json holds a value of the wrong type: {e}") from None

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _rope(d: dict, family: int) -> tuple[tuple[float, float], tuple[float, float]]:
    """(base, linear factor) of the global and the local layers, from either config style."""
    params = d.get("rope_parameters")
    if isinstance(params, dict):  # transformers 5.x
        if FULL in params:  # nested per layer type (Gemma 3)
            g, l = params[FULL], params.get(SLIDING, params[FULL])
        else:
            g = l = params
        return _base_factor(g), (float(l.get("rope_theta", ROPE_BASE)), 1.0)
    base = float(d.get("rope_theta", ROPE_BASE))
    factor = _base_factor({"rope_theta": base, **(d.get("rope_scaling") or {})})[1]
    local = float(d.get("rope_local_base_freq", ROPE_BASE)) if family == 3 else base
    return (base, factor), (local, 1.0)


def _base_factor(p: dict) -> tuple[float, float]:
    kind = p.get("rope_type", p.get("type", "default"))
    if kind not in ("default", "linear"):
        raise CheckpointError(f"config: RoPE type {kind!r} is not supported (default or linear)")
    return float(p.get("rope_theta", ROPE_BASE)), float(p.get("factor", 1.0)) if kind == "linear" else 1.0


def _layer_types(d: dict, family: int, n_layers: int) -> tuple[str, ...]:
    if d.get("layer_types"):
        return tuple(d["layer_types"])
    return family_layer_types(family, n_layers,
                              d.get("sliding_window_pattern", GEMMA3_GLOBAL_EVERY))


# The two released Gemma 1 shapes (the paper, table 1).
GEMMA_2B = GemmaConfig(family=1, vocab_size=256_000, hidden_size=2048, intermediate_size=16_384,
                       num_layers=18, num_heads=8, num_kv_heads=1, head_dim=256)
GEMMA_7B = GemmaConfig(family=1, vocab_size=256_000, hidden_size=3072, intermediate_size=24_576,
                       num_layers=28, num_heads=16, num_kv_heads=16, head_dim=256)


def count_parameters(c: GemmaConfig) -> dict[str, int]:
    """Parameters by component (the embedding counted once: the LM head is tied)."""
    attn = c.hidden_size * c.head_dim * (2 * c.num_heads + 2 * c.num_kv_heads)
    mlp = 3 * c.hidden_size * c.intermediate_size
    norms = c.hidden_size * (4 if c.sandwich_norms else 2) + (2 * c.head_dim if c.qk_norm else 0)
    out = {"embedding": c.vocab_size * c.hidden_size, "attention": c.num_layers * attn,
           "mlp": c.num_layers * mlp, "norms": c.num_layers * norms + c.hidden_size}
    out["total"] = sum(out.values())
    return out


__all__ = ["GemmaConfig", "LayerSpec", "GEMMA_2B", "GEMMA_7B", "FULL", "SLIDING",
           "count_parameters", "family_layer_types", "gemma3_query_pre_attn_scalar",
           "ROPE_BASE", "GEMMA3_GLOBAL_EVERY", "GEMMA2_SOFTCAPS"]
