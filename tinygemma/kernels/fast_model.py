""":class:`FastGemma`: the reference model with six methods on the kernels, and
:class:`PackedWeights`, the weights in the forms those kernels read.

The reference path (``layers.py``, ``model.py``) decodes every weight matrix to float32 and
multiplies with NumPy. :class:`FastGemma` overrides only :meth:`Gemma.linear`,
:meth:`Gemma.projections` (q, k, v in one matvec, gate and up in another),
:meth:`Gemma.attend`, :meth:`Gemma.norm`, :meth:`Gemma.rope` and :meth:`Gemma.geglu`, and
the MLP (``Gemma._mlp``) of a prefill that does not look at gate and up, whose product writes
their GeGLU (``gemm_geglu``); the forward pass itself stays the readable one in ``model.py``. What the overrides read (packed
matrices, stacks, ``1 + w`` of the norms, float32 copies for prefill) lives in one
:class:`PackedWeights`, which builds each piece once, when first used.

Process-wide state, and where it is set:

* Numba's thread count is a setting of each calling thread: :func:`launch` sets it, in the
  thread that launches a parallel kernel, to the model's ``threads``;
* glibc's malloc thresholds: :func:`tune_malloc`, called once when ``tinygemma.kernels`` is
  first imported (``kernels/__init__.py``).
"""

from __future__ import annotations

import os
import threading

import numba
import numpy as np
from numba import config as numba_config, set_num_threads

from .. import layers as L
from ..model import Gemma, KVCache
from ._llvm import f32
from .attention import attend_cache, attend_prefill, geglu_rows, rms_norm_rows, rope_rows
from .gemm import (gemm_chunks, gemm_geglu, gemm_kernel, gemm_panels, gemm_rows, padded_rows,
                   unpack5)
from .matvec import TILE_ELEMS, Packed, stack_unpacking
from .quant import FORMATS, STORED

SMALL_T = 8  # up to this many tokens, the matvec kernels; beyond, the prefill's products
KEEP_F32_BYTES = 512 << 20  # prefill keeps bf16/f16/f32 layer matrices in float32 if all fit
STACKED = (("q", "k", "v"), ("gate", "up"))  # a layer's matrices of one input: one matvec

_LAUNCHING = threading.Lock()
_local = threading.local()  # per calling thread: the Numba thread count set there
_layer: list[str] = []  # Numba's threading layer, known once a parallel region has run


def launch(threads: int, kernel, *args) -> None:
    """Run a parallel kernel on ``threads`` threads, from any calling thread.

    Numba's thread count is a setting of each calling thread, so it is applied in every thread
    that launches. OpenMP and TBB run parallel regions of several calling threads at once;
    Numba's ``workqueue`` layer (where neither is installed) aborts the process instead, so
    there (and until the first region has told which layer runs) launches take turns.
    """
    if getattr(_local, "threads", None) != threads:
        set_num_threads(min(threads, numba_config.NUMBA_NUM_THREADS))
        _local.threads = threads
    if _layer and _layer[0] != "workqueue":
        kernel(*args)
        return
    with _LAUNCHING:
        kernel(*args)
        if not _layer:
            _layer.append(numba.threading_layer())


def thread_count() -> int:
    """Threads for the kernels: every core Numba may use, capped by ``TINYGEMMA_THREADS``."""
    most = numba_config.NUMBA_NUM_THREADS  # one per core unless NUMBA_NUM_THREADS says otherwise
    env = os.environ.get("TINYGEMMA_THREADS", "")  # a cap, as llama.cpp's n_threads
    if env and not env.isdigit():
        raise ValueError(f"TINYGEMMA_THREADS must be a number of threads, got {env!r}")
    return max(1, min(int(env), most)) if env else most


def decoded_t(w: Packed) -> np.ndarray:
    """``W^T`` in float32, contiguous ``[in, out]``: BLAS multiplies by it faster than by a
    ``W.T`` view (prefill of a small model keeps these)."""
    decoded = np.empty(w.shape, np.float32)  # [out, in]
    w.decode(0, w.shape[0], decoded)
    return np.ascontiguousarray(decoded.T)  # [in, out]


