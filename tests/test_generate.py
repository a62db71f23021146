"""Sampling and generation: distributions checked by hand, stop tokens, seeds, the context."""

import numpy as np
import pytest

import tinygemma as tg
from tinygemma.generate import generate_ids, next_token_probs, pick


def test_temperature_scales_the_softmax():
    logits = np.log(np.array([0.5, 0.25, 0.25]))
    np.testing.assert_allclose(next_token_probs(logits, 1.0), [0.5, 0.25, 0.25])
    # temperature 0.5 squares the probabilities before renormalising: 0.25, 0.0625, 0.0625
    np.testing.assert_allclose(next_token_probs(logits, 0.5), np.array([4, 1, 1]) / 6)


@pytest.mark.parametrize("temperature", [1e-320, 5e-324, 1e-300])
def test_temperature_that_underflows_is_greedy(temperature):
    """logits / 1e-320 overflows to inf; the limit of softmax(z / T) as T -> 0 is the argmax
    (ties shared), and that is what comes out: no NaN, the draw is the argmax."""
    logits = np.array([1.0, 3.0, -2.0, 2.5], np.float32)
    np.testing.assert_array_equal(next_token_probs(logits, temperature), [0, 1, 0, 0])
    tied = np.array([3.0, 1.0, 3.0], np.float32)
    np.testing.assert_array_equal(next_token_probs(tied, temperature, top_p=0.9), [0.5, 0, 0.5])
    rng = np.random.default_rng(0)
    assert {pick(logits, temperature, None, None, rng) for _ in range(20)} == {1}


def test_top_k_keeps_the_k_most_likely():
    logits = np.log(np.array([0.1, 0.4, 0.2, 0.3]))
    np.testing.assert_allclose(next_token_probs(logits, 1.0, top_k=2), [0, 4 / 7, 0, 3 / 7])
    np.testing.assert_allclose(next_token_probs(logits, 1.0, top_k=1), [0, 1, 0, 0])


def test_top_p_keeps_the_smallest_set_reaching_p():
    logits = np.log(np.array([0.1, 0.4, 0.2, 0.3]))
    # sorted: 0.4, 0.3 (0.7 >= 0.6 reached), so 0.2 and 0.1 go
    np.testing.assert_allclose(next_token_probs(logits, 1.0, top_p=0.6), [0, 4 / 7, 0, 3 / 7])
    np.testing.assert_allclose(next_token_probs(logits, 1.0, top_p=0.4), [0, 1, 0, 0])
    np.testing.assert_allclose(next_token_probs(logits, 1.0, top_p=1.0), [0.1, 0.4, 0.2, 0.3])


def test_greedy_is_argmax_and_sampling_follows_the_distribution():
    rng = np.random.default_rng(0)
    logits = np.log(np.array([0.2, 0.5, 0.3]))
    assert pick(logits, 0.0, None, None, rng) == 1
    draws = [pick(logits, 1.0, None, None, rng) for _ in range(4000)]
    np.testing.assert_allclose(np.bincount(draws, minlength=3) / 4000, [0.2, 0.5, 0.3], atol=0.03)


def test_seeded_sampling_is_reproducible(demo):
    kw = dict(max_new_tokens=12, temperature=0.9, top_k=50, top_p=0.95, ignore_eos=True)
    a = tg.generate(demo, "Once upon a time", seed=7, **kw)
    assert a == tg.generate(demo, "Once upon a time", seed=7, **kw)
    others = {tg.generate(demo, "Once upon a time", seed=s, **kw) for s in range(8, 12)}
    assert others - {a}  # different seeds do not all give the same text


class Scripted:
    """A model whose next token follows a script (one-hot logits): the real demo config and
    tokenizer around it, so generate_ids runs unchanged."""

    def __init__(self, demo, script):
        self.config, self.tokenizer, self.script = demo.config, demo.tokenizer, list(script)
        self.check_ids, self.new_cache = demo.check_ids, demo.new_cache

    def forward(self, ids, cache=None, last_only=False, hooks=None):
        logits = np.zeros((1, self.config.vocab_size), np.float32)
        logits[0, self.script.pop(0)] = 1.0
        return logits


@pytest.mark.parametrize("stop", ["<end_of_turn>", "<eos>"])
def test_generation_stops_at_eos_and_end_of_turn(demo, stop):
    tok = demo.tokenizer
    stop_id = tok.piece_to_id(stop)
    assert stop_id in tok.stop_ids
    script = [100, 200, stop_id, 300, 400]
    assert list(generate_ids(Scripted(demo, script), [2, 5], 5)) == [100, 200]
    assert list(generate_ids(Scripted(demo, script), [2, 5], 5, ignore_eos=True)) == script


def test_stream_pieces_join_to_the_decode_of_the_new_ids(demo):
    ids = demo.tokenizer.encode("写一首关于大海的诗：")
    new = list(generate_ids(demo, ids, 16, ignore_eos=True))
    text = "".join(tg.stream(demo, "写一首关于大海的诗：", max_new_tokens=16, ignore_eos=True))
    assert text == demo.tokenizer.decode(new)


def test_prompt_plus_new_tokens_beyond_the_context_is_an_error(demo):
    n = demo.config.max_position_embeddings
    with pytest.raises(ValueError, match="context"):
        tg.generate(demo, "hello", max_new_tokens=n)


@pytest.mark.parametrize("kwargs, words", [
    (dict(temperature=-1.0), "temperature"), (dict(top_p=0.0), "top_p"),
    (dict(top_p=1.5), "top_p"), (dict(top_k=0), "top_k"), (dict(max_new_tokens=-1), "max_new_tokens"),
    (dict(seed=-1), "seed must be an integer >= 0"), (dict(seed=1.5), "seed"),
])
def test_bad_sampling_settings(demo, kwargs, words):
    with pytest.raises(ValueError, match=words):
        tg.generate(demo, "hello", **kwargs)
    with pytest.raises(ValueError, match="empty"):
        tg.generate(demo, "")
