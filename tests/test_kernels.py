"""The fast path equals the reference path.

* every format's decoding in ``kernels/`` (read as stored, or unpacked to int8 + scales)
  gives bit for bit the float32 weights of ``gguf.quants.dequantize`` (GGUF blocks) or of the
  plain decoding (bf16, f16, f32);
* every matvec kernel equals ``x @ W.T`` on those weights, to float32 rounding;
* the attention kernels (a few queries over the cache; a prefill's many) equal
  ``layers.attention`` (MQA, GQA, MHA, sliding window, soft-cap), through :meth:`Gemma.attend`;
* :class:`FastGemma` gives the reference logits on a tiny random model in every weight format
  and on the real Gemma 3 270M, KV-cache decoding equals the full forward, and greedy decoding
  picks the reference path's tokens.

No timing here: speed is measured by ``benchmarks/run.py`` (docs/performance.md).
"""

from __future__ import annotations

import numpy as np
import pytest
from numba import njit
from gguf import GGMLQuantizationType as Q
from gguf.quants import dequantize, quantize

from tiny import gemma_config
from tinygemma import kernels as K
from tinygemma.kernels import attention, fast_model, gemm
from tinygemma import layers as L
from tinygemma.checkpoints.gguf_file import GGUFTensor
from tinygemma.checkpoints.weights import BF16Tensor, F16Tensor, Tensor, Weights
from tinygemma.config import GemmaConfig
from tinygemma.model import Gemma, KVCache

BLOCK = {Q.Q8_0: (32, 34), Q.Q5_0: (32, 22), Q.Q4_0: (32, 18), Q.Q4_K: (256, 144),
         Q.Q5_K: (256, 176), Q.Q6_K: (256, 210)}


