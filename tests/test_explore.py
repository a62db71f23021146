"""The explorers, driven from Python as a user drives them: set a control, press a button, read
what the panels then show.

References: transformers' logits and greedy continuation of the demo prompt
(``tests/fixtures/demo_ref.npz``), and attention, norms and sampling distributions recomputed by
hand from the recorded numbers.
"""

import numpy as np
import pytest

import tinygemma as tg
from tinygemma import explore
from tinygemma.trace import step_names

PROMPT = "The capital of France is"  # prompt 0 of the demo fixture


@pytest.fixture(scope="module")
def explorer(model):
    return explore.layers(model, PROMPT)


def softmax(z):
    z = np.asarray(z, np.float64)
    e = np.exp(z - z.max())
    return e / e.sum()


def test_the_lens_at_the_last_layer_names_the_models_own_top_token(explorer, model, ref):
    last = f"layers.{model.config.num_layers - 1}.resid_mlp"
    explorer.step_slider.value = last
    explorer.position_menu.value = len(ref["ids_0"]) - 1
    want = softmax(ref["last_logits_0"])  # transformers' distribution
    top = explorer.shown["lens"]
    assert top[0][0] == int(np.argmax(want))
    assert top[0][1] == model.tokenizer.id_to_piece(int(np.argmax(want)))  # '▁the'
    assert [i for i, *_ in top] == list(np.argsort(-want)[:5])
    np.testing.assert_allclose([p for *_, p in top], np.sort(want)[::-1][:5], atol=1e-4)
    assert last in explorer.info.value and "07" in explorer.info.value


def test_stepping_to_attn_probs_shows_that_heads_map(explorer, model):
    c = model.config
    explorer.step_slider.value = "layers.3.attn_probs"
    explorer.head_menu.value = 2
    tape = explorer.tape
    q, k = tape["layers.3.q"][2], tape["layers.3.k"][0]  # [T, d]; one KV head shared by all
    T = len(q)
    scores = c.attn_scale * q.astype(np.float64) @ k.T.astype(np.float64)  # [T, T]
    scores[np.triu_indices(T, 1)] = -np.inf  # causal (the prompt is shorter than the window)
    want = np.stack([softmax(row) for row in scores])
    np.testing.assert_allclose(explorer.shown["value"], want, atol=1e-5)
    layer, head, probs = explorer.shown["attention"]
    assert (layer, head) == (3, 2)
    np.testing.assert_allclose(probs, want, atol=1e-5)
    assert "softmax" in explorer.info.value and "05" in explorer.info.value


def test_buttons_walk_the_pass_in_order_and_stop_at_its_ends(explorer, model):
    assert explorer.names == step_names(model.config) == list(explorer.tape)
    assert list(explorer.step_slider.options) == explorer.names
    explorer.step_slider.value = "embed"
    explorer.prev_button.click()
    assert explorer.step == "embed"  # clamped
    walked = [explorer.step]
    for _ in range(explorer.names.index("layers.1.q")):  # a layer and a bit, button by button
        explorer.next_button.click()
        walked.append(explorer.step)
    assert walked == explorer.names[:len(walked)] and walked[-1] == "layers.1.q"
    explorer.step_slider.value = "final_norm"
    explorer.next_button.click()
    explorer.next_button.click()
    assert explorer.step == "logits"  # clamped
    explorer.prev_button.click()
    assert explorer.step == "final_norm"


def test_the_norm_panel_marks_where_the_pass_stands(explorer):
    explorer.position_menu.value = 1
    for name, depth, stream in [("layers.4.mlp_norm", 4.5, "layers.4.resid_attn"),
                                ("layers.4.resid_mlp", 5.0, "layers.4.resid_mlp"),
                                ("layers.5.q", 5.0, "layers.4.resid_mlp"),
                                ("layers.0.attn_norm", 0.0, "embed")]:
        explorer.step_slider.value = name
        shown_depth, norms = explorer.shown["norms"]
        assert shown_depth == depth, name
        want = [np.linalg.norm(explorer.tape["embed"][1])] + [
            np.linalg.norm(explorer.tape[f"layers.{i}.resid_mlp"][1]) for i in range(len(norms) - 1)]
        np.testing.assert_allclose(norms, want, rtol=1e-5)
        assert stream in explorer.drawn["lens"]