def tune_malloc() -> None:
    """Keep NumPy's temporaries up to 32 MB on the heap (glibc ``mallopt``), once per process.

    The forward pass allocates and frees arrays of a few MB per operation (prefill activations
    ``[T, F]``, logits ``[1, V]``). With glibc's defaults, a prefill that follows decoded
    tokens finds the heap trimmed and faults its pages in again (docs/performance.md). Raising
    the mmap and trim thresholds keeps that memory for reuse. ``TINYGEMMA_MALLOPT=0`` leaves
    the allocator alone.
    """
    global _MALLOC_TUNED
    if _MALLOC_TUNED or os.environ.get("TINYGEMMA_MALLOPT") == "0":
        return
    _MALLOC_TUNED = True
    try:
        import ctypes
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 32 << 20)  # M_MMAP_THRESHOLD
        libc.mallopt(-1, 128 << 20)  # M_TRIM_THRESHOLD: keep freed memory for reuse
    except (OSError, AttributeError):  # not glibc
        pass


_MALLOC_TUNED = False


class PackedWeights:
    """The weights in the forms the kernels read, each built once, when first used.

    ``matrix(name)``: a :class:`Packed` matrix; ``stack(names)``: q, k, v (or gate, up) as one;
    ``norm_scale(name)``: ``1 + w`` of a norm; ``f32_t(name)``: a layer's ``W^T`` in float32
    for prefill, for matrices read as stored (bf16, f16, f32), kept only when all of those
    fit in ``keep_f32_bytes`` (0: never): decoding them costs ~10% of a prefill, so a small
    model keeps them; a large one decodes tiles at every prefill instead, so that its memory
    stays the compact weights. Panels (the GGUF types, int8) need no float32 copy: the
    prefill multiplies them as they are (``gemm_panels``).
    ``fast``: the names of the matrices a kernel reads (a type without one, Q3_K..., takes
    the reference path). ``source``: the checkpoint's path; its panels, and the stacks of
    ``STACKED``, then come from a file written once and memory-mapped (``panel_cache``) when
    first used, instead of being unpacked in every process.

    One model may be used by several threads at once: each piece is built exactly once however
    many threads ask at the same moment (the others wait for it); later reads take no lock.
    """

    def __init__(self, weights, quantize: str | None = None,
                 keep_f32_bytes: int = KEEP_F32_BYTES, source: str | None = None):
        self.weights, self.quantize, self.source = weights, quantize, source
        self._mapped = source is None  # whether the panel cache was looked at
        tensors = weights.tensors
        self.fast = {n for n, t in tensors.items() if t.kind in FORMATS}
        self.matrices: dict[str, Packed] = {}
        self.stacks: dict[tuple[str, ...], tuple[Packed | None, np.ndarray]] = {}
        self.norm_scales: dict[str, np.ndarray] = {}
        f32_bytes = sum(4 * t.shape[0] * t.shape[1] for n, t in tensors.items()
                        if n.startswith("layers.") and len(t.shape) == 2 and t.kind in STORED)
        keep = 0 < keep_f32_bytes and f32_bytes <= keep_f32_bytes
        self.f32: dict[str, np.ndarray] | None = {} if keep else None
        self._building = threading.RLock()  # a stack builds its parts under it too

    def _once(self, store: dict, key, build):
        """``store[key]``, built by ``build()`` the first time, exactly once."""
        value = store.get(key)
        if value is None:
            with self._building:
                value = store.get(key)
                if value is None:
                    value = store[key] = build()
        return value

    def _map(self) -> None:
        """Once: every panel matrix and stack from the checkpoint's panel cache file (built
        now if missing or stale); left to be unpacked one by one if there is none."""
        with self._building:
            if self._mapped:
                return
            from ..panel_cache import load
            layers = {n.rsplit(".", 1)[0] for n in self.weights.tensors if n.startswith("layers.")}
            groups = [tuple(f"{p}.{m}" for m in names) for p in sorted(layers) for names in STACKED]
            cached = load(self.weights.tensors, self.fast, self.quantize, self.source,
                          [g for g in groups if all(n in self.fast for n in g)])
            if cached is not None:
                matrices, stacks = cached
                self.matrices.update(matrices)
                for names, stack in stacks.items():
                    self.stacks[names] = stack, np.cumsum(
                        [0] + [self.weights.tensors[n].shape[0] for n in names])
            self._mapped = True

    def matrix(self, name: str) -> Packed:
        if not self._mapped:
            self._map()
        return self._once(self.matrices, name,
                          lambda: Packed(self.weights.tensors[name], self.quantize))

    def stack(self, names: tuple[str, ...]) -> tuple[Packed | None, np.ndarray]:
        """The matrices stacked (``Packed.stacked``) and where each part's rows end; no stack
        (None) when a part has no kernel or the parts do not fit one."""
        if not self._mapped:
            self._map()

        def build():
            tensors = [self.weights.tensors[n] for n in names]
            bounds = np.cumsum([0] + [t.shape[0] for t in tensors])
            wide = (stack_unpacking(tensors, self.quantize)
                    if all(n in self.fast for n in names) else None)
            if wide is None:
                return None, bounds
            for n, t, w in zip(names, tensors, wide):
                if w:  # 5-bit weights in int8 panels, as the others (replacing a 5-bit one)
                    self.matrices[n] = Packed(t, self.quantize, wide=True)
            return Packed.stacked([self.matrix(n) for n in names]), bounds
        return self._once(self.stacks, names, build)

    def norm_scale(self, name: str) -> np.ndarray:
        return self._once(self.norm_scales, name, lambda: f32(1) + self.weights[name].astype(f32))

    def f32_t(self, name: str) -> np.ndarray | None:
        if (self.f32 is None or not name.startswith("layers.")
                or self.matrix(name).kind not in STORED):  # panels: multiplied as they are
            return None
        return self._once(self.f32, name, lambda: decoded_t(self.matrix(name)))


