"""``tinygemma inspect [PATH]``: what a checkpoint holds and what one token costs.

Prints the config, the parameters by component, the tensor types (dtypes and GGUF
quantisation types) with their counts, and the bytes of weights read to decode one token:
every matrix of every layer once, one row of the embedding (the lookup), and the whole
embedding again as the tied LM head. Decoding is memory-bound, so these bytes over the
memory bandwidth bound the tokens per second from above. Then the KV cache's bytes per
position and at the full context, in each cache dtype (float32, bfloat16, float16).
"""

from __future__ import annotations

import os
from collections import Counter, defaultdict

from .config import SLIDING, GemmaConfig, count_parameters
from .kv_cache import AUTO, KV_DTYPES, check_kv_dtype, position_bytes

COMPONENTS = ("embedding", "attention", "mlp", "norms", "lm_head")


def component(name: str) -> str:
    """The component of a tensor, by our name (see :mod:`tinygemma.checkpoints.weights`)."""
    if name == "embed":
        return "embedding"
    if name == "lm_head":
        return "lm_head"
    if name.endswith("norm"):
        return "norms"
    return "attention" if name.rsplit(".", 1)[-1] in ("q", "k", "v", "o") else "mlp"


def _size(tensor) -> int:
    n = 1
    for s in tensor.shape:
        n *= int(s)
    return n


def mb(nbytes: float) -> str:
    return f"{nbytes / 1e6:,.1f} MB" if nbytes >= 1e6 else f"{nbytes / 1e3:,.1f} KB"


def checkpoint_bytes(path: str) -> int:
    """Bytes on disk: the .gguf file, or a folder's safetensors files."""
    if os.path.isdir(path):
        return sum(os.path.getsize(os.path.join(path, n)) for n in os.listdir(path)
                   if n.endswith(".safetensors"))
    return os.path.getsize(path)


def bytes_per_token(tensors: dict, config: GemmaConfig) -> dict[str, int]:
    """Weight bytes read to decode one token, as stored (the fast path reads them compact).

    ``layers``: every matrix and norm of the blocks, once; ``embedding_row``: the lookup of
    one token; ``lm_head``: the logits read the whole head (the embedding when tied).
    """
    embed = tensors["embed"]
    head = tensors["embed"] if config.tie_word_embeddings else tensors["lm_head"]
    layers = sum(t.nbytes for n, t in tensors.items() if n not in ("embed", "lm_head"))
    out = {"layers": layers, "embedding_row": embed.nbytes // embed.shape[0],
           "lm_head": head.nbytes}
    out["total"] = sum(out.values())
    return out


def kv_bytes_per_position(config: GemmaConfig, dtype: str = "float32") -> int:
    """Bytes of keys and values one position adds to a cache of ``dtype``, all layers."""
    if check_kv_dtype(dtype) == AUTO:
        raise ValueError("kv_bytes_per_position needs a concrete dtype, not 'auto' (which "
                         "depends on the memory available)")
    return position_bytes(config, dtype)


