"""A bounded, fast reader of the GGUF header: metadata and tensor infos, data memory-mapped.

``gguf.GGUFReader`` builds a NumPy view per array element, so a 262,144-token vocabulary takes
~9 s to open; here numeric arrays are one ``np.frombuffer`` and strings one loop, ~0.2 s.
Every count and length is checked against the bytes left in the file before anything is
allocated, so a hostile header gives a :class:`CheckpointError`, never a hang or a huge
allocation. Quantisation types, block sizes and dequantisation still come from ``gguf``.

GGUF v2/v3 layout (little-endian): ``"GGUF"``, u32 version, u64 tensor count, u64 metadata
count; metadata ``(string key, u32 type, value)``; tensor infos ``(string name, u32 n_dims,
u64 dims[n_dims] innermost first, u32 type, u64 offset)``; padding to ``general.alignment``
(32); tensor data.
"""

from __future__ import annotations

import mmap
import os
import struct
import weakref
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from ..errors import CheckpointError, CheckpointNotFound
from .ggml import type_of

# GGUF metadata value types -> NumPy scalar types (8 is string, 9 is array).
_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q",
            12: "d"}  # struct codes (little-endian), also NumPy dtype codes with a "<"
_STRING, _ARRAY = 8, 9
MAX_DIMS = 4
MAX_NESTING = 8  # arrays of arrays: real files nest 1 or 2 deep; hostile ones 10^5 (recursion)


@dataclass
class TensorInfo:
    name: str
    shape: tuple[int, ...]  # NumPy order: outermost first, [out, in] for a matrix
    qtype: object  # gguf.GGMLQuantizationType
    data: np.ndarray  # the stored bytes, uint8 [rows, bytes per row] (a view of the file)
    rows: "RowReader | None" = None  # the same rows read from the open file, without the map


class RowReader:
    """Rows of one tensor read with ``os.pread`` from the open file instead of the memory map.

    A row read through the map brings the pages around it into the process too: at each
    fault the kernel maps a window of the file (about 140 KB measured on Linux 6.x, madvise
    or not), so looking up the embedding rows of a 500-token prompt added up to 40 MB to the
    RSS for 1.3 MB of rows. ``file`` is the open file (its descriptor closed with the last
    reader), ``offset`` where the tensor starts, ``shape`` its ``[rows, bytes per row]``.
    """

    def __init__(self, file: "_OpenFile", offset: int, shape: tuple[int, int]):
        self.file, self.offset, self.shape = file, offset, shape

    def __call__(self, idx: np.ndarray) -> np.ndarray:
        """The stored bytes of rows ``idx`` (integers, any shape), uint8 ``[*idx.shape, row
        bytes]``; an id outside the tensor is an IndexError, as NumPy's indexing."""
        n, width = self.shape
        idx = np.asarray(idx)
        rows = np.where(idx < 0, idx + n, idx).reshape(-1)  # [k]
        bad = (rows < 0) | (rows >= n)  # [k]
        if bad.any():
            raise IndexError(f"row {int(idx.reshape(-1)[bad.argmax()])} is outside a tensor "
                             f"of {n} rows")
        out = np.empty((rows.size, width), np.uint8)  # [k, bytes per row]
        for k, r in enumerate(rows.tolist()):
            if os.preadv(self.file.fd, [out[k]], self.offset + r * width) != width:
                raise OSError(f"{self.file.path}: row {r} could not be read: the file shrank")
        return out.reshape(idx.shape + (width,))


class _OpenFile:
    """A file descriptor kept open while a tensor reads from it, closed when the last goes."""

    def __init__(self, path: str):
        self.path = path
        self.fd = os.open(path, os.O_RDONLY)
        weakref.finalize(self, os.close, self.fd)


LAZY_STRINGS = 1024  # string arrays at least this long are decoded when first read


