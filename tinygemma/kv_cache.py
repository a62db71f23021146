"""The KV cache: keys and values of the positions seen so far, float32 or compact.

A decoded token reads the whole cache of every layer once, and the cache is anonymous memory
that grows with the context: Gemma 7B (28 layers of 16 KV heads of 256, multi-head) holds
0.92 MB per position in float32, 7.5 GB at its 8192-token context, which with its 17.1 GB of
bf16 weights does not fit in 24 GB. Stored in bfloat16 it takes half (3.8 GB); the attention
still computes in float32, decoding each key and value as it reads it.

* ``float32``: exact, the reference (transformers' logits);
* ``bfloat16``: the top 16 bits of the float32, rounded to nearest even (as ``torch``'s
  ``.to(torch.bfloat16)``), 8 significant bits, float32's range; stored as uint16 bits
  (NumPy has no bfloat16);
* ``float16``: 11 significant bits, but values beyond 65504 become inf (llama.cpp's default
  cache type).

``new_cache`` on a model checks, before allocating, that its weights plus the full cache fit
in the memory the system has available, less a reserve for the process itself
(:func:`check_fits`).
"""

from __future__ import annotations

import numpy as np

from .config import GemmaConfig
from .errors import NotEnoughMemory

# The stored array type of each cache dtype: bfloat16 as its bits.
KV_DTYPES = {"float32": np.float32, "bfloat16": np.uint16, "float16": np.float16}
AUTO = "auto"  # the fast path's default: float32 while it fits comfortably, else bfloat16
COMFORTABLE = 0.8  # "auto" keeps float32 while weights + cache take at most this of the memory
# Memory the process needs beside its weights and cache, kept out of what they may take. The
# demo's peak RSS is 0.42 GB for 0.25 GB of stored weights (its panels hold 0.28 GB; Numba,
# Python and the vocabulary most of the rest: docs/performance.md), 0.47 GB with the tokenizer;
# and one 512-position chunk of logits over Gemma 3's 262,144 pieces is 0.5 GB more
# (evaluate.CHUNK). 1 GB covers these with a margin; without it a cache filling the last 0.1 GB
# would be accepted, then swap or OOM.
RESERVE = 1_000_000_000


def check_kv_dtype(dtype: str) -> str:
    """``dtype`` if it names a cache type (or "auto"); else a ValueError naming the choices."""
    if not isinstance(dtype, str) or (dtype not in KV_DTYPES and dtype != AUTO):
        raise ValueError(f"kv_dtype must be one of {', '.join(map(repr, KV_DTYPES))} or "
                         f"'{AUTO}', got {dtype!r}")
    return dtype


