"""The stepping helpers: logit lens, residual norms, top tokens, head ablation, plots.

Hand values on a 4-token vocabulary with an identity-like embedding, and properties on a tiny
random Gemma 3 (two layers, two query heads sharing one KV head) built here from its config.
"""

import numpy as np
import pytest

from tinygemma import Gemma, GemmaConfig
from tinygemma.checkpoints.weights import Tensor, Weights, expected_shapes
from tinygemma.lens import (ablate_heads, logit_lens, residual_norms, top_k_ids, top_tokens,
                            unembed)
from tinygemma.trace import ambient_hooks


class Pieces:
    """A stand-in tokenizer: the piece of id i is "t{i}"."""

    def encode(self, text):
        raise NotImplementedError

    def id_to_piece(self, i):
        return f"t{i}"


def make_model(config, seed=0, overrides=None):
    rng = np.random.default_rng(seed)
    arrays = {name: (rng.standard_normal(shape) * (0.3 if len(shape) == 1 else 0.5)).astype(np.float32)
              for name, shape in expected_shapes(config).items()}
    arrays.update(overrides or {})
    return Gemma(config, Weights({n: Tensor(a) for n, a in arrays.items()}), Pieces())


TINY = GemmaConfig(family=3, vocab_size=12, hidden_size=8, intermediate_size=16, num_layers=2,
                   num_heads=2, num_kv_heads=1, head_dim=4, query_pre_attn_scalar=4,
                   sandwich_norms=True, qk_norm=True)
IDS = np.array([2, 5, 7, 1, 9])


@pytest.fixture
def tiny():
    return make_model(TINY)


def hand_model(final_logit_softcap=None):
    """V = D = 4, E = 2 I, final norm weight 0: the lens logits are 2 * x / rms(x)."""
    c = GemmaConfig(family=2 if final_logit_softcap else 3, vocab_size=4, hidden_size=4,
                    intermediate_size=4, num_layers=1, num_heads=1, num_kv_heads=1, head_dim=4,
                    final_logit_softcap=final_logit_softcap)
    return make_model(c, overrides={"embed": 2 * np.eye(4, dtype=np.float32),
                                    "final_norm": np.zeros(4, np.float32)})


HAND_TAPE = {"embed": np.array([[3.0, 0, 0, 0]], np.float32),           # rms 1.5 -> logits [4, 0, 0, 0]
             "layers.0.resid_mlp": np.array([[1.0, 1, 0, 0]], np.float32)}  # -> [2√2, 2√2, 0, 0]


def test_logit_lens_by_hand():
    lens = logit_lens(hand_model(), HAND_TAPE, targets=[1], k=2)
    assert lens.names == ["embed", "layers.0"]
    e4, e2r2 = np.exp(4.0), np.exp(2 * np.sqrt(2))
    # embed row: token 0 with e^4 / (e^4 + 3); token 1 is tied with 2 and 3, below token 0
    assert lens.top_ids[0, 0, 0] == 0
    np.testing.assert_allclose(lens.top_probs[0, 0, 0], e4 / (e4 + 3), rtol=1e-5)
    np.testing.assert_allclose(lens.target_probs[0, 0], 1 / (e4 + 3), rtol=1e-5)
    assert lens.target_ranks[0, 0] == 1
    # layer 0 row: tokens 0 and 1 tie, each e^{2√2} / (2 e^{2√2} + 2); the target is on top
    assert set(lens.top_ids[1, 0]) == {0, 1}
    np.testing.assert_allclose(lens.top_probs[1, 0], [e2r2 / (2 * e2r2 + 2)] * 2, rtol=1e-5)
    assert lens.target_ranks[1, 0] == 0


def test_logit_lens_applies_the_gemma2_final_softcap():
    lens = logit_lens(hand_model(final_logit_softcap=2.0), HAND_TAPE, k=1)
    z = np.exp(2.0 * np.tanh(4.0 / 2.0))  # 2 tanh(4 / 2) = 1.928
    np.testing.assert_allclose(lens.top_probs[0, 0, 0], z / (z + 3), rtol=1e-5)


