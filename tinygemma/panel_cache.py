"""Panels unpacked once per checkpoint, kept in a file and memory-mapped by later starts.

The fast path reads GGUF blocks (and bf16 with ``quantize="int8"``) as panels of int8, 5- or 4-bit
weights (``kernels.matvec.Packed``). Unpacking the demo's 268 M weights into that layout took
about a second at every start, more than the rest of loading. llama.cpp starts fast because its
file is its working layout; here the working layout is written to a file once, beside Numba's
cache (``<Numba cache>/tinygemma-panels/``), and later starts map it: no unpacking, and pages
that the OS shares between processes and can drop under memory pressure.

The file holds only numbers, never pickles: its layout is computed from the checkpoint's
tensors (names, types, shapes), each array at a page-aligned offset, the stacked projections
(q, k, v; gate, up) already side by side as ``Packed.stacked`` would lay them. A header (page 0)
holds a key, SHA-256 of:

* the checkpoint's identity: its real path and, per file, device, inode, size and the
  modification and status-change times in nanoseconds (a file written in place or replaced
  changes them; the status-change time cannot be set back by a program). Hashing the content
  instead would cost a third of a start-up;
* the code that lays panels out: every file of ``kernels/`` and this one;
* the layout itself and ``quantize``.

A file whose header, key or size does not match (another checkpoint, edited packing code, a
truncated or half-written file) is never read: it is rebuilt, written to a temporary file and
renamed into place (a reader never sees a partial file). Bytes corrupted inside a complete file
(a failing disk) are not detected, as a GGUF's are not. When the folder cannot be written, the
panels are unpacked in memory as before, after one line on stderr.

``TINYGEMMA_PANEL_CACHE``: a folder to use instead, or ``0`` for none. Checkpoints whose panels
take under ``MIN_BYTES`` unpack in a blink and are not cached.
"""

from __future__ import annotations

import hashlib
import json
import mmap
import os
import sys
import tempfile

import numpy as np

MIN_BYTES = 16 << 20  # smaller panels unpack in under 0.1 s: not worth a file
MAGIC = b"tinygemma panels"  # 16 bytes
FORMAT = 1  # of this file layout; part of the key
HEADER = mmap.PAGESIZE  # the header page; arrays follow, each page-aligned
SUFFIX = ".panels"
_warned: list[str] = []


def cache_folder() -> str | None:
    """Where the panel files go: ``TINYGEMMA_PANEL_CACHE``, else beside Numba's cache (None:
    no cache, the panels are unpacked in memory)."""
    env = os.environ.get("TINYGEMMA_PANEL_CACHE", "")
    if env == "0":
        return None
    if env:
        return env
    from .numba_cache import CACHE_DIR
    return os.path.join(CACHE_DIR, "tinygemma-panels") if CACHE_DIR else None


def source_stamp(path: str) -> list | None:
    """The identity of a checkpoint's files (module docstring); None if it cannot be read."""
    try:
        real = os.path.realpath(path)
        files = ([real] if os.path.isfile(real) else
                 sorted(os.path.join(real, n) for n in os.listdir(real)
                        if n.endswith(".safetensors")))
        stamps = []
        for f in files:
            st = os.stat(f)
            stamps.append([f, st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns])
        return stamps or None
    except OSError:
        return None


def _code_hash() -> bytes:
    from .numba_cache import kernels_source_hash
    with open(os.path.abspath(__file__), "rb") as f:
        return hashlib.sha256(kernels_source_hash() + f.read()).digest()