def to_bf16(x: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bits (uint16), rounded to nearest, ties to even (as torch).

    Adding ``0x7FFF`` plus the lowest kept bit to the float32's bits and dropping the low 16
    rounds the magnitude half to even; a carry into the exponent is the correct next power of
    two (or inf past bfloat16's largest). NaN stays NaN (the quiet NaN 0x7FC0, as torch)."""
    u = np.ascontiguousarray(x, np.float32).view(np.uint32).astype(np.uint64)  # no overflow
    bits = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)
    return np.where(np.isnan(x), np.uint16(0x7FC0), bits)


def from_bf16(u: np.ndarray) -> np.ndarray:
    """bfloat16 bits (uint16) -> float32, exactly: the bits shifted into the top half."""
    return (np.asarray(u).astype(np.uint32) << 16).view(np.float32)


def encode(x: np.ndarray, dtype: str) -> np.ndarray:
    """float32 values as stored in a cache of ``dtype`` (rounded to nearest even)."""
    if dtype == "bfloat16":
        return to_bf16(x)
    with np.errstate(over="ignore"):  # float16: beyond 65504 is inf, as documented
        return np.asarray(x).astype(KV_DTYPES[dtype])


def decode(stored: np.ndarray) -> np.ndarray:
    """Stored cache values as float32 (exact); a float32 array is returned as is, no copy."""
    if stored.dtype == np.uint16:
        return from_bf16(stored)
    return stored if stored.dtype == np.float32 else stored.astype(np.float32)


def position_bytes(config: GemmaConfig, dtype: str) -> int:
    """Bytes one position takes: a key and a value per KV head in every layer."""
    itemsize = np.dtype(KV_DTYPES[dtype]).itemsize
    return 2 * config.num_layers * config.num_kv_heads * config.head_dim * itemsize


class KVCache:
    """Keys and values of the positions seen so far, per layer ``[K, max_len, d]``.

    Preallocated for the prompt plus the tokens to generate; ``pos`` counts positions filled.
    Sliding-window layers keep every position but read only the last W. ``dtype`` is how they
    are stored (``KV_DTYPES``): ``write`` rounds float32 keys and values to it, ``read`` gives
    them back in float32; ``k`` and ``v`` hold the stored arrays (bfloat16 as uint16 bits).
    """

    def __init__(self, config: GemmaConfig, max_len: int, dtype: str = "float32"):
        if check_kv_dtype(dtype) == AUTO:
            raise ValueError("a KVCache needs a concrete dtype: 'auto' is resolved by "
                             "model.new_cache")
        shape = (config.num_kv_heads, max_len, config.head_dim)
        self.k = [np.zeros(shape, KV_DTYPES[dtype]) for _ in range(config.num_layers)]
        self.v = [np.zeros(shape, KV_DTYPES[dtype]) for _ in range(config.num_layers)]
        self.dtype = dtype
        self.max_len = max_len
        self.pos = 0

    @property
    def nbytes(self) -> int:
        """The bytes the cache holds when full (allocated lazily: pages fill as it does)."""
        return sum(a.nbytes for a in self.k + self.v)

    def write(self, i: int, start: int, k: np.ndarray, v: np.ndarray) -> None:
        """Store layer ``i``'s keys and values ``[K, T, d]`` at positions ``start, ...``."""
        end = start + k.shape[1]
        self.k[i][:, start:end] = encode(k, self.dtype)  # [K, T, d] into [K, S, d]
        self.v[i][:, start:end] = encode(v, self.dtype)

    def read(self, i: int, lo: int, hi: int) -> tuple[np.ndarray, np.ndarray]:
        """Layer ``i``'s keys and values of positions ``[lo, hi)`` in float32 ``[K, S, d]``."""
        return decode(self.k[i][:, lo:hi]), decode(self.v[i][:, lo:hi])


def available_memory() -> int | None:
    """Bytes the system can give without swapping: ``MemAvailable`` of /proc/meminfo.

    Not the total RAM: the kernel, other processes and their files take part of it. The page
    cache counts as available, including the pages of memory-mapped weights; so a model
    whose weights plus cache fit in this keeps both in memory. None where there is no
    /proc/meminfo (not Linux): then nothing is refused."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def usable_memory() -> int | None:
    """Bytes the weights and the cache may take: the available memory less ``RESERVE``."""
    free = available_memory()
    return None if free is None else free - RESERVE


def resolve(config: GemmaConfig, max_len: int, dtype: str, weight_bytes: int) -> str:
    """The concrete dtype of a cache: ``dtype``, or for "auto" float32 when the weights plus
    a float32 cache take at most ``COMFORTABLE`` of the usable memory, else bfloat16.

    Of the usable memory, not the available, so that float32 is chosen only where
    :func:`check_fits` accepts it."""
    if dtype != AUTO:
        return dtype
    usable = usable_memory()
    need = weight_bytes + max_len * position_bytes(config, "float32")
    return "float32" if usable is None or need <= COMFORTABLE * usable else "bfloat16"


def check_fits(config: GemmaConfig, max_len: int, dtype: str, weight_bytes: int) -> None:
    """Refuse, before allocating, a cache that with the weights exceeds the available memory
    less ``RESERVE``.

    Both must stay in memory: the cache is anonymous memory (there is no swap to page it to
    on most machines, and swapping it would stall every token), and the memory-mapped weights
    are read in full for every token (evicted, they are read from disk again each time). The
    process itself needs ``RESERVE`` beside them (its interpreter, vocabulary, activations)."""
    usable = usable_memory()
    cache = max_len * position_bytes(config, dtype)
    if usable is None or weight_bytes + cache <= usable:
        return
    half = max_len * position_bytes(config, "bfloat16")
    hint = (f"use a compact cache, --kv-dtype bfloat16 (kv_dtype='bfloat16': {_size(half)}), "
            "or fewer positions" if half < cache else "use fewer positions")
    raise NotEnoughMemory(
        f"a KV cache of {max_len} positions in {dtype} takes {_size(cache)}; with the weights "
        f"({_size(weight_bytes)}) that is {_size(weight_bytes + cache)}, more than the "
        f"{_size(usable + RESERVE)} of memory available (MemAvailable) less {_size(RESERVE)} "
        f"kept for the process itself: {hint}")


def _size(n: int) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 10_000_000 else f"{n:,} bytes"