def test_lens_last_row_is_the_model_itself(tiny):
    tape = tiny.trace(IDS)
    probs = np.exp(tape["logits"] - tape["logits"].max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    lens = logit_lens(tiny, tape, positions=np.arange(len(IDS)), k=3)
    assert lens.top_ids.shape == (TINY.num_layers + 1, len(IDS), 3)
    np.testing.assert_array_equal(lens.top_ids[-1, :, 0], tape["logits"].argmax(-1))
    np.testing.assert_allclose(lens.top_probs[-1, :, 0], probs.max(-1), rtol=1e-5)
    np.testing.assert_allclose(unembed(tiny, tape["layers.1.resid_mlp"]), tape["logits"], rtol=1e-6)
    assert np.all(np.diff(lens.top_probs, axis=-1) <= 0)  # best first


def test_lens_positions_and_targets(tiny):
    tape = tiny.trace(IDS)
    lens = logit_lens(tiny, tape)  # default: the last position
    np.testing.assert_array_equal(lens.positions, [len(IDS) - 1])
    lens = logit_lens(tiny, tape, positions=[-2, 0], targets=[3, 4], k=12)  # k = V: all ranked
    np.testing.assert_array_equal(lens.positions, [3, 0])
    for r in range(TINY.num_layers + 1):
        for c, t in enumerate([3, 4]):
            rank = int(np.nonzero(lens.top_ids[r, c] == t)[0][0])
            assert lens.target_ranks[r, c] <= rank  # ties may share a rank
            np.testing.assert_allclose(lens.target_probs[r, c], lens.top_probs[r, c, rank])
    with pytest.raises(ValueError, match="targets"):
        logit_lens(tiny, tape, positions=[0, 1], targets=[3])
    with pytest.raises(IndexError):
        logit_lens(tiny, tape, positions=[len(IDS)])
    assert lens.top_pieces(tiny, position=0)[0][0][0] == f"t{lens.top_ids[0, 0, 0]}"


def test_residual_norms_by_hand():
    tape = {"embed": np.array([[3.0, 4.0], [0.0, 1.0]]),
            "layers.0.resid_mlp": np.array([[0.0, 0.0], [6.0, 8.0]]),
            "layers.1.resid_mlp": np.array([[1.0, 0.0], [2.0, 0.0]])}
    np.testing.assert_allclose(residual_norms(tape), [[5, 1], [0, 10], [1, 2]])
    np.testing.assert_allclose(residual_norms(tape, num_layers=1), [[5, 1], [0, 10]])


def test_top_tokens_by_hand():
    logits = np.log(np.array([1.0, 3.0, 1.0, 2.0]))  # probabilities 1/7, 3/7, 1/7, 2/7
    got = top_tokens(hand_model(), logits, k=2)
    assert [(i, s) for i, s, _ in got] == [(1, "t1"), (3, "t3")]
    np.testing.assert_allclose([p for *_, p in got], [3 / 7, 2 / 7])
    assert top_tokens(hand_model(), np.stack([logits[::-1], logits]), k=1)[0][0] == 1  # last row
    np.testing.assert_array_equal(top_k_ids(np.array([[0.1, 0.5, 0.2, 0.9]]), 3), [[3, 1, 2]])


def test_ablating_every_head_of_a_layer_removes_its_attention(tiny):
    with ablate_heads(tiny, {(0, 0), (0, 1)}):
        tape = tiny.trace(IDS)
    np.testing.assert_array_equal(tape["layers.0.attn_out"], 0)
    np.testing.assert_array_equal(tape["layers.0.resid_attn"], tape["embed"])


def test_ablating_a_head_equals_zeroing_its_columns_of_the_o_projection(tiny):
    d = TINY.head_dim
    for layer, head in [(0, 1), (1, 0)]:
        o = tiny.weights["layers.%d.o" % layer].copy()
        o[:, head * d:(head + 1) * d] = 0  # the head's slice of the concatenated heads
        want = make_model(TINY, overrides={f"layers.{layer}.o": o}).forward(IDS)
        with ablate_heads(tiny, [(layer, head)]):
            got = tiny.forward(IDS)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
        assert not np.allclose(got, tiny.forward(IDS))  # the head mattered


def test_ablation_leaves_earlier_layers_and_restores_the_model(tiny):
    before = tiny.trace(IDS)
    with ablate_heads(tiny, {(1, 0)}) as m:
        assert m is tiny
        during = tiny.trace(IDS)
    np.testing.assert_array_equal(during["layers.0.resid_mlp"], before["layers.0.resid_mlp"])
    np.testing.assert_array_equal(during["layers.1.attn_probs"], before["layers.1.attn_probs"])
    assert not np.array_equal(during["layers.1.attn_out"], before["layers.1.attn_out"])
    assert ambient_hooks(tiny) is None  # no hook left behind
    np.testing.assert_array_equal(tiny.forward(IDS), before["logits"])


def test_nested_ablations_compose(tiny):
    with ablate_heads(tiny, {(0, 0), (1, 1)}):
        both = tiny.forward(IDS)
    with ablate_heads(tiny, {(0, 0)}):
        outer = tiny.forward(IDS)
        with ablate_heads(tiny, {(1, 1)}):
            nested = tiny.forward(IDS)
        np.testing.assert_array_equal(tiny.forward(IDS), outer)  # the outer ablation is back
    np.testing.assert_array_equal(nested, both)
    assert not np.array_equal(outer, both)
    assert ambient_hooks(tiny) is None


def test_ablation_rejects_heads_that_do_not_exist(tiny):
    for bad in [(2, 0), (0, 2), (-1, 0)]:
        with pytest.raises(ValueError, match="no head"):
            with ablate_heads(tiny, [bad]):
                pass
    assert "attend" not in vars(tiny)


def test_plots_draw_what_they_are_given(tiny):
    mpl = pytest.importorskip("matplotlib")
    mpl.use("Agg")
    import matplotlib.pyplot as plt

    from tinygemma import plot

    tape = tiny.trace(IDS)
    tokens = [f"t{i}" for i in IDS]
    ax = plot.residual_norms(residual_norms(tape), tokens)
    assert len(ax.lines) == len(IDS)
    np.testing.assert_allclose(ax.lines[2].get_ydata(), residual_norms(tape)[:, 2])
    lens = logit_lens(tiny, tape, positions=np.arange(len(IDS)), k=1)
    ax = plot.lens_heatmap(lens, tiny, tokens)
    assert len(ax.texts) == (TINY.num_layers + 1) * len(IDS)
    assert ax.texts[0].get_text() == f"t{lens.top_ids[0, 0, 0]}"
    axes = plot.attention_heads(tape, 1, tokens)
    assert len(axes) == TINY.num_heads
    np.testing.assert_array_equal(axes[1].images[0].get_array(), tape["layers.1.attn_probs"][1])
    ax = plot.distribution(np.array([0.5, 0.3]), ["a", "b\n"])
    assert [p.get_height() for p in ax.patches] == [0.5, 0.3]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["a", "b\\n"]
    plt.close("all")


def test_ablation_works_on_the_fast_path_too(tiny):
    kernels = pytest.importorskip("tinygemma.kernels")
    fast = kernels.FastGemma(TINY, tiny.weights, Pieces())
    d = TINY.head_dim
    o = tiny.weights["layers.1.o"].copy()
    o[:, d:2 * d] = 0  # head 1 of layer 1
    want = make_model(TINY, overrides={"layers.1.o": o})
    for ids in (IDS, IDS[:3]):  # 5 tokens and 3: the fast path's kernels serve both
        with ablate_heads(fast, {(1, 1)}):
            got = fast.forward(ids)
        np.testing.assert_allclose(got, want.forward(ids), rtol=1e-4, atol=1e-5)
    cache = fast.new_cache(len(IDS))  # and token-by-token decoding through the KV cache
    with ablate_heads(fast, {(1, 1)}):
        steps = np.concatenate([fast.forward(IDS[t:t + 1], cache=cache) for t in range(len(IDS))])
    np.testing.assert_allclose(steps, want.forward(IDS), rtol=1e-4, atol=1e-5)
    assert "attend" not in vars(fast)