def describe(model, path: str) -> str:
    """The report of ``tinygemma inspect`` as text."""
    c = model.config
    tensors = model.weights.tensors
    lines = [f"{path} ({'GGUF' if not os.path.isdir(path) else 'Hugging Face safetensors'}, "
             f"{mb(checkpoint_bytes(path))} on disk)", ""]

    # ---- config --------------------------------------------------------------------------
    n_local = sum(t == SLIDING for t in c.layer_types)
    layers = f"{c.num_layers}"
    if n_local:
        layers += f" ({n_local} local with a window of {c.sliding_window}, {c.num_layers - n_local} global)"
    kind = ("MQA" if c.num_kv_heads == 1 else "MHA" if c.num_kv_heads == c.num_heads else "GQA")
    rope = f"{c.rope_theta:,.0f}"
    if n_local and c.rope_local_theta != c.rope_theta:
        rope += f" global, {c.rope_local_theta:,.0f} local"
    if c.rope_scaling_factor != 1:
        rope += f" (linear scaling {c.rope_scaling_factor:g} on global layers)"
    norms = [f"RMSNorm eps {c.rms_norm_eps:.0e}"]
    norms += (["sandwich norms"] if c.sandwich_norms else []) + (["QK-norm"] if c.qk_norm else [])
    caps = [f"attention {c.attn_logit_softcap:g}"] if c.attn_logit_softcap else []
    caps += [f"final {c.final_logit_softcap:g}"] if c.final_logit_softcap else []
    scale = c.query_pre_attn_scalar or c.head_dim
    rows = [("family", f"Gemma {c.family}"),
            ("vocabulary", f"{c.vocab_size:,}"),
            ("hidden size", f"{c.hidden_size:,}"),
            ("layers", layers),
            ("attention", f"{c.num_heads} query heads, {c.num_kv_heads} KV head"
                          f"{'s' if c.num_kv_heads > 1 else ''} ({kind}), head_dim {c.head_dim}, "
                          f"scale {scale:g}^-0.5"),
            ("MLP width", f"{c.intermediate_size:,} (GeGLU, tanh GELU)"),
            ("context", f"{c.max_position_embeddings:,} tokens"),
            ("RoPE base", rope),
            ("norms", ", ".join(norms)),
            ("soft-caps", ", ".join(caps) or "none"),
            ("LM head", "tied to the embedding" if c.tie_word_embeddings else "its own matrix")]
    lines += ["config"] + [f"  {k:<12} {v}" for k, v in rows] + [""]

    # ---- parameters by component ---------------------------------------------------------
    params, stored, types = Counter(), Counter(), defaultdict(Counter)
    for name, t in tensors.items():
        part = component(name)
        params[part] += _size(t)
        stored[part] += t.nbytes
        types[part][t.kind] += 1
    total = sum(params.values())
    lines.append(f"parameters by component  {'parameters':>13}  {'share':>6}  {'stored':>10}  types")
    for part in COMPONENTS:
        if part in params:
            kinds = ", ".join(f"{k} x{n}" for k, n in sorted(types[part].items()))
            lines.append(f"  {part:<22} {params[part]:>13,}  {params[part] / total:>6.1%}  "
                         f"{mb(stored[part]):>10}  {kinds}")
    lines.append(f"  {'total':<22} {total:>13,}  {1:>6.1%}  {mb(sum(stored.values())):>10}")
    expected = count_parameters(c)["total"] + (0 if c.tie_word_embeddings else
                                               c.vocab_size * c.hidden_size)
    if expected != total:
        lines.append(f"  (the config implies {expected:,})")
    lines.append("")

    # ---- tensor types ----------------------------------------------------------------------
    by_kind, kind_params, kind_bytes = Counter(), Counter(), Counter()
    for t in tensors.values():
        by_kind[t.kind] += 1
        kind_params[t.kind] += _size(t)
        kind_bytes[t.kind] += t.nbytes
    lines.append("tensor types (dtypes and GGUF quantisation types)")
    for k, n in by_kind.most_common():
        bits = 8 * kind_bytes[k] / kind_params[k]
        lines.append(f"  {k:<8} {n:>4} tensors  {kind_params[k]:>13,} parameters  "
                     f"{mb(kind_bytes[k]):>10}  {bits:5.2f} bits each")
    lines.append("")

    # ---- bytes per token -------------------------------------------------------------------
    b = bytes_per_token(tensors, c)
    f32 = 4 * (total - c.vocab_size * c.hidden_size + c.hidden_size
               + (c.vocab_size * c.hidden_size if c.tie_word_embeddings else 0))
    head = "the embedding, read whole" if c.tie_word_embeddings else "lm_head, read whole"
    lines += ["weight bytes read per decoded token (as stored; the fast path reads them compact)",
              f"  {'layers':<14} {mb(b['layers']):>10}  every matrix and norm of the "
              f"{c.num_layers} blocks, once",
              f"  {'embedding row':<14} {mb(b['embedding_row']):>10}  one row of "
              f"{c.vocab_size:,}",
              f"  {'LM head':<14} {mb(b['lm_head']):>10}  {head} for the logits",
              f"  {'total':<14} {mb(b['total']):>10}  ({mb(f32)} if decoded to float32)", ""]

    # ---- KV cache --------------------------------------------------------------------------
    local = f"; local layers read at most the last {c.sliding_window}" if n_local else ""
    lines.append(f"KV cache per position, by --kv-dtype (keys and values of the {c.num_layers} "
                 f"layers{local})")
    for dtype in KV_DTYPES:
        per = kv_bytes_per_position(c, dtype)
        lines.append(f"  {dtype:<14} {mb(per):>10}  {mb(per * c.max_position_embeddings)} at "
                     f"the full context of {c.max_position_embeddings:,} tokens")
    return "\n".join(lines)


def main(path: str | None = None) -> None:
    """Print the report for a checkpoint folder or .gguf file (default: the demo model)."""
    import tinygemma as tg
    if path is None:
        from .loader import demo_path
        path = demo_path()
    model = tg.load(path, fast=False)  # the reference class: no kernels compiled to look
    print(describe(model, path))


__all__ = ["describe", "bytes_per_token", "kv_bytes_per_position", "component", "main"]