class Strings(Sequence):
    """A GGUF array of strings (already checked to lie in the file), decoded when first read.

    A vocabulary's 262,144 pieces took 0.1-0.2 s to decode at every start, and only a
    tokenizer built from them reads them (the loader's vocabulary cache usually builds it
    without). Compares equal to the list of its strings."""

    def __init__(self, mm, start: int, count: int):
        self._mm, self._start, self._count = mm, start, count
        self._items: list[str] | None = None

    def _list(self) -> list[str]:
        if self._items is None:
            mm, pos, length, items = self._mm, self._start, struct.Struct("<Q").unpack_from, []
            for _ in range(self._count):
                n = length(mm, pos)[0]
                items.append(mm[pos + 8:pos + 8 + n].decode("utf-8", errors="replace"))
                pos += 8 + n
            self._items = items
        return self._items

    def __len__(self) -> int:
        return self._count

    def __getitem__(self, i):
        return self._list()[i]

    def __eq__(self, other):
        if isinstance(other, (list, tuple, Strings)):
            return self._list() == list(other)
        return NotImplemented

    __hash__ = None

    def __repr__(self) -> str:
        return f"<{self._count} strings of a GGUF array>"


class GGUFFile:
    """The metadata (a dict of Python values) and tensors of a GGUF file."""

    def __init__(self, path: str):
        self.path = path
        if not os.path.exists(path):
            raise CheckpointNotFound(f"{path}: no such GGUF file")
        try:
            self.file = _OpenFile(path)  # the map for the tensors' data, the file for rows
            self.mm = mmap.mmap(self.file.fd, 0, access=mmap.ACCESS_READ)
        except (OSError, ValueError) as e:
            raise CheckpointError(f"{path}: cannot map the GGUF file ({e})") from None
        self.buf = np.frombuffer(self.mm, dtype=np.uint8)  # tensor data: views, no copies
        self.pos = 0
        self.metadata: dict[str, object] = {}
        self.tensors: list[TensorInfo] = []
        self._parse()

    # ---- primitive reads, each bounded by the bytes left --------------------------------
    def _fail(self, what: str):
        raise CheckpointError(f"{self.path}: {what} (at byte {self.pos} of {len(self.buf)}): "
                              "truncated or not a GGUF file")

    def _take(self, n: int) -> int:
        """Claim the next n bytes; return where they start."""
        if n < 0 or self.pos + n > len(self.mm):
            self._fail(f"a field of {n} bytes runs beyond the file")
        self.pos += n
        return self.pos - n

    def _scalar(self, code: str):
        return struct.unpack_from("<" + code, self.mm, self._take(struct.calcsize(code)))[0]

    def _string(self) -> str:
        n = self._scalar("Q")
        at = self._take(n)
        return self.mm[at:at + n].decode("utf-8", errors="replace")

    def _strings(self, count: int) -> list[str] | Strings:
        """An array of ``count`` strings, checked to lie in the file; a long one (a
        vocabulary) as :class:`Strings`, decoded when first read."""
        start = self.pos
        mm, pos, end, length = self.mm, self.pos, len(self.mm), struct.Struct("<Q").unpack_from
        for _ in range(count):
            if pos + 8 > end:
                self.pos = pos
                self._fail("a field of 8 bytes runs beyond the file")
            n = length(mm, pos)[0]
            pos += 8
            if pos + n > end:
                self.pos = pos
                self._fail(f"a field of {n} bytes runs beyond the file")
            pos += n
        self.pos = pos
        strings = Strings(mm, start, count)
        return strings if count >= LAZY_STRINGS else list(strings)

    def _value(self, vtype: int, depth: int = 0):
        if vtype in _SCALARS:
            return self._scalar(_SCALARS[vtype])
        if vtype == _STRING:
            return self._string()
        if vtype == _ARRAY:
            itype, count = self._scalar("I"), self._scalar("Q")
            if itype in _SCALARS:
                dtype = np.dtype("<" + _SCALARS[itype])  # a read-only view of the map, no
                # copy: the vocabulary's scores and types (2 MB for Gemma 3) stay in the page
                # cache, out of the RSS once the pages are released, read only if used
                return self.buf[self._take(count * dtype.itemsize):self.pos].view(dtype)
            if count * 8 > len(self.mm) - self.pos:  # each element needs 8 bytes at least
                self._fail(f"an array of {count} elements cannot fit")
            if itype == _STRING:
                return self._strings(count)
            if depth >= MAX_NESTING:
                self._fail(f"arrays nested more than {MAX_NESTING} deep")
            return [self._value(itype, depth + 1) for _ in range(count)]
        self._fail(f"unknown metadata value type {vtype}")

    # ---- the file ----------------------------------------------------------------------------
    def _parse(self):
        if bytes(self.buf[:4]) != b"GGUF":
            raise CheckpointError(f"{self.path}: not a GGUF file (no GGUF magic)")
        if len(self.buf) < 24:  # magic, version, tensor count, metadata count
            raise CheckpointError(f"{self.path}: {len(self.buf)} bytes, shorter than the 24 of a "
                                  "GGUF header: truncated")
        self.pos = 4
        version = self._scalar("I")
        if version not in (2, 3):
            raise CheckpointError(f"{self.path}: GGUF version {version} is not supported (2, 3)")
        n_tensors, n_kv = self._scalar("Q"), self._scalar("Q")
        if n_kv * 12 > len(self.buf) or n_tensors * 24 > len(self.buf):
            self._fail(f"{n_kv} metadata entries / {n_tensors} tensors cannot fit")
        for _ in range(n_kv):
            key = self._string()
            self.metadata[key] = self._value(self._scalar("I"))
        infos = [self._tensor_info() for _ in range(n_tensors)]
        align = self.metadata.get("general.alignment", 32)
        if not isinstance(align, int) or align <= 0 or align & (align - 1):
            raise CheckpointError(f"{self.path}: general.alignment {align!r} is not a power of two")
        start = -(-self.pos // align) * align
        self.tensors = [self._tensor(start, *info) for info in infos]

    def _tensor_info(self):
        name = self._string()
        n_dims = self._scalar("I")
        if not 1 <= n_dims <= MAX_DIMS:
            self._fail(f"tensor {name!r} has {n_dims} dimensions")
        dims = [self._scalar("Q") for _ in range(n_dims)]
        return name, dims, self._scalar("I"), self._scalar("Q")

    def _tensor(self, start, name, dims, raw_type, offset) -> TensorInfo:
        try:
            qtype, (block, type_size) = type_of(raw_type)
        except (ValueError, KeyError):
            raise CheckpointError(f"{self.path}: tensor {name!r} has unknown GGML type "
                                  f"{raw_type}") from None
        if any(d <= 0 for d in dims) or dims[0] % block:
            raise CheckpointError(f"{self.path}: tensor {name!r} has dims {dims}, not whole "
                                  f"blocks of {block} for {qtype.name}")
        row_bytes = dims[0] // block * type_size
        rows = int(np.prod(dims[1:], dtype=object))
        begin, nbytes = start + offset, rows * row_bytes
        if begin + nbytes > len(self.buf):
            raise CheckpointError(f"{self.path}: tensor {name!r} ({nbytes} bytes at offset "
                                  f"{offset}) runs beyond the end of the file: truncated?")
        data = self.buf[begin:begin + nbytes].reshape(rows, row_bytes)
        return TensorInfo(name, tuple(reversed(dims)), qtype, data,
                          RowReader(self.file, begin, (rows, row_bytes)))

    def release_pages(self) -> None:
        """Drop the pages of the file this process has read through the map (the header,
        the rows checked or copied while loading) from its RSS. The map is read-only and
        shared, so nothing is lost: a later read maps them again from the page cache."""
        if hasattr(mmap, "MADV_DONTNEED"):
            try:
                self.mm.madvise(mmap.MADV_DONTNEED)
            except OSError:
                pass


def read_gguf(path: str) -> GGUFFile:
    return GGUFFile(os.fspath(path))


__all__ = ["GGUFFile", "RowReader", "Strings", "TensorInfo", "read_gguf"]
