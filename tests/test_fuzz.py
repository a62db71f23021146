"""Property-based fuzzing of the checkpoint header parsers (hypothesis).

Hostile bytes, hand-built hostile headers and mutations of valid tiny files are fed to the
safetensors reader, the GGUF header reader and the whole GGUF loader. The properties:

* the only exceptions are ours (``CheckpointError`` / ``CheckpointNotFound``, which subclass
  ``ValueError`` / ``OSError``): never a crash, a raw ``struct.error``, ``KeyError``,
  ``RecursionError``, ``MemoryError``...;
* memory stays bounded: the peak traced allocation of one parse is a few MB for files of a
  few KB, whatever sizes and counts the header claims (a count of 2**60 must not be believed);
* time stays bounded: each example has a hypothesis deadline, so a hang fails the test.

500 examples per property (3,500 in all), ~30 s; derandomized, so CI runs are repeatable.
``TINYGEMMA_FUZZ_EXAMPLES=20000 pytest tests/test_fuzz.py`` runs a longer local campaign.
"""

from __future__ import annotations

import itertools
import json
import os
import struct
import tempfile
import tracemalloc
from datetime import timedelta

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tiny import safetensors_bytes, random_tensors, tiny_config, write_gguf
from tinygemma.checkpoints.gguf_file import load_gguf
from tinygemma.checkpoints.gguf_header import read_gguf
from tinygemma.checkpoints.safetensors_file import load_safetensors
from tinygemma.errors import TinyGemmaError

