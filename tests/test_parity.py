"""Parity with Hugging Face transformers on tiny random Gemma 1/2/3 checkpoints.

The checkpoints and their reference logits and hidden states were written by
``tests/fixtures/make_fixtures.py`` with transformers (eager attention, float32); these tests
read them without PyTorch. Each checkpoint is stored twice: bf16 sharded and f32 single-file.
"""

from pathlib import Path

import numpy as np
import pytest

import tinygemma as tg
from tinygemma.trace import PARITY_RTOL, first_drift

FIXTURES = Path(__file__).parent / "fixtures"
MODELS = ["gemma1_2b", "gemma1_7b", "gemma2", "gemma3"]
LAYOUTS = ["", "_f32"]  # bf16 sharded, f32 single file


def reference(name):
    with np.load(FIXTURES / f"{name}_ref.npz") as z:
        return {k: z[k] for k in z.files}


def prompts(ref):
    return sorted(int(k.split("_")[1]) for k in ref if k.startswith("ids_"))


@pytest.fixture(scope="module", params=[(m, lay) for m in MODELS for lay in LAYOUTS],
                ids=lambda p: p[0] + (p[1] or "_bf16_sharded"))
def model_and_ref(request):
    name, layout = request.param
    return tg.load(FIXTURES / (name + layout), fast=False), reference(name)


def test_logits_match_transformers(model_and_ref):
    model, ref = model_and_ref
    for j in prompts(ref):
        ids, want = ref[f"ids_{j}"], ref[f"logits_{j}"]
        got = model.forward(ids)
        scale = float(np.abs(want).max())
        err = float(np.abs(got - want).max())
        if err > PARITY_RTOL * scale:
            report = first_drift(model.trace(ids), ref[f"hidden_{j}"], model.config.num_layers)
            pytest.fail(f"prompt {j} ({len(ids)} tokens): max|Δlogit| {err:.3g} > "
                        f"{PARITY_RTOL:g} × {scale:.3g}\n{report}")
        top2 = np.sort(want, axis=-1)[:, -2:]
        clear = top2[:, 1] - top2[:, 0] > 2e-4 * scale  # no near-tie in the reference
        assert np.array_equal(got.argmax(-1)[clear], want.argmax(-1)[clear])


def test_hidden_states_match_layer_by_layer(model_and_ref):
    model, ref = model_and_ref
    j = prompts(ref)[-1]
    ids, hidden = ref[f"ids_{j}"], ref[f"hidden_{j}"]
    report = first_drift(model.trace(ids), hidden, model.config.num_layers)
    assert report.startswith("no intermediate drifts"), report


def test_last_only_and_kv_cache_decoding_equal_the_full_forward(model_and_ref):
    model, ref = model_and_ref
    ids = ref[f"ids_{prompts(ref)[-1]}"][:60]
    full = model.forward(ids)
    scale = np.abs(full).max()
    # BLAS sums a one-row product in another order than a many-row one: equal to rounding
    np.testing.assert_allclose(model.forward(ids, last_only=True), full[-1:], atol=1e-6 * scale, rtol=0)
    cache = model.new_cache(len(ids))
    steps = [model.forward(ids[:20], cache=cache)]
    steps += [model.forward(ids[t:t + 1], cache=cache) for t in range(20, len(ids))]
    np.testing.assert_allclose(np.concatenate(steps), full, atol=1e-5 * scale, rtol=0)
