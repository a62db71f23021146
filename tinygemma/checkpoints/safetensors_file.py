"""A safetensors reader that memory-maps bf16, f16 and f32 tensors without copying them.

The safetensors package's NumPy API cannot return bfloat16, so the file is read here:
8 bytes little-endian header length, a JSON header ``{name: {dtype, shape, data_offsets}}``,
then the data. Every length and offset is checked against the file size before anything is
mapped, so a truncated or hostile file gives a clear error, never a crash or a huge allocation.
"""

from __future__ import annotations

import json
import math
import os
import struct

import numpy as np

from ..errors import CheckpointError, CheckpointNotFound
from .weights import BF16Tensor, F16Tensor, Tensor

DTYPES = {"BF16": (np.uint16, BF16Tensor), "F16": (np.float16, F16Tensor),
          "F32": (np.float32, Tensor)}
MAX_HEADER = 100 << 20  # a header larger than 100 MB is not a real checkpoint


def read_header(path: str) -> tuple[dict, int, int]:
    """(header dict, offset of the data section, file size), everything validated."""
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise CheckpointError(f"{path}: truncated safetensors file ({size} bytes)")
            (n,) = struct.unpack("<Q", head)
            if n > MAX_HEADER or 8 + n > size:
                raise CheckpointError(f"{path}: header length {n} runs beyond the file "
                                      f"({size} bytes): truncated or not a safetensors file")
            raw = f.read(n)
    except FileNotFoundError:
        raise CheckpointNotFound(f"{path}: no such safetensors file") from None
    try:
        header = json.loads(raw)
    except (ValueError, RecursionError) as e:  # bad JSON, a 5000-digit int, 10^5 nested lists
        raise CheckpointError(f"{path}: the safetensors header is not valid JSON ({e})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: the safetensors header is not a JSON object")
    return header, 8 + n, size


def load_safetensors(path: str) -> dict[str, Tensor]:
    """Every tensor of one file, memory-mapped: name -> compact Tensor."""
    header, start, size = read_header(path)
    mm = np.memmap(path, dtype=np.uint8, mode="r") if size > start else np.zeros(0, np.uint8)
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        out[name] = _tensor(path, name, info, mm, start, size)
    return out


def _tensor(path, name, info, mm, start, size) -> Tensor:
    if not isinstance(info, dict):
        raise CheckpointError(f"{path}: tensor {name!r}: header entry is not an object")
    dtype = info.get("dtype")
    if dtype not in DTYPES:
        raise CheckpointError(f"{path}: tensor {name!r} has dtype {dtype!r}; "
                              f"tinygemma reads {', '.join(DTYPES)}")
    np_dtype, cls = DTYPES[dtype]
    shape, offsets = info.get("shape"), info.get("data_offsets")
    if (not isinstance(shape, list) or not all(_is_int(s) and s >= 0 for s in shape)
            or not isinstance(offsets, list) or len(offsets) != 2 or not all(map(_is_int, offsets))):
        raise CheckpointError(f"{path}: tensor {name!r}: malformed shape or data_offsets")
    begin, end = offsets
    # Exact Python ints: np.prod in int64 wraps, and [2**32, 2**32] would "hold" 0 bytes.
    nbytes = math.prod(shape) * np.dtype(np_dtype).itemsize
    if not 0 <= begin <= end or end - begin != nbytes:
        raise CheckpointError(f"{path}: tensor {name!r}: data_offsets {offsets} do not hold "
                              f"shape {shape} of {dtype} ({nbytes} bytes)")
    if start + end > size:
        raise CheckpointError(f"{path}: tensor {name!r}: data_offsets {offsets} run beyond the "
                              f"end of the file ({size} bytes): truncated shard?")
    data = mm[start + begin:start + end].view(np_dtype).reshape(shape)
    return cls(data)


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)  # JSON true is not a dimension