class Plan:
    """Where each panel matrix of ``tensors`` lies in the file.

    ``groups``: names stacked for one matvec; a group whose parts cannot be one stack
    (``matvec.stackable``) is laid out part by part. ``entries``: one per group or single
    matrix, ``(names, regions)`` with ``regions[k] = (offset, shape, dtype)`` for ``k`` in
    ``q``, ``scale`` (and ``shift``), the parts' panels one after another.
    """

    def __init__(self, tensors: dict, names, quantize: str | None, groups):
        from .kernels.matvec import PANEL, panel_arrays, stack_unpacking, unpacking
        self.tensors, self.quantize = tensors, quantize
        how = {}
        for n in sorted(names):
            t = tensors[n]
            if len(t.shape) == 2:
                kind, h = unpacking(t, quantize)
                if h is not None:
                    how[n] = kind, h
        laid, self.wide = [], set()  # wide: 5-bit weights in int8 panels, to stack
        for g in groups:
            g = tuple(g)
            wide = (stack_unpacking([tensors[n] for n in g], quantize)
                    if all(n in how for n in g) else None)
            if wide is not None:
                for n, w in zip(g, wide):
                    how[n] = unpacking(tensors[n], quantize, w)
                    if w:
                        self.wide.add(n)
                laid.append(g)
        grouped = {n for g in laid for n in g}
        laid += [(n,) for n in how if n not in grouped]
        self.how = how
        self.entries, offset = [], HEADER
        for g in laid:
            regions = {}
            parts = [panel_arrays(how[n][1], *tensors[n].shape) for n in g]
            for k, (shape, dtype) in parts[0].items():
                shape = (sum(p[k][0][0] for p in parts),) + shape[1:]
                regions[k] = (offset, shape, np.dtype(dtype).str)
                nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
                offset += -(-nbytes // HEADER) * HEADER  # page-aligned
            self.entries.append((g, regions))
        self.size = offset
        self.panel = PANEL

    @property
    def nbytes(self) -> int:
        return self.size - HEADER

    def key(self, stamp: list) -> bytes:
        desc = {"format": FORMAT, "source": stamp, "quantize": self.quantize,
                "layout": [[list(g), [[n, self.how[n][0], list(self.tensors[n].shape)]
                                      for n in g], regions] for g, regions in self.entries],
                "byteorder": sys.byteorder}
        return hashlib.sha256(json.dumps(desc).encode() + _code_hash()).digest()

    def arrays(self, buf) -> list[tuple[tuple, dict]]:
        """Each entry's regions as arrays over ``buf`` (an mmap of the file)."""
        out = []
        for g, regions in self.entries:
            out.append((g, {k: np.frombuffer(buf, np.dtype(dt), int(np.prod(shape)), off)
                            .reshape(shape) for k, (off, shape, dt) in regions.items()}))
        return out

    def fill(self, buf) -> None:
        """Unpack every matrix into its place in ``buf`` (a writable map of a zeroed file)."""
        from .kernels.matvec import Packed
        for g, arrays in self.arrays(buf):
            p0 = 0
            for n in g:
                p1 = p0 + -(-self.tensors[n].shape[0] // self.panel)
                Packed(self.tensors[n], self.quantize, out={k: a[p0:p1] for k, a in arrays.items()},
                       wide=n in self.wide)
                p0 = p1

    def packed(self, buf) -> tuple[dict, dict]:
        """``(matrices, stacks)``: :class:`Packed` views of ``buf``, by name and by group."""
        from .kernels.matvec import Packed
        matrices, stacks = {}, {}
        for g, arrays in self.arrays(buf):
            p0 = 0
            for n in g:
                p1 = p0 + -(-self.tensors[n].shape[0] // self.panel)
                matrices[n] = Packed.of_panels(self.how[n][0], self.tensors[n].shape,
                                               arrays["q"][p0:p1], arrays["scale"][p0:p1],
                                               arrays["shift"][p0:p1] if "shift" in arrays
                                               else None)
                p0 = p1
            if len(g) > 1:
                rows = sum(self.tensors[n].shape[0] for n in g)
                stacks[g] = Packed.of_panels("+".join(sorted({self.how[n][0] for n in g})),
                                             (rows, self.tensors[g[0]].shape[1]), arrays["q"],
                                             arrays["scale"], arrays.get("shift"))
        return matrices, stacks


def _open(path: str, key: bytes, size: int):
    """A private (copy-on-write) map of the file if its header and size are right, else None.

    Copy-on-write keeps the arrays writable, as unpacked ones are, so the kernels' compiled
    versions are the same (Numba types read-only arrays apart); nothing writes to them."""
    try:
        with open(path, "rb") as f:
            head = f.read(len(MAGIC) + 40)
            if (os.fstat(f.fileno()).st_size != size or head[:16] != MAGIC
                    or head[16:48] != key or int.from_bytes(head[48:56], "little") != size):
                return None
            return mmap.mmap(f.fileno(), size, access=mmap.ACCESS_COPY)
    except (OSError, ValueError):
        return None


def _build(path: str, key: bytes, plan: Plan, source: str) -> None:
    """Write the panel file: into a temporary file of the folder, header last, then renamed."""
    folder = os.path.dirname(path)
    os.makedirs(folder, mode=0o700, exist_ok=True)
    _remove_orphans(folder)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".building-", suffix=SUFFIX)
    try:
        os.ftruncate(fd, plan.size)  # reads as zeros: 4- and 5-bit panels' bits are ORed in
        buf = mmap.mmap(fd, plan.size, access=mmap.ACCESS_WRITE)
        try:
            plan.fill(buf)
            buf.flush()
        finally:
            try:
                buf.close()
            except BufferError:  # a view still alive: unmapped when it goes
                pass
        source_bytes = os.fsencode(os.path.realpath(source))[:HEADER - 64]
        header = (MAGIC + key + plan.size.to_bytes(8, "little")
                  + len(source_bytes).to_bytes(8, "little") + source_bytes)
        os.pwrite(fd, header, 0)
        os.fsync(fd)
        os.close(fd)
        fd = -1
        os.replace(tmp, path)
    except BaseException:
        if fd >= 0:
            os.close(fd)
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def _remove_orphans(folder: str) -> None:
    """Panel files of checkpoints that no longer exist: removed when another is written."""
    try:
        names = os.listdir(folder)
    except OSError:
        return
    for name in names:
        if not name.endswith(SUFFIX) or name.startswith("."):
            continue
        path = os.path.join(folder, name)
        try:
            with open(path, "rb") as f:
                head = f.read(64 + HEADER)
            n = int.from_bytes(head[56:64], "little")
            source = os.fsdecode(head[64:64 + n])
            if head[:16] == MAGIC and n and not os.path.exists(source):
                os.unlink(path)
        except OSError:
            pass


def load(tensors: dict, names, quantize: str | None, source: str | None, groups):
    """``(matrices, stacks)`` of the panel matrices among ``names``, mapped from the cache file
    of the checkpoint at ``source`` (written first if missing or stale); None when there is
    no cache (no folder, no source, small panels, the folder cannot be written)."""
    folder = cache_folder()
    if folder is None or source is None:
        return None
    plan = Plan(tensors, names, quantize, groups)
    stamp = source_stamp(source)
    if plan.nbytes < MIN_BYTES or stamp is None:
        return None
    key = plan.key(stamp)
    name = hashlib.sha256(json.dumps([stamp[0][0], quantize]).encode()).hexdigest()[:24]
    path = os.path.join(folder, name + SUFFIX)
    buf = _open(path, key, plan.size)
    if buf is None:
        try:
            _build(path, key, plan, source)
        except OSError as e:
            if folder not in _warned:
                _warned.append(folder)
                print(f"tinygemma: cannot write the unpacked weights to {folder} ({e.strerror or e})"
                      "; unpacking them in memory at every start (TINYGEMMA_PANEL_CACHE chooses "
                      "the folder)", file=sys.stderr)
            return None
        buf = _open(path, key, plan.size)
        if buf is None:
            return None
    return plan.packed(buf)
