"""The loss and perplexity against transformers' own ``model(ids, labels=ids).loss``.

References: ``tests/fixtures/loss_ref.*`` (``make_fixtures.py --only loss``), computed by
transformers itself, not from stored logits. Tolerances:

- tiny models, 1e-5 nats: their logits match transformers to ~1e-6 of their scale, and one
  NLL moves by at most twice the largest logit error (``logsumexp`` and the target's logit each
  move by at most that much); float32 rounding of transformers' own mean adds ~1e-6.
- the demo model, 2e-4 nats (measured: at most 3.1e-5 on either path): Q4_K_M weights
  dequantised in a different order and a 262144-way float32 softmax leave logit errors up to
  ~3e-2 at single positions (``test_demo.py``), which mostly cancel in the log-softmax and the
  mean. Per position, 1e-3 (measured: 1.9e-4 at worst over 2055 positions). A real mistake
  costs far more: scoring each token from its own position instead of the one before, or
  dropping BOS, moves the loss of the 500-token text by 8.6 and 1.0 nats.
"""

import json
from pathlib import Path

import numpy as np
import pytest

import tinygemma as tg
from tinygemma.evaluate import nll, token_nll

FIXTURES = Path(__file__).parent / "fixtures"
REF = json.loads((FIXTURES / "loss_ref.json").read_text())
TINY_TOL, DEMO_TOL, POSITION_TOL = 1e-5, 2e-4, 1e-3


@pytest.fixture(scope="module")
def arrays():
    with np.load(FIXTURES / "loss_ref.npz") as z:
        return {k: z[k] for k in z.files}


# ---- the formula, by hand --------------------------------------------------------------------
def test_nll_by_hand():
    logits = np.array([[0.0, 0.0], [0.0, np.log(3.0)], [1000.0, 0.0]])  # [3, 2]
    got = nll(logits, np.array([0, 1, 1]))
    # softmax([0, 0]) = [1/2, 1/2]; softmax([0, log 3]) = [1/4, 3/4]; a logit 1000 below the
    # top has probability e^-1000: -log of it is 1000, with no overflow on the way.
    np.testing.assert_allclose(got, [np.log(2), -np.log(0.75), 1000.0], rtol=1e-12)
    assert got.dtype == np.float64


# ---- tiny models -----------------------------------------------------------------------------
@pytest.mark.parametrize("fast", [False, True], ids=["reference", "fast"])
@pytest.mark.parametrize("name", sorted(REF["tiny"]))
def test_tiny_loss_matches_transformers(name, fast):
    model = tg.load(FIXTURES / f"{name}_f32", fast=fast)
    with np.load(FIXTURES / f"{name}_ref.npz") as z:
        for j, want in enumerate(REF["tiny"][name]):
            assert abs(model.loss(z[f"ids_{j}"]) - want) <= TINY_TOL, (name, j)


@pytest.mark.parametrize("name", sorted(REF["tiny_strided"]))
def test_tiny_windows_match_the_perplexity_guide(name):
    ref = REF["tiny_strided"][name]
    model = tg.load(FIXTURES / f"{name}_f32")
    with np.load(FIXTURES / f"{name}_ref.npz") as z:
        ids = z[f"ids_{ref['prompt']}"]
    got = np.concatenate(list(token_nll(model, ids, ref["window"], ref["stride"], chunk=7)))
    assert len(got) == ref["tokens"] == len(ids) - 1  # every token scored exactly once
    assert abs(got.mean() - ref["loss"]) <= TINY_TOL
    assert abs(got.mean() - model.loss(ids)) > 100 * TINY_TOL  # the windows do change the loss


# ---- the demo model --------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["france", "prose"])
def test_demo_loss_matches_transformers(model, arrays, name):
    ref = REF["demo"][name]  # model: the demo on both paths (conftest.py)
    ids = model.tokenizer.encode(ref["text"])
    assert ids == arrays[f"ids_{name}"].tolist()
    assert abs(model.loss(ids) - ref["loss"]) <= DEMO_TOL
    assert abs(tg.perplexity(model, ref["text"]) / np.exp(ref["loss"]) - 1) <= DEMO_TOL


def test_demo_loss_at_every_position(demo, arrays):
    # The per-position losses of the 500-token text against torch's cross-entropy.
    got = np.concatenate(list(token_nll(demo, arrays["ids_prose"])))
    assert np.abs(got - arrays["nll_prose"]).max() <= POSITION_TOL
    assert abs(got.mean() - REF["demo"]["prose"]["loss"]) <= DEMO_TOL


def test_demo_long_text_in_windows_matches_the_perplexity_guide(demo):
    ref = REF["demo"]["long"]
    ids = demo.tokenizer.encode(ref["text"])
    s = ref["strided"]
    windowed = np.concatenate(list(token_nll(demo, ids, s["window"], s["stride"])))
    assert len(windowed) == s["tokens"] == ref["n_tokens"] - 1
    assert abs(windowed.mean() - s["loss"]) <= DEMO_TOL
    # The whole text fits in the context (32768): one window, transformers' loss on all of it.
    assert abs(np.log(tg.perplexity(demo, ref["text"])) - ref["loss"]) <= DEMO_TOL


# ---- bad input -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny():
    return tg.load(FIXTURES / "gemma3_f32")


@pytest.mark.parametrize("ids, words", [([2], "at least 2 token ids"), ([], "non-empty"),
                                        ([2, 99999], "outside the vocabulary"),
                                        ([[2, 3]], "1-D")])
def test_loss_bad_ids(tiny, ids, words):
    with pytest.raises(ValueError, match=words):
        tiny.loss(ids)


def test_loss_past_the_context(tiny):
    with pytest.raises(ValueError, match="exceed the context"):
        tiny.loss(np.full(tiny.config.max_position_embeddings + 1, 3))


@pytest.mark.parametrize("window, stride, words", [(1, None, "window must be in"),
                                                   (10**6, None, "window must be in"),
                                                   (16, 16, "stride must be in"),
                                                   (16, 0, "stride must be in")])
def test_bad_windows(tiny, window, stride, words):
    with pytest.raises(ValueError, match=words):
        list(token_nll(tiny, [2, 3, 4], window, stride))


def test_windows_score_a_text_longer_than_the_context(tiny):
    T = tiny.config.max_position_embeddings + 50
    ids = np.random.default_rng(0).integers(3, tiny.config.vocab_size, T)
    got = np.concatenate(list(token_nll(tiny, ids, stride=400)))
    assert got.shape == (T - 1,) and np.isfinite(got).all()