EXAMPLES = int(os.environ.get("TINYGEMMA_FUZZ_EXAMPLES", "500"))
MAX_PEAK = 8 << 20  # bytes: a parse of a file of a few KB may not allocate more than this
FUZZ = settings(max_examples=EXAMPLES, deadline=timedelta(seconds=3), derandomize=True,
                database=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

_dir = tempfile.mkdtemp(prefix="tinygemma-fuzz-")
_counter = itertools.count()


def parse(reader, data: bytes, suffix: str):
    """Run ``reader`` on ``data`` written to a fresh file; only our errors may escape.

    Returns the result or None (rejected); asserts on the memory peak.
    """
    path = os.path.join(_dir, f"{next(_counter)}{suffix}")
    with open(path, "wb") as f:
        f.write(data)
    tracemalloc.start()
    try:
        return reader(path)
    except TinyGemmaError as e:  # a clear error names the file
        assert isinstance(e, (ValueError, OSError))
        assert path in str(e), f"the error does not name the file: {e}"
        return None
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        os.remove(path)  # unlinking a mapped file is fine: the mapping lives on
        assert peak < MAX_PEAK, f"{peak} bytes allocated to parse a {len(data)}-byte file"


# ---- safetensors -------------------------------------------------------------------------------
def _valid_safetensors() -> bytes:
    cfg = tiny_config(1, num_hidden_layers=1, vocab_size=8, hidden_size=8, intermediate_size=8,
                      head_dim=4)
    return safetensors_bytes(random_tensors(cfg))


VALID_ST = _valid_safetensors()
huge_ints = st.one_of(st.integers(-2, 64), st.integers(0, 2**64 + 5), st.just(2**63 - 1),
                      st.just(2**32), st.booleans(), st.floats(allow_nan=True), st.none(),
                      st.text(max_size=4))
st_entries = st.fixed_dictionaries({}, optional={
    "dtype": st.sampled_from(["BF16", "F16", "F32", "I64", "F8_E4M3", "bf16", "", "U8"]) | st.integers(),
    "shape": st.lists(huge_ints, max_size=5) | huge_ints,
    "data_offsets": st.lists(huge_ints, max_size=3) | huge_ints,
})
st_headers = st.dictionaries(st.text(max_size=8), st_entries | huge_ints | st.lists(huge_ints),
                             max_size=4)


@FUZZ
@given(st.binary(max_size=600))
def test_safetensors_random_bytes(data):
    parse(load_safetensors, data, ".safetensors")


@FUZZ
@given(st.binary(max_size=64), st.integers(0, 2**64 - 1))
def test_safetensors_random_header_length(data, n):
    parse(load_safetensors, struct.pack("<Q", n) + data, ".safetensors")


@FUZZ
@given(st_headers, st.integers(0, 300), st.integers(-16, 16))
def test_safetensors_hostile_json_header(header, data_size, length_error):
    text = json.dumps(header).encode()
    data = struct.pack("<Q", max(0, len(text) + length_error)) + text + bytes(data_size)
    tensors = parse(load_safetensors, data, ".safetensors")
    for t in (tensors or {}).values():  # what is accepted decodes, and fits in the file
        assert t.nbytes <= len(data)
        t.f32()


@FUZZ
@given(st.data())
def test_safetensors_mutated_valid_file(data):
    blob = bytearray(VALID_ST)
    n_header = struct.unpack("<Q", blob[:8])[0] + 8
    for _ in range(data.draw(st.integers(1, 4))):  # overwrite bytes, mostly in the header
        at = data.draw(st.integers(0, n_header + 16 if data.draw(st.booleans()) else len(blob) - 1))
        blob[at] = data.draw(st.integers(0, 255))
    cut = data.draw(st.one_of(st.just(len(blob)), st.integers(0, len(blob))))
    parse(load_safetensors, bytes(blob[:cut]), ".safetensors")


def test_safetensors_deeply_nested_header(tmp_path):
    """Python's JSON parser recurses: 100,000 nested arrays must be an error, not RecursionError."""
    text = b"[" * 100_000 + b"]" * 100_000
    parse(load_safetensors, struct.pack("<Q", len(text)) + text, ".safetensors")


def test_safetensors_shape_product_overflow():
    """shape [2**32, 2**32] has 2**64 elements: 0 in int64 arithmetic, so offsets [0, 0] fit."""
    header = {"w": {"dtype": "F32", "shape": [2**32, 2**32], "data_offsets": [0, 0]}}
    text = json.dumps(header).encode()
    assert parse(load_safetensors, struct.pack("<Q", len(text)) + text, ".safetensors") is None


# ---- GGUF --------------------------------------------------------------------------------------
def _valid_gguf() -> bytes:
    path = os.path.join(_dir, "valid.gguf")
    write_gguf(path, family=2, vocab=False, num_hidden_layers=1, vocab_size=8, hidden_size=32,
               intermediate_size=32, head_dim=32, num_attention_heads=1)
    with open(path, "rb") as f:
        return f.read()


VALID_GGUF = _valid_gguf()
u32 = st.integers(0, 2**32 - 1)
u64 = st.one_of(st.integers(0, 40), st.integers(0, 2**64 - 1), st.just(2**63), st.just(2**61))


def _gguf_string(s: bytes) -> bytes:
    return struct.pack("<Q", len(s)) + s


@st.composite
def gguf_value(draw, depth=0):
    """(type, encoded value) of a metadata value, with hostile lengths and counts now and then."""
    vtype = draw(st.integers(0, 14))
    if vtype in (0, 1, 7):
        return vtype, draw(st.binary(min_size=1, max_size=1))
    if vtype in (2, 3):
        return vtype, draw(st.binary(min_size=2, max_size=2))
    if vtype in (4, 5, 6):
        return vtype, draw(st.binary(min_size=4, max_size=4))
    if vtype in (10, 11, 12):
        return vtype, draw(st.binary(min_size=8, max_size=8))
    if vtype == 8:
        s = draw(st.binary(max_size=12))
        n = draw(st.one_of(st.just(len(s)), u64))
        return vtype, struct.pack("<Q", n) + s
    if vtype == 9 and depth < 3:
        items = draw(st.lists(gguf_value(depth + 1), max_size=4))
        itype = items[0][0] if items and draw(st.booleans()) else draw(u32)
        count = draw(st.one_of(st.just(len(items)), u64))
        return vtype, struct.pack("<IQ", itype, count) + b"".join(v for _, v in items)
    return vtype, draw(st.binary(max_size=8))


@st.composite
def gguf_files(draw):
    kvs = draw(st.lists(st.tuples(st.sampled_from([b"general.alignment", b"general.architecture",
                                                   b"gemma.block_count", b"x"]) | st.binary(max_size=6),
                                  gguf_value()), max_size=4))
    infos = []
    for _ in range(draw(st.integers(0, 3))):
        dims = draw(st.lists(u64, max_size=5))
        infos.append(_gguf_string(draw(st.sampled_from([b"token_embd.weight", b"blk.0.attn_q.weight",
                                                        b"t"])))
                     + struct.pack("<I", draw(st.one_of(st.just(len(dims)), u32)))
                     + b"".join(struct.pack("<Q", d) for d in dims)
                     + struct.pack("<IQ", draw(st.one_of(st.integers(0, 40), u32)), draw(u64)))
    version = draw(st.one_of(st.just(3), st.just(2), u32))
    n_tensors = draw(st.one_of(st.just(len(infos)), u64))
    n_kv = draw(st.one_of(st.just(len(kvs)), u64))
    body = b"".join(_gguf_string(k) + struct.pack("<I", t) + v for k, (t, v) in kvs) + b"".join(infos)
    return b"GGUF" + struct.pack("<IQQ", version, n_tensors, n_kv) + body + draw(st.binary(max_size=300))


@FUZZ
@given(st.binary(max_size=400))
def test_gguf_random_bytes(data):
    parse(read_gguf, data, ".gguf")


@FUZZ
@given(st.binary(max_size=400))
def test_gguf_random_bytes_after_magic(data):
    parse(read_gguf, b"GGUF\x03\x00\x00\x00" + data, ".gguf")


@FUZZ
@given(gguf_files())
def test_gguf_hostile_header(data):
    f = parse(read_gguf, data, ".gguf")
    for t in (f.tensors if f else ()):  # what is accepted lies inside the file
        assert t.data.nbytes <= len(data)


@FUZZ
@given(gguf_files())
def test_load_gguf_hostile_header(data):
    parse(load_gguf, data, ".gguf")


@FUZZ
@given(st.data())
def test_load_gguf_mutated_valid_file(data):
    blob = bytearray(VALID_GGUF)
    header_end = VALID_GGUF.index(b"ffn_down") + 200  # metadata and tensor infos lie before this
    for _ in range(data.draw(st.integers(1, 4))):
        at = data.draw(st.integers(0, min(header_end, len(blob) - 1)))
        blob[at] = data.draw(st.sampled_from([0, 1, 2, 3, 9, 0x7F, 0x80, 0xFF]) | st.integers(0, 255))
    cut = data.draw(st.one_of(st.just(len(blob)), st.integers(0, len(blob))))
    parse(load_gguf, bytes(blob[:cut]), ".gguf")


def test_gguf_deeply_nested_arrays():
    """Arrays of arrays nested 100,000 deep: an error, not a RecursionError."""
    nest = struct.pack("<IQ", 9, 1) * 100_000 + struct.pack("<IQ", 4, 0)
    data = (b"GGUF" + struct.pack("<IQQ", 3, 0, 1) + _gguf_string(b"k") + struct.pack("<I", 9)
            + nest)
    assert parse(read_gguf, data, ".gguf") is None


def test_gguf_huge_block_count():
    """block_count 2**40 must be refused before anything is sized by it."""
    blob = bytearray(VALID_GGUF)
    key = b"gemma2.block_count"
    at = blob.index(key) + len(key)  # then u32 type (4 = uint32) and the value
    assert struct.unpack_from("<I", blob, at)[0] == 4
    blob[at:at + 8] = struct.pack("<II", 4, 2**31)  # 2**31 layers: tuple of 2**31 would be 16 GB
    assert parse(load_gguf, bytes(blob), ".gguf") is None


@pytest.mark.parametrize("raw", [b"", b"G", b"GGUF", b"GGUF\x03\x00\x00\x00", b"\x00" * 24])
def test_gguf_tiny_files(raw):
    assert parse(read_gguf, raw, ".gguf") is None


@pytest.mark.parametrize("raw", [b"", b"\x00" * 7, b"\x00" * 8, b"\x02\x00\x00\x00\x00\x00\x00\x00{}",
                                 b"\x02\x00\x00\x00\x00\x00\x00\x00[]"])
def test_safetensors_tiny_files(raw):
    result = parse(load_safetensors, raw, ".safetensors")
    assert result in (None, {})


def test_valid_files_still_parse():
    assert len(parse(load_safetensors, VALID_ST, ".safetensors")) == len(
        json.loads(VALID_ST[8:8 + struct.unpack("<Q", VALID_ST[:8])[0]]))
    config, tensors, _ = parse(load_gguf, VALID_GGUF, ".gguf")
    assert config.num_layers == 1 and tensors["layers.0.q"].shape == (32, 32)
    np.testing.assert_equal(np.isfinite(tensors["embed"].f32()).all(), True)
