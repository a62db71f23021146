"""Unit tests of the components: values checkable by hand, and the properties the papers state."""

import math

import numpy as np
import pytest

from tinygemma import layers as L

rng = np.random.default_rng(0)


def test_embed_scales_by_sqrt_hidden_in_float32():
    E = np.ones((5, 3072), np.float32)
    x = L.embed(E, np.array([1, 4]))
    assert x.dtype == np.float32 and x.shape == (2, 3072)
    assert x[0, 0] == np.float32(math.sqrt(3072))  # 55.425..., not bf16's 55.5
    assert abs(x[0, 0] - 55.5) > 0.07


def test_rms_norm_hand_values():
    x = np.array([[3.0, 4.0]], np.float32)  # rms = sqrt((9 + 16) / 2) = sqrt(12.5)
    y = L.rms_norm(x, np.zeros(2, np.float32), eps=0.0)
    np.testing.assert_allclose(y, x / math.sqrt(12.5), rtol=1e-6)
    y1 = L.rms_norm(np.ones((1, 4), np.float32), np.ones(4, np.float32))  # ones in: (1 + 1) out
    np.testing.assert_allclose(y1, 2.0, rtol=1e-5)


def test_rms_norm_is_scale_invariant():
    x = rng.normal(size=(4, 64)).astype(np.float32)
    w = rng.normal(size=64).astype(np.float32)
    np.testing.assert_allclose(L.rms_norm(x, w), L.rms_norm(x * 37.0, w), rtol=1e-5, atol=1e-6)


def test_rope_identity_at_position_zero_and_keeps_norms():
    x = rng.normal(size=(2, 6, 16)).astype(np.float32)
    cos, sin = L.rope_angles(np.arange(6), 16)
    y = L.rope(x, cos, sin)
    np.testing.assert_array_equal(y[:, 0], x[:, 0])
    np.testing.assert_allclose(np.linalg.norm(y, axis=-1), np.linalg.norm(x, axis=-1), rtol=1e-5)


def test_rope_pairs_split_halves_not_neighbours():
    x = np.zeros((1, 1, 4), np.float32)
    x[0, 0, 0] = 1.0  # dimension 0 pairs with dimension 2 (= 0 + d/2)
    cos, sin = L.rope_angles(np.array([1]), 4)  # theta_0 = 1: angle 1 radian
    y = L.rope(x, cos, sin)[0, 0]
    np.testing.assert_allclose(y, [math.cos(1), 0, math.sin(1), 0], atol=1e-6)


def test_rope_dot_product_depends_only_on_relative_position():
    q, k = rng.normal(size=(2, 1, 1, 32)).astype(np.float32)
    def score(m, n):
        cq, sq = L.rope_angles(np.array([m]), 32)
        ck, sk = L.rope_angles(np.array([n]), 32)
        return float((L.rope(q, cq, sq) * L.rope(k, ck, sk)).sum())
    assert score(7, 3) == pytest.approx(score(104, 100), rel=1e-4)
    assert score(7, 3) != pytest.approx(score(8, 3), rel=1e-3)


def test_rope_linear_scaling_divides_positions():
    c1, s1 = L.rope_angles(np.array([8]), 8, base=1e6, scale=8.0)
    c2, s2 = L.rope_angles(np.array([1]), 8, base=1e6)
    np.testing.assert_allclose(c1, c2, atol=1e-6)
    np.testing.assert_allclose(s1, s2, atol=1e-6)


def test_softcap_bounds_and_near_identity():
    x = np.array([-1e4, -1.0, 0.0, 0.5, 1e4], np.float32)
    y = L.softcap(x, 30.0)
    assert np.all(np.abs(y) <= 30.0)
    np.testing.assert_allclose(y[1:4], x[1:4], atol=1e-3)


def test_causal_mask_and_window_of_w_keys_including_current():
    m = L.causal_mask(np.arange(5), np.arange(5), window=2)
    assert m.sum(axis=1).tolist() == [1, 2, 2, 2, 2]
    assert m[4].tolist() == [False, False, False, True, True]
    assert np.array_equal(L.causal_mask(np.arange(3), np.arange(3)), np.tril(np.ones((3, 3), bool)))