class FastGemma(Gemma):
    """:class:`Gemma` with the projections, the cached attention, the norms, RoPE and the
    GeGLU in Numba kernels.

    Weights stay compact: bf16 and float16 are read as stored (memory-mapped), GGUF block
    types are unpacked to int8 panels + scales when first used (:class:`PackedWeights`).
    ``linear``: for up to ``SMALL_T`` tokens a matvec kernel decodes the weights in registers;
    for more (prefill), panels are multiplied by a kernel that decodes them in registers too
    (``gemm_panels``), and matrices read as stored are decoded to float32 for BLAS: kept
    decoded when all the layers' fit in ``keep_f32_bytes``, else a tile of rows at a time.
    ``projections``: q, k, v (and gate, up) stacked, one matvec for each group.
    ``attend``: a kernel over the cache for up to ``SMALL_T`` queries; for more, a kernel over
    tiles of 16 queries (``attend_prefill``; when probabilities are wanted, the reference
    computes them beside it).
    ``norm``, ``rope``, ``geglu``: one pass each instead of several NumPy operations.
    ``_mlp``: a prefill's gate and up in one product over panels that writes their GeGLU.
    Kernels for decoded tokens, the prefill's products over panels and its attention run on
    all cores (``TINYGEMMA_THREADS`` caps them); the prefill's other kernels (norms, decoding
    tiles) run on the calling thread, beside BLAS's threads for matrices read as stored.
    """

    def __init__(self, config, weights, tokenizer=None, quantize: str | None = None,
                 keep_f32_bytes: int = KEEP_F32_BYTES, source: str | None = None,
                 kv_dtype: str = "auto"):
        super().__init__(config, weights, tokenizer, kv_dtype)
        if quantize not in (None, "int8"):
            raise ValueError(f"quantize must be None or 'int8', got {quantize!r}")
        self.quantize = quantize
        self.packed = PackedWeights(weights, quantize, keep_f32_bytes, source)
        self.threads = thread_count()
        self.preloading = None
        if os.environ.get("TINYGEMMA_PRELOAD") != "0":
            self.preloading = threading.Thread(target=self.preload, daemon=True,
                                               name="tinygemma-preload")
            self.preloading.start()

    def preload(self) -> None:
        """Load the prefill's kernels (Numba's cached machine code) for this model's formats.

        A short prompt uses only the matvec kernels; the first long one would load the
        products over panels (one per panel format, and the MLP's ``gemm_geglu``) and the
        prefill's attention, ~20 ms.
        ``FastGemma`` runs this in a thread when built, so that the loading overlaps the
        vocabulary, the user's pause, the first short prompt (as llama.cpp sets up its compute
        buffers at load); ``TINYGEMMA_PRELOAD=0`` turns it off. Numba's compiler lock makes it
        safe beside a forward pass that needs the same kernel: the later one finds it loaded.
        """
        try:
            kinds = {}  # one layer matrix of each tensor type: all of a type share a format
            for name in sorted(self.packed.fast):
                t = self.weights.tensors[name]
                if name.startswith("layers.") and len(t.shape) == 2:  # norms: no product
                    kinds.setdefault(t.kind, name)
            for name in kinds.values():
                w = self.packed.matrix(name)
                if w.kind in STORED:  # multiplied by BLAS: no kernel to load
                    continue
                x = np.empty((1, w.shape[1]), np.float32)  # [T, in] as gemm_rows makes it
                y = np.empty((1, w.shape[0]), np.float32)  # [T, out]
                q = self._int8_like(w.q)
                gemm_kernel(q, w.scale).compile(tuple(
                    numba.typeof(a) for a in (q, w.scale, w.shift, w.has_shift, x, 1, y)))
            mlp = ("layers.0.gate", "layers.0.up")
            if all(n in self.weights.tensors for n in mlp):  # the MLP's product (_mlp)
                w = self.packed.stack(mlp)[0]
                if w is not None:
                    x = np.empty((1, w.shape[1]), np.float32)  # [T, D]
                    y = np.empty((1, w.shape[0] // 2), np.float32)  # [T, F]
                    q = self._int8_like(w.q)
                    gemm_kernel(q, w.scale, geglu=True).compile(tuple(
                        numba.typeof(a) for a in (q, w.scale, w.shift, w.has_shift, x, 1, y)))
            c, cache = self.config, self.new_cache(1)
            q = np.empty((c.num_heads, 2, c.head_dim), np.float32)  # [H, T, d]
            attend_prefill.compile(tuple(numba.typeof(a) for a in (
                q, kernel_view(cache.k[0]), kernel_view(cache.v[0]), 0, 0, 0, 1.0, 1.0,
                heads_in_rows(*q.shape))))
        except Exception:  # noqa: BLE001  a forward that needs the kernel loads it, and says why not
            pass

    @staticmethod
    def _int8_like(qp: np.ndarray) -> np.ndarray:
        """Panels of the type a product reads for ``qp`` (``gemm.int8_panels``: 5-bit ones
        unpacked to int8, whose kernel this loads), empty: for compiling ahead."""
        if qp.ndim != 4:
            return qp
        q = np.empty((0, 8 * qp.shape[1], qp.shape[-1]), np.int8)  # [P, n, 16]
        unpack5.compile((numba.typeof(qp), numba.typeof(q)))
        return q

    def _launch(self, kernel, *args):
        """Run a parallel kernel from whichever thread calls (see :func:`launch`)."""
        launch(self.threads, kernel, *args)

    def linear(self, x: np.ndarray, name: str) -> np.ndarray:
        if name not in self.packed.fast:
            return super().linear(x, name)  # a type without a kernel (Q3_K, ...): the reference
        w = self.packed.matrix(name)
        rows, cols = w.shape
        T = x.shape[0]
        if T > SMALL_T and w.kind not in STORED:  # panels: the kernel decodes in registers
            y = np.empty((T, rows), np.float32)  # [T, out]
            self._launch(gemm_panels, w.q, w.scale, w.shift, w.has_shift, gemm_rows(x),
                         gemm_chunks(w.q.shape[0], self.threads), y)
            return y
        if T <= SMALL_T:
            x = np.ascontiguousarray(x, dtype=np.float32)  # [T, in]
            y = np.empty((T, rows), np.float32)  # [T, out]
            self._launch(w.matvec, x, y)
            return y
        x = np.asarray(x, dtype=np.float32)  # [T, in]: BLAS reads strided rows as they are
        kept = self.packed.f32_t(name)
        if kept is not None:
            return x @ kept  # [T, in] @ [in, out]
        step = max(1, min(rows, TILE_ELEMS // cols))  # rows per decoded tile
        tile = np.empty((step, cols), np.float32)  # this call's own: threads may share the model
        if step == rows:  # one tile: the whole matrix
            w.decode(0, rows, tile)
            return x @ tile.T  # [T, in] @ [in, out] on BLAS
        y = np.empty((T, rows), np.float32)  # [T, out]
        for r0 in range(0, rows, step):
            r1 = min(rows, r0 + step)
            w.decode(r0, r1, tile[: r1 - r0])
            y[:, r0:r1] = x @ tile[: r1 - r0].T  # [T, in] @ [in, rows] on BLAS
        return y

    def projections(self, x: np.ndarray, *names: str) -> list[np.ndarray]:
        """For a few tokens, one matvec over the matrices stacked (``Packed.stacked``): q, k, v
        in one pass, gate and up in another, which saves a matvec's start-up cost for each
        matrix folded in (docs/performance.md)."""
        if len(x) > SMALL_T:
            return super().projections(x, *names)
        stack, bounds = self.packed.stack(names)
        if stack is None:
            return super().projections(x, *names)
        x = np.ascontiguousarray(x, dtype=np.float32)  # [T, in]
        y = np.empty((len(x), stack.shape[0]), np.float32)  # [T, sum of outs]
        self._launch(stack.matvec, x, y)
        return [np.ascontiguousarray(y[:, a:b]) for a, b in zip(bounds[:-1], bounds[1:])]

    def _mlp(self, i, x, at):
        """For a prompt's many tokens, gate and up in one product over their stack that
        writes their GeGLU (``gemm.gemm_geglu``) into rows the down product reads without a
        copy: the MLP holds one ``[T, F]`` array instead of three. A pass that looks at
        gate or up (a trace, a hook on them, a stepped pass) takes ``Gemma._mlp``, as does
        a stack without panels (bf16 read as stored, mixed formats)."""
        p = f"layers.{i}."
        names = (p + "gate", p + "up")
        if len(x) <= SMALL_T or at.wants(names[0]) or at.wants(names[1]):
            return super()._mlp(i, x, at)
        stack, bounds = self.packed.stack(names)
        F = int(bounds[1])
        if stack is None or bounds[2] != 2 * F:  # gate and up alike (a stack: whole panels)
            return super()._mlp(i, x, at)
        rows = padded_rows(len(x), F)  # [T, F (+ PAD)]
        self._launch(gemm_geglu, stack.q, stack.scale, stack.shift, stack.has_shift,
                     gemm_rows(x), gemm_chunks(stack.q.shape[0] // 2, self.threads), rows)
        return self.linear(rows[:, :F], p + "down")  # [T, F] -> [T, D]

    def norm(self, x: np.ndarray, name: str) -> np.ndarray:
        x = np.ascontiguousarray(x, dtype=np.float32)  # [..., N]
        out = np.empty_like(x)
        rms_norm_rows(x.reshape(-1, x.shape[-1]), self.packed.norm_scale(name),
                      float(self.config.rms_norm_eps), out.reshape(-1, x.shape[-1]))
        return out

    def rope(self, x: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
        x = np.ascontiguousarray(x, dtype=np.float32)  # [N, T, d]
        out = np.empty_like(x)
        rope_rows(x, np.ascontiguousarray(cos, dtype=np.float32),
                  np.ascontiguousarray(sin, dtype=np.float32), out)
        return out

    def geglu(self, gate: np.ndarray, up: np.ndarray) -> np.ndarray:
        """In a prefill, into rows the down projection's product reads without a copy
        (``gemm.padded_rows``; a view of their first ``F`` columns)."""
        if gate.ndim != 2 or len(gate) <= SMALL_T:
            out = np.empty(gate.shape, np.float32)  # [..., F]
            geglu_rows(gate, up, out)
            return out
        rows = padded_rows(*gate.shape)  # [T, F (+ PAD)]
        geglu_rows(gate, up, rows)  # writes [:, :F]
        return rows[:, :gate.shape[1]]  # [T, F]

    def attend(self, q, cache: KVCache, i: int, positions, want_probs: bool):
        """The kernels' output always, so that a traced or stepped pass computes what
        ``forward`` does; the probabilities, when wanted, from the reference. The cache is
        read as stored (bfloat16 or float16 decoded in registers, float32 sums)."""
        T = q.shape[1]
        probs = super().attend(q, cache, i, positions, True)[1] if want_probs else None
        c = self.config
        window = c.window(i)
        pos0 = int(positions[0])
        first = int(L.first_key(pos0, window))
        q = np.ascontiguousarray(q, dtype=np.float32)  # [H, T, d]
        k, v = kernel_view(cache.k[i]), kernel_view(cache.v[i])  # [K, S, d] as stored
        scale, cap = float(c.attn_scale), float(c.attn_logit_softcap or 0.0)
        if T > SMALL_T:
            out = heads_in_rows(*q.shape)  # [H, T, d], a view of rows [T, H*d]
            self._launch(attend_prefill, q, k, v, pos0, first, window or 0, scale, cap, out)
        else:
            out = np.empty(q.shape, np.float32)  # [H, T, d]
            self._launch(attend_cache, q, k, v, pos0, first, window or 0, scale, cap,
                         self.threads, out)
        return out, probs


def heads_in_rows(H: int, T: int, d: int) -> np.ndarray:
    """An empty ``[H, T, d]`` float32 array for a prefill's attention output, a view of rows
    ``[T, H*d]`` padded as the o product reads them (``gemm.padded_rows``): ``model.py``'s
    ``out.transpose(1, 0, 2).reshape(T, H*d)`` is then a view of them, and ``gemm_rows``
    makes no copy (at 500 tokens of the demo, two fewer 2 MB arrays at the attention's peak)."""
    return padded_rows(T, H * d)[:, :H * d].reshape(T, H, d).transpose(1, 0, 2)  # [H, T, d]


def kernel_view(stored: np.ndarray) -> np.ndarray:
    """A cache array as the kernels read it: float16 as its bits, int16 (Numba has no
    float16; ``_llvm._as_f32`` decodes by the integer type); bfloat16 (uint16) and float32 as
    they are."""
    return stored.view(np.int16) if stored.dtype == np.float16 else stored
