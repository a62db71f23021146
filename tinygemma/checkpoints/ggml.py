"""GGML's tensor types and GGUF's tokenizer keys, and the embedding's Q8_0 rows decoded.

The values are those of the ``gguf`` package (llama.cpp's ``gguf-py/gguf/constants.py``:
``GGMLQuantizationType``, ``GGML_QUANT_SIZES``, ``TokenType``, ``Keys.Tokenizer``), for the
types and keys a GGUF checkpoint may hold; ``tests/test_gguf.py`` checks them against it.
They are copied because importing ``gguf`` builds every architecture's tables and imports its
writer: 7 MB of RSS imported alone, 3.5 MB off the peak of the demo's bench flow without it
(YAML, which it imports too, Numba imports anyway), and ~36 ms of start-up. ``gguf`` is still imported where it decodes (``gguf.quants``): the
reference path's matrices, a type newer than this table, an embedding row not in Q8_0.
"""

from __future__ import annotations

from enum import IntEnum

import numpy as np


class GGMLType(IntEnum):
    """``gguf.GGMLQuantizationType``: a tensor's type id in a GGUF file."""
    F32 = 0
    F16 = 1
    Q4_0 = 2
    Q4_1 = 3
    Q5_0 = 6
    Q5_1 = 7
    Q8_0 = 8
    Q8_1 = 9
    Q2_K = 10
    Q3_K = 11
    Q4_K = 12
    Q5_K = 13
    Q6_K = 14
    Q8_K = 15
    IQ2_XXS = 16
    IQ2_XS = 17
    IQ3_XXS = 18
    IQ1_S = 19
    IQ4_NL = 20
    IQ3_S = 21
    IQ2_S = 22
    IQ4_XS = 23
    I8 = 24
    I16 = 25
    I32 = 26
    I64 = 27
    F64 = 28
    IQ1_M = 29
    BF16 = 30
    TQ1_0 = 34
    TQ2_0 = 35


# (weights, bytes) of a block of each type: gguf.GGML_QUANT_SIZES
BLOCK_SIZES = {
    GGMLType.F32: (1, 4), GGMLType.F16: (1, 2), GGMLType.Q4_0: (32, 18),
    GGMLType.Q4_1: (32, 20), GGMLType.Q5_0: (32, 22), GGMLType.Q5_1: (32, 24),
    GGMLType.Q8_0: (32, 34), GGMLType.Q8_1: (32, 40), GGMLType.Q2_K: (256, 84),
    GGMLType.Q3_K: (256, 110), GGMLType.Q4_K: (256, 144), GGMLType.Q5_K: (256, 176),
    GGMLType.Q6_K: (256, 210), GGMLType.Q8_K: (256, 292), GGMLType.IQ2_XXS: (256, 66),
    GGMLType.IQ2_XS: (256, 74), GGMLType.IQ3_XXS: (256, 98), GGMLType.IQ1_S: (256, 50),
    GGMLType.IQ4_NL: (32, 18), GGMLType.IQ3_S: (256, 110), GGMLType.IQ2_S: (256, 82),
    GGMLType.IQ4_XS: (256, 136), GGMLType.I8: (1, 1), GGMLType.I16: (1, 2),
    GGMLType.I32: (1, 4), GGMLType.I64: (1, 8), GGMLType.F64: (1, 8),
    GGMLType.IQ1_M: (256, 56), GGMLType.BF16: (1, 2), GGMLType.TQ1_0: (256, 54),
    GGMLType.TQ2_0: (256, 66),
}

# Types gguf.quants decodes (tested bit for bit against it in tests/test_kernels.py, as the
# kernels' own decoders): a GGUF file's tensors of these need no trial decoding at load.
DECODABLE = frozenset({GGMLType.Q8_0, GGMLType.Q5_0, GGMLType.Q4_0, GGMLType.Q4_K,
                       GGMLType.Q5_K, GGMLType.Q6_K})


class TokenType(IntEnum):
    """``gguf.TokenType``: ``tokenizer.ggml.token_type``, numbered as SentencePiece's."""
    NORMAL = 1
    UNKNOWN = 2
    CONTROL = 3
    USER_DEFINED = 4
    UNUSED = 5
    BYTE = 6


class TokenizerKeys:
    """``gguf.Keys.Tokenizer``: the metadata keys of a GGUF vocabulary."""
    MODEL = "tokenizer.ggml.model"
    LIST = "tokenizer.ggml.tokens"
    TOKEN_TYPE = "tokenizer.ggml.token_type"
    SCORES = "tokenizer.ggml.scores"
    BOS_ID = "tokenizer.ggml.bos_token_id"
    EOS_ID = "tokenizer.ggml.eos_token_id"
    UNK_ID = "tokenizer.ggml.unknown_token_id"
    PAD_ID = "tokenizer.ggml.padding_token_id"
    ADD_PREFIX = "tokenizer.ggml.add_space_prefix"


def type_of(raw: int):
    """The type of id ``raw`` and its block ``(weights, bytes)``; a type newer than this table
    from ``gguf``; KeyError or ValueError if neither knows it."""
    if raw in BLOCK_SIZES:
        return GGMLType(raw), BLOCK_SIZES[raw]
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
    qtype = GGMLQuantizationType(raw)
    return qtype, GGML_QUANT_SIZES[qtype]


def dequantize(blocks: np.ndarray, qtype) -> np.ndarray:
    """``gguf.quants.dequantize``: Q8_0 (the embedding of Q4_K_M files, read on every forward
    pass) in NumPy with gguf's operations (``d * q`` in float32, bit for bit), other types by
    ``gguf.quants``."""
    if qtype != GGMLType.Q8_0:
        from gguf.quants import dequantize as by_gguf
        return by_gguf(blocks, qtype)
    shape = blocks.shape[:-1] + (blocks.shape[-1] // 34 * 32,)
    blocks = blocks.view(np.uint8).reshape(-1, 34)  # [blocks, d + 32 int8]
    d = blocks[:, :2].copy().view(np.float16).astype(np.float32)  # [blocks, 1]
    q = blocks[:, 2:].view(np.int8).astype(np.float32)  # [blocks, 32]
    return (q * d).reshape(shape)