def random_blocks(qtype, rows: int, cols: int, rng) -> np.ndarray:
    """Stored GGUF blocks ``[rows, bytes per row]`` of a random matrix.

    Types gguf.quants can quantise are quantised from Gaussian weights; the k-quants are random
    bytes with every float16 scale set to a finite value, which covers every bit pattern of the
    quants and the 6-bit scales.
    """
    per, nbytes = BLOCK[qtype]
    if qtype in (Q.Q8_0, Q.Q5_0, Q.Q4_0):
        return quantize(rng.standard_normal((rows, cols)).astype(np.float32), qtype)
    data = rng.integers(0, 256, (rows, cols // per, nbytes), dtype=np.uint8)
    scales = {Q.Q4_K: (0, 2), Q.Q5_K: (0, 2), Q.Q6_K: (208,)}[qtype]
    for off in scales:
        d = (rng.uniform(0.5, 2, (rows, cols // per)) * 1e-2).astype(np.float16)
        data[:, :, off:off + 2] = d.view(np.uint8).reshape(rows, cols // per, 2)
    return data.reshape(rows, -1)


def gguf_tensor(qtype, rows, cols, rng) -> GGUFTensor:
    return GGUFTensor(random_blocks(qtype, rows, cols, rng), qtype, (rows, cols))


def plain_tensor(kind: str, rows: int, cols: int, rng) -> Tensor:
    w = rng.standard_normal((rows, cols)).astype(np.float32)
    if kind == "bf16":
        return BF16Tensor((w.view(np.uint32) >> 16).astype(np.uint16))
    if kind == "f16":
        return F16Tensor(w.astype(np.float16))
    return Tensor(w)


def make_tensor(kind, rows, cols, rng) -> Tensor:
    if isinstance(kind, Q):
        return gguf_tensor(kind, rows, cols, rng)
    return plain_tensor(kind, rows, cols, rng)


KINDS = [Q.Q8_0, Q.Q5_0, Q.Q4_0, Q.Q4_K, Q.Q5_K, Q.Q6_K, "bf16", "f16", "f32"]
kind_id = lambda k: k.name if isinstance(k, Q) else k  # noqa: E731


# ---- decoders: bit for bit the reference weights ------------------------------------------
@pytest.mark.parametrize("kind", KINDS, ids=kind_id)
@pytest.mark.parametrize("rows, blocks", [(1, 1), (37, 2), (130, 3), (40, 5)])
def test_decode_equals_reference_bit_for_bit(kind, rows, blocks):
    rng = np.random.default_rng(rows)
    per = BLOCK[kind][0] if isinstance(kind, Q) else 32
    t = make_tensor(kind, rows, per * blocks, rng)
    want = t.f32()  # gguf.quants.dequantize for GGUF blocks
    packed = K.Packed(t)
    out = np.full(want.shape, np.nan, np.float32)
    packed.decode(0, rows, out)
    assert np.array_equal(out.view(np.uint32), want.view(np.uint32))
    r0, r1 = rows // 3, rows - rows // 4  # a range of rows, as the tiles of prefill decode them
    part = np.full((r1 - r0, want.shape[1]), np.nan, np.float32)
    packed.decode(r0, r1, part)
    assert np.array_equal(part, want[r0:r1])


def test_decode_real_demo_tensors_bit_for_bit(demo):
    """Each quantisation type of the demo checkpoint, as stored, against gguf.quants."""
    seen = set()
    for name, t in demo.weights.tensors.items():
        if len(t.shape) != 2 or t.kind in seen:
            continue
        seen.add(t.kind)
        rows = 300 if name == "embed" else t.shape[0]
        want = dequantize(np.asarray(t.data)[:rows], t.qtype)
        out = np.empty(want.shape, np.float32)
        K.Packed(GGUFTensor(t.data[:rows], t.qtype, (rows, t.shape[1]))).decode(0, rows, out)
        assert np.array_equal(out, want), name
    assert {"Q8_0", "Q5_0", "Q4_K", "Q6_K"} <= seen


def test_q4_k_panels_hold_two_weights_a_byte():
    """Q4_K's 4-bit values: two a byte in the panels (0.5 byte a weight, plus float32 scale and
    shift per 32), and the weights read back are still gguf.quants' bit for bit."""
    t = make_tensor(Q.Q4_K, 48, 512, np.random.default_rng(0))
    p = K.Packed(t)
    assert p.q.dtype == np.uint8 and p.q.shape == (3, 256, 16)
    assert p.nbytes == 48 * 512 * (0.5 + 8 / 32)
    out = np.empty((48, 512), np.float32)
    p.decode(0, 48, out)
    assert np.array_equal(out, t.f32())


def test_q5_0_panels_hold_five_bits_a_weight():
    """Q5_0's values, q + 16 in [0, 32): 5 bits a weight in the panels (nibbles and a plane of
    fifth bits; 0.625 + 2 / 32 bytes a weight with the float16 scales, against 1.0625 as int8),
    read back bit for bit as gguf.quants' weights, and every value 0-31 occurs in the test."""
    t = make_tensor(Q.Q5_0, 48, 512, np.random.default_rng(0))
    p = K.Packed(t)
    assert p.q.dtype == np.uint8 and p.q.shape == (3, 64, 5, 16)
    assert p.nbytes == 48 * 512 * (5 / 8 + 2 / 32)
    out = np.empty((48, 512), np.float32)
    p.decode(0, 48, out)
    assert np.array_equal(out.view(np.uint32), t.f32().view(np.uint32))
    q = np.empty((48, 512), np.int8)
    K.quant.unpack_q5_0(np.asarray(t.data), q, np.empty((48, 16), np.float32), None)  # no shift
    assert set(np.unique(q)) == set(range(-16, 16))


@pytest.mark.parametrize("rows", [48, 37])
def test_q6_k_panels_keep_int8_sub_scales_and_float16_super_scales(rows):
    """Q6_K's scale ``d * sc`` (float16 d per 256 weights, int8 sc per 16): the panels keep sc
    and d as stored, 1 + 18 / 256 bytes a weight against 1 + 4 / 16 with float32 scales, and
    the weights read back are still gguf.quants' bit for bit (``f32(d) * f32(sc)`` is exact),
    for every sub-scale byte and super-scales negative, subnormal and the largest float16;
    the product over them (matvec, prefill) is x W^T."""
    rng = np.random.default_rng(rows)
    data = random_blocks(Q.Q6_K, rows, 1024, rng).reshape(rows, 4, 210)
    data[:16, :, 192:208] = (np.arange(1024) % 256).reshape(16, 4, 16)  # every sub-scale byte
    d = np.array([-3e-3, 6e-8, 6.1e-5, 65504], np.float16)  # negative, subnormals, the largest
    data[:4, :, 208:210] = d.view(np.uint8).reshape(1, 4, 2)
    t = GGUFTensor(data.reshape(rows, -1), Q.Q6_K, (rows, 1024))
    p = K.Packed(t)
    assert p.q.dtype == np.int8 and p.q.shape == (3, 1024, 16)
    assert p.scale.dtype == np.int8 and p.scale.shape == (3, 4, 18, 16)
    assert p.nbytes == 48 * 1024 * (1 + 18 / 256)
    want = dequantize(data.reshape(rows, -1), Q.Q6_K)
    out = np.full((rows, 1024), np.nan, np.float32)
    p.decode(0, rows, out)
    assert np.array_equal(out.view(np.uint32), want.view(np.uint32))
    x = rng.standard_normal((2, 1024)).astype(np.float32)
    y, z = np.full((2, rows), np.nan, np.float32), np.full((2, rows), np.nan, np.float32)
    p.matvec(x, y)
    gemm.gemm_panels(p.q, p.scale, p.shift, p.has_shift, x, 2, z)
    for got in (y, z):
        assert_close_products(got, x, want)


@pytest.mark.parametrize("kinds, fifth", [((Q.Q5_0, Q.Q5_0, Q.Q5_0), True),
                                          ((Q.Q5_0, Q.Q5_0, Q.Q8_0), False)])
def test_q5_0_stacks_in_5_bits_unless_a_part_is_int8(kinds, fifth):
    """q, k, v all Q5_0: one stack of 5-bit panels. Gemma 3 270M's layers with a Q8_0 v: q
    and k are held as int8 instead, so that one matvec still reads the three."""
    rng = np.random.default_rng(1)
    tensors = {f"w{i}": make_tensor(k, 32, 256, rng) for i, k in enumerate(kinds)}
    model = K.FastGemma(gemma_config(), Weights(tensors))
    stack, _ = model.packed.stack(tuple(tensors))
    assert stack is not None and (stack.q.ndim == 4) == fifth
    assert all((model.packed.matrix(n).q.ndim == 4) == fifth for n in ("w0", "w1"))
    x = rng.standard_normal((2, 256)).astype(np.float32)
    for (name, t), y in zip(tensors.items(), model.projections(x, *tensors)):
        assert_close_products(y, x, t.f32())
        assert_close_products(model.linear(x, name), x, t.f32())


# ---- matvec: x W^T to float32 rounding ------------------------------------------------------
def assert_close_products(got, x, w):
    """``got == x @ w.T`` up to float32 rounding of the sums (bound: sum of |x_j w_j|)."""
    want = x.astype(np.float64) @ w.astype(np.float64).T
    bound = np.abs(x).astype(np.float64) @ np.abs(w).astype(np.float64).T
    err = np.abs(got - want)
    assert np.all(err <= 1e-5 * bound + 1e-30), float((err / (bound + 1e-30)).max())


@pytest.mark.parametrize("kind", KINDS, ids=kind_id)
@pytest.mark.parametrize("rows, blocks, T",
                         [(1, 1, 1), (33, 3, 1), (257, 5, 2), (70, 8, K.SMALL_T)])
def test_matvec_equals_numpy(kind, rows, blocks, T):
    rng = np.random.default_rng(rows * 10 + T)
    per = BLOCK[kind][0] if isinstance(kind, Q) else 32
    t = make_tensor(kind, rows, per * blocks, rng)
    x = rng.standard_normal((T, t.shape[1])).astype(np.float32)
    y = np.full((T, rows), np.nan, np.float32)
    K.Packed(t).matvec(x, y)
    assert_close_products(y, x, t.f32())


# ---- prefill's matrix product over panels: x W^T to float32 rounding ----------------------------
@pytest.mark.parametrize("kind", [Q.Q8_0, Q.Q5_0, Q.Q4_0, Q.Q4_K, Q.Q5_K, Q.Q6_K,
                                  "int8-bf16", "int8-f16", "int8-f32"], ids=kind_id)
@pytest.mark.parametrize("rows, blocks, T, chunks", [
    (16, 1, 9, 1),  # one panel, one block of tokens (part filled)
    (37, 2, 16, 3),  # a part-filled last panel, more chunks than whole panels in some
    (130, 5, 33, 2),  # 5 groups of 32: a span of four and one after; 3 blocks, the last of 1
    (300, 1, 50, 7)])
def test_gemm_panels_equals_decoded_product(kind, rows, blocks, T, chunks):
    """gemm_panels (prefill) equals x @ W^T on the reference's decoded weights, for every
    panel format, tokens not a multiple of the block, rows not a multiple of the panel."""
    rng = np.random.default_rng(rows + T)
    stored = kind.split("-")[1] if isinstance(kind, str) else kind
    per = BLOCK[kind][0] if isinstance(kind, Q) else 32
    t = make_tensor(stored, rows, per * blocks, rng)
    p = K.Packed(t, quantize="int8" if isinstance(kind, str) else None)
    w = np.empty(t.shape, np.float32)  # the weights the product must use
    p.decode(0, rows, w)
    if isinstance(kind, Q):
        assert np.array_equal(w, t.f32())
    x = rng.standard_normal((T, t.shape[1])).astype(np.float32)
    y = np.full((T, rows), np.nan, np.float32)
    gemm.gemm_panels(p.q, p.scale, p.shift, p.has_shift, x, chunks, y)
    assert_close_products(y, x, w)


@pytest.mark.parametrize("kind", [Q.Q5_0, Q.Q4_K, Q.Q6_K, "int8-bf16"], ids=kind_id)
@pytest.mark.parametrize("F, T, chunks", [(16, 9, 1), (48, 33, 2), (512, 20, 5)])
def test_gemm_geglu_equals_geglu_of_the_products(kind, F, T, chunks):
    """gemm_geglu over gate and up stacked (the prefill's MLP, FastGemma._mlp) writes exactly
    geglu_rows of gemm_panels' two products (so a pass that looks at gate and up, which runs
    those, computes what forward does), which is layers.geglu of x Wg^T and x Wu^T; in rows
    wider than F (padded) it writes only the first F columns."""
    rng = np.random.default_rng(F + T)
    stored = kind.split("-")[1] if isinstance(kind, str) else kind
    cols = 2 * (BLOCK[kind][0] if isinstance(kind, Q) else 32)
    gate, up = make_tensor(stored, F, cols, rng), make_tensor(stored, F, cols, rng)
    quantize = "int8" if isinstance(kind, str) else None
    parts = [K.Packed(gate, quantize), K.Packed(up, quantize)]
    ws = [np.empty((F, cols), np.float32) for _ in parts]  # the weights the products use
    for p, w in zip(parts, ws):
        p.decode(0, F, w)
    stack = K.Packed.stacked(parts)
    x = (rng.standard_normal((T, cols)) * 2).astype(np.float32)
    out = np.full((T, F + 3), np.nan, np.float32)  # wider rows, as padded_rows gives
    gemm.gemm_geglu(stack.q, stack.scale, stack.shift, stack.has_shift, x, chunks, out)
    assert np.isnan(out[:, F:]).all()
    g, u = (np.empty((T, F), np.float32) for _ in parts)
    for p, y in zip(parts, (g, u)):
        gemm.gemm_panels(p.q, p.scale, p.shift, p.has_shift, x, 2, y)
    unfused = np.empty((T, F), np.float32)
    K.geglu_rows(g, u, unfused)
    np.testing.assert_array_equal(out[:, :F], unfused)
    g64, u64 = (x.astype(np.float64) @ w.astype(np.float64).T for w in ws)
    want = L.geglu(g64, u64)
    np.testing.assert_allclose(out[:, :F], want, rtol=1e-4, atol=1e-5 * np.abs(want).max())


def test_gemm_chunks_share_the_panels_evenly():
    assert gemm.gemm_chunks(1, 2) == 1  # never more chunks than panels
    assert gemm.gemm_chunks(16, 2) == 2
    assert gemm.gemm_chunks(40, 2) == 6  # 3 each: about 8 panels a chunk, equal shares
    assert gemm.gemm_chunks(128, 2) == 16


@pytest.mark.parametrize("kind", [Q.Q8_0, Q.Q4_K], ids=kind_id)
@pytest.mark.parametrize("cols", [768, 1024])
def test_gemm_rows_pads_rows_of_a_multiple_of_512(kind, cols):
    """gemm_rows copies x (here a transposed view, as attention's heads are) into contiguous
    rows, padded when their length is a multiple of 512; the product reads only the matrix's
    columns, so it is the same on either, bit for bit."""
    rng = np.random.default_rng(cols)
    t = make_tensor(kind, 40, cols, rng)
    p = K.Packed(t)
    x = rng.standard_normal((cols, 20)).astype(np.float32).T  # [20, cols], not contiguous
    rows = K.gemm_rows(x)
    assert rows.flags.c_contiguous and rows.dtype == np.float32
    assert rows.shape == (20, cols + (gemm.PAD if cols % 512 == 0 else 0))
    np.testing.assert_array_equal(rows[:, :cols], x)
    y, want = np.empty((20, 40), np.float32), np.empty((20, 40), np.float32)
    gemm.gemm_panels(p.q, p.scale, p.shift, p.has_shift, rows, 2, y)
    gemm.gemm_panels(p.q, p.scale, p.shift, p.has_shift, np.ascontiguousarray(x), 2, want)
    np.testing.assert_array_equal(y, want)
    written = gemm.padded_rows(20, cols)  # rows a kernel fills (FastGemma.geglu), then a view
    written[:, :cols] = x
    assert (K.gemm_rows(written[:, :cols]) is written) == (cols % 512 == 0)  # no second copy
    np.testing.assert_array_equal(K.gemm_rows(written[:, :cols])[:, :cols], x)
    assert K.gemm_rows(written[:, 1:cols + 1]) is not written  # not its first columns: copied


@pytest.mark.parametrize("kind", [Q.Q8_0, Q.Q4_K, Q.Q6_K, "bf16", "f16", "f32"], ids=kind_id)
@pytest.mark.parametrize("T", [1, K.SMALL_T + 1, 40])
def test_fast_linear_every_T(kind, T, monkeypatch):
    """FastGemma.linear: matvec for few tokens; for many, the panels' product (GGUF) or decoded
    tiles + BLAS (bf16, f16, f32: several tiles)."""
    rng = np.random.default_rng(T)
    t = make_tensor(kind, 300, 512, rng)
    model = K.FastGemma(gemma_config(), Weights({"w": t}))
    monkeypatch.setattr(fast_model, "TILE_ELEMS", 512 * 64)  # 64 rows a tile: 5 tiles, the last short
    x = rng.standard_normal((T, 512)).astype(np.float32)
    assert_close_products(model.linear(x, "w"), x, t.f32())


@pytest.mark.parametrize("kinds, rows, stacked", [
    ((Q.Q5_0, Q.Q8_0, Q.Q8_0), (64, 32, 32), True),  # Gemma 3 270M's q, k, v: panels alike
    ((Q.Q4_K, Q.Q4_K), (256, 256), True),  # with shifts
    ((Q.Q6_K, Q.Q6_K), (48, 80), True),  # groups of 16
    ((Q.Q5_0, Q.Q4_K), (64, 64), False),  # shift / no shift: one matvec each
    ((Q.Q8_0, Q.Q8_0), (40, 32), False),  # 40 rows: a part-filled panel inside the stack
    ((Q.Q8_0, Q.Q5_0), (32, 40), True),  # the part-filled panel last: allowed
    (("bf16", "bf16"), (32, 32), False),  # read as stored
], ids=["q5_0+q8_0", "q4_k", "q6_k", "mixed", "ragged", "ragged_last", "bf16"])
@pytest.mark.parametrize("T", [1, 3])
def test_projections_stacked_equal_linear(kinds, rows, stacked, T):
    """FastGemma.projections: one matvec over the stacked matrices equals a linear per matrix,
    and afterwards each matrix alone (the prefill's decode reads it in the stack) too."""
    rng = np.random.default_rng(T)
    tensors = {f"w{i}": make_tensor(k, r, 256, rng) for i, (k, r) in enumerate(zip(kinds, rows))}
    model = K.FastGemma(gemma_config(), Weights(tensors))
    x = rng.standard_normal((T, 256)).astype(np.float32)
    outs = model.projections(x, *tensors)
    assert (model.packed.stacks[tuple(tensors)][0] is not None) == stacked
    for (name, t), y in zip(tensors.items(), outs):
        assert y.shape == (T, t.shape[0]) and y.flags.c_contiguous
        assert_close_products(y, x, t.f32())
        assert_close_products(model.linear(x, name), x, t.f32())
        many = rng.standard_normal((K.SMALL_T + 1, 256)).astype(np.float32)
        assert_close_products(model.linear(many, name), many, t.f32())


# ---- attention over the cache ---------------------------------------------------------------
@pytest.mark.parametrize("H, Kv", [(4, 1), (4, 2), (2, 2)], ids=["MQA", "GQA", "MHA"])
@pytest.mark.parametrize("window, cap", [(None, None), (5, None), (None, 50.0), (1, 30.0)])
def test_attend_kernel_equals_reference(H, Kv, window, cap):
    rng = np.random.default_rng(H * 7 + Kv)
    d, S = 16, 24
    cfg = gemma_config(num_heads=H, num_kv_heads=Kv, head_dim=d, attn_logit_softcap=cap,
                      sliding_window=window, layer_types=("sliding_attention" if window else
                                                          "full_attention",) * 2)
    ref, fast = Gemma(cfg, Weights({})), K.FastGemma(cfg, Weights({}))
    cache = KVCache(cfg, S)
    for i in range(2):
        cache.k[i][:] = rng.standard_normal(cache.k[i].shape) * 3
        cache.v[i][:] = rng.standard_normal(cache.v[i].shape)
    # few queries: the cache kernel; more than SMALL_T (prefill): tiles of 16 queries
    for start, T in [(0, 1), (0, 3), (6, 1), (7, K.SMALL_T), (S - 2, 2), (0, 12), (5, 16), (0, S),
                     (3, 21)]:
        q = (rng.standard_normal((H, T, d)) * 3).astype(np.float32)
        positions = np.arange(start, start + T)
        want, _ = ref.attend(q, cache, 1, positions, False)
        got, probs = fast.attend(q, cache, 1, positions, False)
        assert probs is None
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("H, d", [(4, 128), (2, 48)], ids=["padded", "not_padded"])
def test_prefill_attention_output_feeds_o_without_a_copy(H, d):
    """FastGemma.attend writes a prefill's heads ``[H, T, d]`` into rows ``[T, H*d]``, padded
    when gemm_rows pads (H*d a multiple of 512): model.py's ``transpose + reshape`` for the o
    product is a view of them and gemm_rows hands them over as they are. Values: the
    reference's."""
    rng = np.random.default_rng(H * d)
    T = 20
    cfg = gemma_config(num_heads=H, num_kv_heads=1, head_dim=d)
    ref, fast = Gemma(cfg, Weights({})), K.FastGemma(cfg, Weights({}))
    cache = KVCache(cfg, T)
    cache.k[0][:] = rng.standard_normal(cache.k[0].shape)
    cache.v[0][:] = rng.standard_normal(cache.v[0].shape)
    q = rng.standard_normal((H, T, d)).astype(np.float32)
    got, _ = fast.attend(q, cache, 0, np.arange(T), False)
    np.testing.assert_allclose(got, ref.attend(q, cache, 0, np.arange(T), False)[0],
                               rtol=1e-5, atol=1e-5)
    heads = got.transpose(1, 0, 2).reshape(T, H * d)  # as model.py hands them to o
    assert np.shares_memory(heads, got)  # a view: no copy of the heads
    rows = K.gemm_rows(heads)
    assert rows.shape == (T, H * d + (gemm.PAD if H * d % 512 == 0 else 0))
    assert np.shares_memory(rows, got)  # the rows the kernel wrote, not a copy
    np.testing.assert_array_equal(rows[:, :H * d], heads)


@pytest.mark.parametrize("threads", [1, 2, 3, 8])
@pytest.mark.parametrize("H, Kv, T", [(4, 1, 1), (4, 1, 3), (4, 2, 2), (2, 2, 1)])
@pytest.mark.parametrize("window, cap", [(0, 0.0), (150, 0.0), (0, 30.0), (1, 0.0), (150, 30.0)])
def test_attend_cache_splits_keys_over_threads(threads, H, Kv, T, window, cap):
    """With more threads than KV heads, each head's keys are split in ranges, one per thread,
    and the ranges' softmax sums merged: the result is ``layers.attention``'s. 300 keys, so
    that up to 4 ranges of ``KEYS_PER_PART``; with a window some ranges hold no key a query
    sees, or only part of one."""
    rng = np.random.default_rng(threads * 100 + H * 10 + T)
    d, pos0, first = 16, 310, 10 if window == 0 else 0
    q = (rng.standard_normal((H, T, d)) * 2).astype(np.float32)
    k, v = (rng.standard_normal((Kv, pos0 + T + 5, d)).astype(np.float32) for _ in range(2))
    if window:
        first = max(0, pos0 - window + 1)
    positions, keys = np.arange(pos0, pos0 + T), np.arange(first, pos0 + T)
    mask = L.causal_mask(positions, keys, window or None)
    want, _ = L.attention(q, k[:, first:pos0 + T], v[:, first:pos0 + T], mask, 0.25, cap or None)
    got = np.full_like(q, np.nan)
    K.attend_cache(q, k, v, pos0, first, window, 0.25, cap, threads, got)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("H, Kv, d", [(4, 1, 16), (4, 2, 32), (2, 2, 20)],
                         ids=["MQA", "GQA", "MHA-d20"])
@pytest.mark.parametrize("pos0, T", [(0, 9), (0, 16), (7, 33), (40, 50)])
@pytest.mark.parametrize("window, cap", [(0, 0.0), (5, 0.0), (0, 30.0), (20, 50.0)])
def test_attend_prefill_equals_layers(H, Kv, d, pos0, T, window, cap):
    """The prefill's kernel against ``layers.attention``: tiles of 16 queries (the last one
    part-filled), keys in tiles of 16 (the last part-filled), a head size that is not a
    multiple of 16 (20), queries after a filled cache (``pos0``), sliding windows shorter
    than a tile, soft-capping."""
    rng = np.random.default_rng(H * 1000 + d * 10 + T)
    first = max(0, pos0 - window + 1) if window else 0
    q = (rng.standard_normal((H, T, d)) * 2).astype(np.float32)
    k, v = (rng.standard_normal((Kv, pos0 + T + 3, d)).astype(np.float32) for _ in range(2))
    mask = L.causal_mask(np.arange(pos0, pos0 + T), np.arange(first, pos0 + T), window or None)
    want, _ = L.attention(q, k[:, first:pos0 + T], v[:, first:pos0 + T], mask, 0.25, cap or None)
    got = np.full_like(q, np.nan)
    K.attend_prefill(q, k, v, pos0, first, window, 0.25, cap, got)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@njit(cache=True)
def first_keys(positions, window):
    out = np.empty_like(positions)
    for i in range(positions.size):
        out[i] = attention._first_key(positions[i], window)
    return out


@pytest.mark.parametrize("window", [None, 1, 3, 512])
def test_first_key_kernel_equals_layers(window):
    """The kernels' twin of ``layers.first_key`` (its window 0 for none), at every position."""
    positions = np.arange(1200)
    np.testing.assert_array_equal(first_keys(positions, window or 0),
                                  L.first_key(positions, window))


def test_exp_kernel_within_two_ulp():
    """``kernels._exp`` (the softmax's vectorised exp) against float64 ``exp``, x <= 0."""
    x = -np.concatenate([np.linspace(0, 87.3, 200_001), [1e-30, 1e-7, 0.5, 87.33]])
    x = x.astype(np.float32)
    exact = np.exp(x.astype(np.float64))
    ulps = np.abs(exp_all(x) - exact) / np.spacing(exact.astype(np.float32))
    assert ulps.max() <= 2, ulps.max()
    assert exp_all(np.array([-88, -1e4, -np.inf], np.float32)).tolist() == [0, 0, 0]


@pytest.mark.parametrize("shape", [(1, 640), (7, 33), (2, 3, 16)])
def test_norm_and_geglu_kernels_equal_layers(shape):
    """``FastGemma.norm`` / ``.geglu`` (Numba) against ``layers.rms_norm`` / ``layers.geglu``,
    over the GELU's whole range: large negative and positive gates, where tanh saturates."""
    rng = np.random.default_rng(len(shape))
    cfg = gemma_config(hidden_size=shape[-1])
    w = (rng.standard_normal(shape[-1]) * 0.5).astype(np.float32)
    fast = K.FastGemma(cfg, Weights({"n": Tensor(w)}))
    x = (rng.standard_normal(shape) * 4).astype(np.float32)
    np.testing.assert_allclose(fast.norm(x, "n"), L.rms_norm(x, w, cfg.rms_norm_eps),
                               rtol=2e-6, atol=2e-6)
    np.testing.assert_allclose(fast.norm(x[..., ::-1], "n"),  # not contiguous
                               L.rms_norm(x[..., ::-1], w, cfg.rms_norm_eps), rtol=2e-6, atol=2e-6)
    gate = np.concatenate([x.reshape(-1) * 3, [-60, -12, -1e-6, 0, 1e-6, 12, 60]])[None]
    up = rng.standard_normal(gate.shape).astype(np.float32)
    gate = gate.astype(np.float32)
    np.testing.assert_allclose(fast.geglu(gate, up), L.geglu(gate, up), rtol=1e-6, atol=1e-6)
    for F in (shape[-1], 512):  # a prefill's rows (more than SMALL_T); 512: padded rows
        gate = (rng.standard_normal((K.SMALL_T + 1, F)) * 4).astype(np.float32)
        up = rng.standard_normal(gate.shape).astype(np.float32)
        np.testing.assert_allclose(fast.geglu(gate, up), L.geglu(gate, up), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("H, T, d", [(4, 1, 256), (1, 7, 32), (8, 40, 128)])
def test_rope_kernel_equals_layers(H, T, d):
    """``FastGemma.rope`` against ``layers.rope`` at positions up to 8k (large angles), for
    contiguous and transposed (prefill's ``[T, H, d] -> [H, T, d]``) inputs."""
    rng = np.random.default_rng(T)
    fast = K.FastGemma(gemma_config(), Weights({}))
    cos, sin = L.rope_angles(rng.integers(0, 8192, T), d, 1e6)
    x = (rng.standard_normal((T, H, d)) * 3).astype(np.float32).transpose(1, 0, 2)
    want = L.rope(x, cos, sin)
    np.testing.assert_allclose(fast.rope(x, cos, sin), want, rtol=1e-6, atol=2e-6)
    np.testing.assert_allclose(fast.rope(x.copy(), cos, sin), want, rtol=1e-6, atol=2e-6)


@njit(cache=True)
def exp_all(x):
    out = np.empty_like(x)
    for i in range(x.size):
        out[i] = K._exp(x[i])
    return out


# ---- whole models ---------------------------------------------------------------------------
LOCAL_GLOBAL = ("sliding_attention", "full_attention")  # both kinds of layer in two


def tiny_weights(c: GemmaConfig, kind, seed=0) -> dict[str, Tensor]:
    """Random weights of config ``c``, every matrix in format ``kind`` (norms float32)."""
    from tinygemma.checkpoints.weights import expected_shapes
    rng = np.random.default_rng(seed)
    out = {}
    for name, shape in expected_shapes(c).items():
        if len(shape) == 1:
            out[name] = Tensor((rng.standard_normal(shape) * 0.1).astype(np.float32))
        else:
            out[name] = make_tensor(kind, *shape, rng)
    return out


@pytest.mark.parametrize("family", [1, 2, 3])
@pytest.mark.parametrize("kind", [Q.Q8_0, Q.Q4_K, Q.Q6_K, "bf16", "f32"], ids=kind_id)
@pytest.mark.parametrize("keep", [K.KEEP_F32_BYTES, 0], ids=["keep_f32", "tiles"])
def test_tiny_model_fast_equals_reference(family, kind, keep):
    per = BLOCK[kind][0] if isinstance(kind, Q) else 32
    c = gemma_config(family, hidden_size=per, intermediate_size=2 * per, num_heads=4,
                     num_kv_heads=4 if family == 1 else 1,  # Gemma 1: MHA (as 7B)
                     head_dim=per // 4 if per > 32 else 32,
                     layer_types=() if family == 1 else LOCAL_GLOBAL)
    tensors = tiny_weights(c, kind, seed=family)
    ref, fast = Gemma(c, Weights(tensors)), K.FastGemma(c, Weights(tensors), keep_f32_bytes=keep)
    assert (fast.packed.f32 is None) == (keep == 0)  # prefill: float32 matrices kept, or tiles
    ids = np.random.default_rng(family).integers(0, c.vocab_size, 12)
    want = ref.forward(ids)
    scale = float(np.abs(want).max())
    assert np.abs(fast.forward(ids) - want).max() <= 1e-4 * scale  # prefill on BLAS
    cache = fast.new_cache(len(ids))  # decode: matvec and the attention kernel, token by token
    fast.forward(ids[:3], cache=cache)
    for j in range(3, len(ids)):
        got = fast.forward(ids[j:j + 1], cache=cache, last_only=True)
        assert np.abs(got[0] - want[j]).max() <= 1e-4 * scale, j


@pytest.mark.parametrize("kind", [Q.Q8_0, Q.Q4_K], ids=kind_id)
def test_prefill_mlp_fused_unless_gate_or_up_is_looked_at(kind, monkeypatch):
    """FastGemma._mlp: a prompt's MLP is one gemm_geglu per layer (no gate and up arrays),
    except in layers where a hook, a trace or a stepped pass looks at gate or up; the logits
    are the same bit for bit either way, and the reference's to float32 rounding."""
    per = BLOCK[kind][0]
    c = gemma_config(3, hidden_size=per, intermediate_size=2 * per, num_heads=4,
                     num_kv_heads=1, head_dim=per // 4 if per > 32 else 32,
                     layer_types=LOCAL_GLOBAL)
    tensors = tiny_weights(c, kind, seed=5)
    fast = K.FastGemma(c, Weights(tensors))
    calls = []
    fused = fast_model.gemm_geglu
    monkeypatch.setattr(fast_model, "gemm_geglu", lambda *a: calls.append(a) or fused(*a))
    ids = np.random.default_rng(5).integers(0, c.vocab_size, 12)
    plain = fast.forward(ids)
    assert len(calls) == c.num_layers
    want = Gemma(c, Weights(tensors)).forward(ids)
    assert np.abs(plain - want).max() <= 1e-4 * np.abs(want).max()
    calls.clear()
    hooked = fast.forward(ids, hooks={"layers.1.up": lambda v, n: None})
    assert len(calls) == c.num_layers - 1  # layer 1's gate and up as model.py computes them
    np.testing.assert_array_equal(hooked, plain)
    calls.clear()
    tape = fast.trace(ids)
    stepper = fast.steps(ids)
    stepper.run_to("logits")
    assert not calls
    assert tape["layers.0.gate"].shape == (len(ids), c.intermediate_size)
    np.testing.assert_array_equal(tape["logits"], plain)
    np.testing.assert_array_equal(stepper.logits, plain)
    fast.forward(ids[:K.SMALL_T])  # a few tokens: the matvec kernels
    assert not calls


@pytest.mark.parametrize("family", [2, 3])
def test_tiny_model_long_cache_decode_equals_reference(family):
    """Decoding over 200 cached positions: FastGemma.attend splits the keys in ranges (at
    least KEYS_PER_PART each) and merges them; the logits are the reference's. Gemma 2 soft-caps
    and both slide a window over part of the cache."""
    c = gemma_config(family, sliding_window=150, max_position_embeddings=512,
                     layer_types=LOCAL_GLOBAL)
    tensors = tiny_weights(c, Q.Q8_0, seed=family)
    ref, fast = Gemma(c, Weights(tensors)), K.FastGemma(c, Weights(tensors))
    fast.threads = 3  # key ranges whatever this machine's cores: the result must not depend on it
    ids = np.random.default_rng(family).integers(0, c.vocab_size, 204)
    want = ref.forward(ids)
    cache = fast.new_cache(len(ids))
    fast.forward(ids[:200], cache=cache)
    assert (cache.pos - 1) // K.KEYS_PER_PART >= 3
    for j in range(200, len(ids)):
        got = fast.forward(ids[j:j + 1], cache=cache, last_only=True)
        assert np.abs(got[0] - want[j]).max() <= 1e-4 * np.abs(want[j]).max(), j


def test_fast_is_the_default_and_switchable(demo_path):
    import tinygemma as tg
    assert isinstance(tg.load(demo_path), K.FastGemma)
    ref = tg.load(demo_path, fast=False)
    assert type(ref) is Gemma


# ---- the real Gemma 3 270M ------------------------------------------------------------------
def resident_pages(a: np.ndarray) -> int:
    """How many of the pages under ``a`` are in this process's memory (/proc/self/pagemap's
    'present' bit, readable without privileges)."""
    import mmap
    page = mmap.PAGESIZE
    start = a.__array_interface__["data"][0]
    first, last = start // page, (start + a.nbytes - 1) // page
    with open("/proc/self/pagemap", "rb") as f:
        f.seek(8 * first)
        entries = np.frombuffer(f.read(8 * (last - first + 1)), np.uint64)
    return int(np.count_nonzero(entries >> np.uint64(63)))


def test_packing_releases_the_mapped_pages(demo):
    """Unpacked into panels, a GGUF tensor's pages leave the process (RSS counts the weights
    once), but the file's bytes are still there to read."""
    t = demo.weights.tensors["layers.1.gate"]
    data = K.stored_bytes(t)
    total = int(data.sum(dtype=np.int64))  # touch every page
    assert resident_pages(data) >= data.nbytes // 4096
    K.Packed(t)
    assert resident_pages(data) <= 2  # at most the two pages shared with the neighbours
    assert int(data.sum(dtype=np.int64)) == total
    assert not K.release_pages(np.zeros(8192, np.uint8))  # not a mapped file: left alone


PROMPTS = [  # token ids (BOS first) of text prompts, so that no tokenizer is needed here
    [2, 818, 5279, 529, 7001, 563],  # "The capital of France is"
    [2, 2063, 10779, 78113, 236769, 236749, 1473],  # "def fibonacci(n):"
    # "Once upon a time, in a small village,"
    [2, 14946, 3324, 496, 990, 236764, 528, 496, 1944, 9744, 236764],
]


def test_demo_forward_equals_reference(demo, demo_reference):
    ids = np.array(PROMPTS[0] + PROMPTS[1][1:])
    want = demo_reference.forward(ids)
    got = demo.forward(ids)
    assert np.abs(got - want).max() <= 1e-4 * np.abs(want).max()


def test_demo_kv_cache_decode_equals_full_forward(demo):
    ids = np.array(PROMPTS[2] + PROMPTS[0][1:])
    full = demo.forward(ids)
    cache = demo.new_cache(len(ids))
    demo.forward(ids[:4], cache=cache)
    for j in range(4, len(ids)):
        step = demo.forward(ids[j:j + 1], cache=cache, last_only=True)
        assert np.abs(step[0] - full[j]).max() <= 1e-4 * np.abs(full[j]).max(), j


@pytest.mark.parametrize("prompt", range(len(PROMPTS)))
def test_demo_greedy_64_tokens_same_as_reference(demo, demo_reference, prompt):
    """Greedy decoding (KV cache, one token at a time) picks the reference path's tokens.

    The reference path's own greedy choice at every step is read off one teacher-forced forward
    over the prompt and the generated tokens: if its argmax is the fast path's token at every
    step, reference greedy decoding produces the same 64 tokens. A step where the reference's
    top two logits are within rounding of each other (a near-tie) ends the comparison.
    """
    ids = list(PROMPTS[prompt])
    cache = demo.new_cache(len(ids) + 64)
    logits = demo.forward(np.array(ids), cache=cache, last_only=True)[0]
    new = []
    for _ in range(64):
        new.append(int(np.argmax(logits)))
        logits = demo.forward(np.array(new[-1:]), cache=cache, last_only=True)[0]
    ref = demo_reference.forward(np.array(ids + new[:-1]))[len(ids) - 1:]  # [64, V]
    scale = float(np.abs(ref).max())
    for step, (row, token) in enumerate(zip(ref, new)):
        top2 = np.sort(row)[-2:]
        if top2[1] - top2[0] <= 1e-4 * scale:
            assert step >= 16, f"near-tie at step {step}: choose another prompt"
            break
        assert int(np.argmax(row)) == token, f"step {step}"


def weights_of(packed: K.Packed) -> np.ndarray:
    out = np.empty(packed.shape, np.float32)
    packed.decode(0, packed.shape[0], out)
    return out


@pytest.mark.parametrize("kind", ["bf16", "f16", "f32"])
def test_int8_quantisation(kind):
    """quantize="int8": weights within half a step of the original per group of 32, and the
    model computes with exactly those weights, in prefill and in decode."""
    rng = np.random.default_rng(5)
    t = make_tensor(kind, 70, 160, rng)  # 5 groups: a span of four and one after
    p = K.Packed(t, quantize="int8")
    assert p.kind == "int8" and p.q.dtype == np.int8
    w, got = t.f32(), np.empty((70, 160), np.float32)
    p.decode(0, 70, got)
    step = np.abs(w).reshape(70, 5, 32).max(-1, keepdims=True) / 127
    assert np.all(np.abs(got - w).reshape(70, 5, 32) <= step / 2 * (1 + 1e-5))
    x = rng.standard_normal((2, 160)).astype(np.float32)
    y = np.empty((2, 70), np.float32)
    p.matvec(x, y)
    assert_close_products(y, x, got)
    c = gemma_config(tie_word_embeddings=False)  # the embedding lookup reads the original rows
    tensors = tiny_weights(c, kind, seed=3)
    fast = K.FastGemma(c, Weights(tensors), quantize="int8")
    ids = np.arange(1, 11)
    got = fast.forward(ids)
    decoded = {n: (Tensor(weights_of(fast.packed.matrix(n))) if len(t.shape) == 2 and n != "embed"
                   else t) for n, t in tensors.items()}
    want = Gemma(c, Weights(decoded)).forward(ids)
    assert np.abs(got - want).max() <= 1e-4 * np.abs(want).max()
    cache = fast.new_cache(len(ids))  # decode: the int8 panels, q/k/v and gate/up stacked
    fast.forward(ids[:6], cache=cache)
    for j in range(6, len(ids)):
        step = fast.forward(ids[j:j + 1], cache=cache, last_only=True)
        assert np.abs(step[0] - want[j]).max() <= 1e-4 * np.abs(want).max(), j
    assert fast.packed.stacks[("layers.0.q", "layers.0.k", "layers.0.v")][0] is not None


def test_bench_on_a_tiny_model():
    """tinygemma.bench measures a model without a tokenizer (random ids) and prints a table."""
    from tinygemma.bench import bench, format_table, result_row
    c = gemma_config()
    model = K.FastGemma(c, Weights(tiny_weights(c, Q.Q8_0)))
    r = bench(model, prompt_tokens=12, new_tokens=3, repeats=2)
    assert r["prompt_tokens"] == 12 and len(r["generated"]) == 3
    assert r["prefill_tok_s"] > 0 and r["decode_tok_s"] > 0 and r["peak_rss_bytes"] > 0
    assert r["prefill_cold_tok_s"] == 12 / r["prefill_cold_s"] > 0  # the first long prompt, apart
    table = format_table([result_row("tiny", r, roofline_tok_s=1e6)])
    lines = table.splitlines()
    assert lines[0].startswith("| engine") and lines[2].startswith("| tiny")
    assert "| cold prefill tok/s | warm prefill tok/s |" in lines[0]
    assert len({len(line) for line in lines}) == 1  # aligned columns


def test_types_without_a_kernel_use_the_reference():
    rng = np.random.default_rng(0)
    blocks = rng.integers(0, 256, (8, 110), dtype=np.uint8)  # Q3_K: 256 weights in 110 bytes
    blocks[:, 108:110] = np.array([0.01], np.float16).view(np.uint8)
    t = GGUFTensor(blocks, Q.Q3_K, (8, 256))
    model = K.FastGemma(gemma_config(), Weights({"w": t}))
    x = rng.standard_normal((2, 256)).astype(np.float32)
    assert_close_products(model.linear(x, "w"), x, t.f32())
    for y in model.projections(x, "w", "w"):  # no stack: one reference product each
        assert_close_products(y, x, t.f32())
    assert model.packed.stacks[("w", "w")][0] is None


def test_threads_env(monkeypatch):
    """TINYGEMMA_THREADS caps the kernels' threads; anything but a number is refused clearly."""
    monkeypatch.setenv("TINYGEMMA_THREADS", "1")
    assert K.FastGemma(gemma_config(), Weights({})).threads == 1
    monkeypatch.setenv("TINYGEMMA_THREADS", "two")
    with pytest.raises(ValueError, match="TINYGEMMA_THREADS"):
        K.FastGemma(gemma_config(), Weights({}))