def test_first_key_is_the_start_of_a_window_of_w_keys():
    # a window of 3 keys at position 5 holds keys 3, 4, 5; near the start it holds fewer
    assert L.first_key(5, 3) == 3 and L.first_key(1, 3) == 0 and L.first_key(7, None) == 0
    np.testing.assert_array_equal(L.first_key(np.arange(6), 2), [0, 0, 1, 2, 3, 4])


def test_attention_uniform_over_equal_keys():
    q = np.ones((1, 2, 4), np.float32)
    k = np.ones((1, 2, 4), np.float32)
    v = np.array([[[1, 1, 1, 1], [3, 3, 3, 3]]], np.float32)
    out, probs = L.attention(q, k, v, L.causal_mask(np.arange(2), np.arange(2)), 0.5)
    np.testing.assert_allclose(probs[0], [[1, 0], [0.5, 0.5]])
    np.testing.assert_allclose(out[0], [[1] * 4, [2] * 4])


def test_mqa_equals_mha_with_the_kv_head_repeated():
    H, T, d = 4, 7, 8
    q = rng.normal(size=(H, T, d)).astype(np.float32)
    k, v = rng.normal(size=(2, 1, T, d)).astype(np.float32)
    mask = L.causal_mask(np.arange(T), np.arange(T))
    mqa, _ = L.attention(q, k, v, mask, d ** -0.5)
    mha, _ = L.attention(q, np.repeat(k, H, 0), np.repeat(v, H, 0), mask, d ** -0.5)
    np.testing.assert_allclose(mqa, mha, rtol=1e-5, atol=1e-6)


def test_gqa_groups_consecutive_query_heads():
    H, K, T, d = 4, 2, 5, 8
    q = rng.normal(size=(H, T, d)).astype(np.float32)
    k, v = rng.normal(size=(2, K, T, d)).astype(np.float32)
    mask = L.causal_mask(np.arange(T), np.arange(T))
    gqa, _ = L.attention(q, k, v, mask, 0.3)
    mha, _ = L.attention(q, np.repeat(k, H // K, 0), np.repeat(v, H // K, 0), mask, 0.3)
    np.testing.assert_allclose(gqa, mha, rtol=1e-5, atol=1e-6)


def test_later_token_never_changes_an_earlier_output():
    H, T, d = 2, 6, 8
    q = rng.normal(size=(H, T, d)).astype(np.float32)
    k, v = rng.normal(size=(2, 1, T, d)).astype(np.float32)
    mask = L.causal_mask(np.arange(T), np.arange(T))
    out, _ = L.attention(q, k, v, mask, 0.35)
    k2, v2 = k.copy(), v.copy()
    k2[:, -1] += 100.0
    v2[:, -1] -= 50.0
    out2, _ = L.attention(q, k2, v2, mask, 0.35)
    np.testing.assert_array_equal(out[:, :-1], out2[:, :-1])
    assert not np.allclose(out[:, -1], out2[:, -1])


def test_gelu_tanh_values():
    x = np.array([0.0, 1.0, -1.0, 3.0], np.float32)
    ref = [0.5 * v * (1 + math.tanh(math.sqrt(2 / math.pi) * (v + 0.044715 * v ** 3))) for v in x]
    np.testing.assert_allclose(L.gelu_tanh(x), ref, rtol=1e-6)
    assert L.gelu_tanh(np.float32(1.0)) == pytest.approx(0.841192, abs=1e-6)  # exact GELU: 0.841345


def test_geglu_gates_up_by_gelu_of_gate():
    gate = np.array([[0.0, 1.0, 2.0]], np.float32)
    up = np.array([[5.0, 2.0, 1.0]], np.float32)
    np.testing.assert_allclose(L.geglu(gate, up), L.gelu_tanh(gate) * up)
    assert L.geglu(gate, up)[0, 0] == 0.0


def test_softmax_stable_for_large_values():
    p = L.softmax(np.array([1000.0, 1000.0, -np.inf], np.float32))
    np.testing.assert_allclose(p, [0.5, 0.5, 0.0])
