"""Solutions to the exercises of chapter 00 (overview): parameter counts, the vocabulary's share,
memory and arithmetic per token. Run by the hidden last cell of 00_overview.ipynb."""

from tinygemma.config import GEMMA_2B, GEMMA_7B, GemmaConfig, count_parameters


def gemma2_2b():
    """1. Gemma 2 2B: GQA (8 query heads, 4 KV heads), post-norms, a narrower MLP (F = 4D)."""
    c = GemmaConfig(family=2, vocab_size=256_000, hidden_size=2304, intermediate_size=9216,
                    num_layers=26, num_heads=8, num_kv_heads=4, head_dim=256,
                    sandwich_norms=True)
    return c, count_parameters(c)  # total 2,614,341,888: "2B" counts non-embedding weights (2.02B)


def embedding_share(vocab_size=32_000):
    """2. The 2B's blocks with a smaller vocabulary: the embedding's share of all parameters."""
    small = count_parameters(GEMMA_2B.replace(vocab_size=vocab_size))
    big = count_parameters(GEMMA_2B)
    return small["embedding"] / small["total"], big["embedding"] / big["total"]


def per_token_cost():
    """3. FLOPs and bytes of weights per generated token (bf16), for the 2B and the 7B.

    Every weight is used once per token: 2 FLOPs (multiply, add) per weight of the blocks and of
    the output projection (the tied embedding, all V x D of it); the input lookup reads one row.
    In bf16 a weight is 2 bytes, so decoding does about 1 FLOP per byte read: a CPU computes
    ~100 GFLOP/s but reads ~20-50 GB/s from memory, so memory bandwidth sets the speed.
    """
    out = {}
    for name, c in [("2B", GEMMA_2B), ("7B", GEMMA_7B)]:
        n = count_parameters(c)
        flops = 2 * n["total"]  # blocks + output projection (= the embedding, counted once)
        out[name] = {"GFLOP": flops / 1e9, "GB_bf16": 2 * n["total"] / 1e9}
    return out


if __name__ == "__main__":
    print(gemma2_2b()[1])
    print(embedding_share())
    print(per_token_cost())