def test_only_the_panels_that_change_are_redrawn(explorer):
    explorer.step_slider.value = "layers.2.resid_attn"  # [T, D]: the head does not matter
    before = {k: p.value for k, p in explorer.panels.items()}
    explorer.head_menu.value = (explorer.head_menu.value + 1) % explorer.model.config.num_heads
    after = {k: p.value for k, p in explorer.panels.items()}
    assert after["value"] is before["value"] and after["lens"] is before["lens"]
    assert after["norms"] is before["norms"]
    assert after["attention"] != before["attention"]  # the chosen head's map


def test_logits_step_shows_the_top_tokens_at_the_position(explorer, model, ref):
    explorer.step_slider.value = "logits"
    explorer.position_menu.value = len(ref["ids_0"]) - 1
    top = explorer.shown["value"]
    want = softmax(ref["last_logits_0"])
    assert [i for i, *_ in top] == list(np.argsort(-want)[:10])


def test_a_new_prompt_runs_the_pass_again(model):
    ex = explore.layers(model, "Hello", step="layers.1.v", position=0, head=1)
    assert ex.step == "layers.1.v" and ex.position_menu.value == 0
    assert ex.tokens == ["<bos>", "Hello"]
    ex.prompt_box.value = "The capital of France is"
    assert len(ex.tokens) == 6 and ex.tape["embed"].shape[0] == 6
    assert len(ex.position_menu.options) == 6 and ex.position_menu.value == 5


def test_displayed_explorers_carry_a_static_picture(explorer, model):
    bundle = explorer._repr_mimebundle_()
    assert "application/vnd.jupyter.widget-view+json" in bundle
    assert type(bundle["image/png"]) is bytes
    assert bundle["image/png"][:8] == b"\x89PNG\r\n\x1a\n"
    s = explore.sampling(model, "Once upon a time")
    bundle = s._repr_mimebundle_()
    assert type(bundle["image/png"]) is bytes  # what IPython encodes as base64 (a memoryview it cannot)
    assert bundle["image/png"][:8] == b"\x89PNG\r\n\x1a\n"
    assert "application/vnd.jupyter.widget-view+json" in bundle


def test_sampling_sliders_change_the_plotted_distribution(model):
    s = explore.sampling(model, "Once upon a time")
    z = s.logits.astype(np.float64)
    raw = softmax(z)
    ids = s.shown_ids
    assert list(ids) == list(np.argsort(-raw)[:len(ids)])
    np.testing.assert_allclose(s.shown_probs, raw[ids], rtol=1e-9)  # T = 1, nothing cut
    s.temperature.value = 0.5
    want = softmax(z / 0.5)
    np.testing.assert_allclose(s.shown_probs, want[ids], rtol=1e-9)
    assert s.shown_probs[0] > raw[ids[0]]  # colder: the top token gains
    s.top_k.value = 3
    kept = softmax(z[ids[:3]] / 0.5)
    np.testing.assert_allclose(s.shown_probs[:3], kept, rtol=1e-9)
    assert np.all(s.shown_probs[3:] == 0) and "3 tokens can be drawn" in s.status.value
    s.top_k.value, s.temperature.value, s.top_p.value = 0, 1.0, 0.7
    cum = np.cumsum(raw[ids])  # the nucleus: the smallest top set reaching 0.7
    n = int(np.searchsorted(cum, 0.7)) + 1
    np.testing.assert_allclose(s.shown_probs[:n], raw[ids[:n]] / cum[n - 1], rtol=1e-9)
    assert np.all(s.shown_probs[n:] == 0)
    s.temperature.value = 0  # greedy
    assert s.shown_probs[0] == 1 and np.all(s.shown_probs[1:] == 0)


def test_sample_appends_a_token_and_reset_starts_over(model, ref):
    s = explore.sampling(model, PROMPT, temperature=0)  # greedy: transformers' continuation
    for _ in range(3):
        s.sample_button.click()
    assert s.new == ref["gen_ids_0"][:3].tolist()
    assert model.tokenizer.decode(s.new) in s.text.value and "3 sampled" in s.status.value
    s.reset_button.click()
    assert s.new == [] and s.ids == ref["ids_0"].tolist() and "0 sampled" in s.status.value
    s.temperature.value, s.top_k.value = 1.0, 2  # a draw can only be one of the top two
    token = s.sample()
    assert token in np.argsort(-ref["last_logits_0"])[:2]


def test_explorers_reject_bad_input(model):
    with pytest.raises(ValueError, match="prompt must be a str"):
        explore.layers(model, 42)
    with pytest.raises(ValueError, match="temperature"):
        explore.sampling(model, "Hi", temperature=-1)
    with pytest.raises(ValueError, match="top_p"):
        explore.sampling(model, "Hi", top_p=0)
