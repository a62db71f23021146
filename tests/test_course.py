"""The course's checkers (tinygemma.course.check): right answers pass, each classic mistake is
named, a stub is "not written yet", and strict mode raises.

Every wrong function below is written the way a student would write it, independently of the
checker's own variants, so the test fails if a checker stops recognising the mistake.
"""

import math

import numpy as np
import pytest

from tinygemma import layers as L
from tinygemma.course import check, solutions
from tinygemma.generate import next_token_probs

f32 = np.float32


@pytest.fixture(autouse=True)
def lenient(monkeypatch):
    monkeypatch.delenv(check.STRICT, raising=False)


def softmax(s, axis=-1):
    e = np.exp(s - s.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


# ---- the package's own functions, and hand-written right answers, pass ------------------------
@pytest.mark.parametrize("name, fn", [
    ("embed", L.embed), ("rms_norm", L.rms_norm), ("rope", L.rope), ("attention", L.attention),
    ("geglu", L.geglu), ("sampling", next_token_probs)])
def test_the_package_passes(name, fn):
    result = getattr(check, name)(fn)
    assert result and result.passed, result.message
    assert result.message.startswith("Correct")


def test_a_right_answer_in_float64_passes():
    def my_rms_norm(x, w, eps=1e-6):
        x = x.astype(np.float64)
        return x / np.sqrt((x ** 2).mean(-1, keepdims=True) + eps) * (1 + w)

    assert check.rms_norm(my_rms_norm)


# ---- a stub is not written yet, and says how to see the solution ------------------------------
@pytest.mark.parametrize("name", list(check.COMPONENTS))
def test_a_stub_is_not_written_yet(name):
    def stub(*args):
        raise NotImplementedError

    result = getattr(check, name)(stub)
    assert not result
    assert result.message.startswith("Not written yet")
    assert f"check.solution({name!r})" in result.message and "%load -s" in result.message


def test_a_function_returning_none_is_not_written_yet():
    assert check.geglu(lambda gate, up: None).message.startswith("Not written yet")


def test_strict_mode_raises(monkeypatch):
    monkeypatch.setenv(check.STRICT, "1")
    with pytest.raises(AssertionError, match="Not written yet"):
        check.geglu(lambda gate, up: None)
    assert check.geglu(L.geglu)  # a pass does not raise


def test_an_error_in_the_students_code_is_reported_not_raised():
    def broken(E, ids):
        return E[ids] * undefined_name  # noqa: F821

    result = check.embed(broken)
    assert not result and "NameError" in result.message


# ---- each known mistake fails with its hint ---------------------------------------------------
def embed_unscaled(E, ids):
    return E[ids]


def embed_bf16(E, ids):
    s = np.float32(np.sqrt(E.shape[1]))
    bits = s.view(np.uint32)
    bits = np.uint32(((int(bits) + 0x7FFF + ((int(bits) >> 16) & 1)) >> 16) << 16)  # to bf16
    return E[ids] * bits.view(np.float32)


def embed_vocab(E, ids):
    return E[ids] * np.sqrt(E.shape[0])


def norm_w(x, w, eps=1e-6):
    return x / np.sqrt(np.mean(x * x, -1, keepdims=True) + eps) * w


def norm_layer(x, w, eps=1e-6):
    x = x - x.mean(-1, keepdims=True)
    return x / np.sqrt(np.mean(x * x, -1, keepdims=True) + eps) * (1 + w)


def norm_eps_outside(x, w, eps=1e-6):
    return x / (np.sqrt(np.mean(x * x, -1, keepdims=True)) + eps) * (1 + w)


def norm_axis0(x, w, eps=1e-6):
    return x / np.sqrt(np.mean(x * x, 0, keepdims=True) + eps) * (1 + w)


def rope_interleaved(x, cos, sin):  # the RoFormer / LLaMA-1 pairs (2i, 2i+1)
    d = x.shape[-1]
    out = np.empty_like(x)
    c, s = cos[..., : d // 2], sin[..., : d // 2]
    out[..., 0::2] = x[..., 0::2] * c - x[..., 1::2] * s
    out[..., 1::2] = x[..., 0::2] * s + x[..., 1::2] * c
    return out


def rope_backwards(x, cos, sin):
    h = x.shape[-1] // 2
    return x * cos + np.concatenate([x[..., h:], -x[..., :h]], -1) * sin


def attention_student(q, k, v, mask, scale, cap=None, *, tile=False, use_mask=True,
                      own_scale=False, ignore_cap=False):
    H, K = q.shape[0], k.shape[0]
    G = H // K
    k = np.tile(k, (G, 1, 1)) if tile else np.repeat(k, G, 0)  # [H, S, d]
    v = np.tile(v, (G, 1, 1)) if tile else np.repeat(v, G, 0)
    s = q @ k.transpose(0, 2, 1) * (q.shape[-1] ** -0.5 if own_scale else scale)
    if cap is not None and not ignore_cap:
        s = cap * np.tanh(s / cap)
    if use_mask:
        s = np.where(mask, s, -np.inf)
    p = softmax(s)
    return p @ v, p


def test_a_hand_written_attention_passes():
    assert check.attention(attention_student)


def gelu_erf(x):
    erf = np.vectorize(math.erf)
    return 0.5 * x * (1 + erf(x / math.sqrt(2)))


def probs_temperature_after_softmax(logits, temperature, top_k=None, top_p=None):
    p = next_token_probs(logits, 1.0, top_k, top_p) / temperature
    return p / p.sum()


def probs_temperature_after_cut(logits, temperature, top_k=None, top_p=None):
    kept = next_token_probs(logits, 1.0, top_k, top_p) > 0
    z = np.where(kept, logits / temperature, -np.inf)
    return softmax(z.astype(np.float64))


def probs_nucleus_short(logits, temperature, top_k=None, top_p=None):
    z = logits.astype(np.float64) / temperature
    if top_k is not None and top_k < len(z):
        z = np.where(z >= np.sort(z)[-top_k], z, -np.inf)
    p = softmax(z)
    if top_p is not None:
        order = np.argsort(-p)
        drop = order[np.cumsum(p[order]) >= top_p]  # drops the token that crosses top_p
        p[drop] = 0
        p /= p.sum()
    return p


MISTAKES = [
    ("embed", embed_unscaled, "no sqrt(D) scaling"),
    ("embed", embed_bf16, "rounded to bfloat16"),
    ("embed", embed_vocab, "the vocabulary size"),
    ("rms_norm", norm_w, "Gemma scales by (1 + w)"),
    ("rms_norm", norm_layer, "LayerNorm"),
    ("rms_norm", norm_eps_outside, "eps belongs inside the square root"),
    ("rms_norm", norm_axis0, "over its last axis"),
    ("rope", rope_interleaved, "interleaved"),
    ("rope", rope_backwards, "the wrong way"),
    ("rope", lambda x, cos, sin: x * cos + x * sin, "sin multiplies rotate_half(x)"),
    ("attention", lambda *a: attention_student(*a, use_mask=False), "no causal mask"),
    ("attention", lambda *a: attention_student(*a, tile=True), "not shared across its query group"),
    ("attention", lambda *a: attention_student(*a, own_scale=True), "use the `scale` argument"),
    ("attention", lambda *a: attention_student(*a, ignore_cap=True), "`cap` is ignored"),
    ("geglu", lambda gate, up: gelu_erf(gate) * up, "exact GELU"),
    ("geglu", lambda gate, up: np.maximum(gate, 0) * up, "ReLU"),
    ("geglu", lambda gate, up: L.gelu_tanh(up) * gate, "on the gate"),
    ("sampling", probs_temperature_after_softmax, "temperature has no effect"),
    ("sampling", probs_temperature_after_cut, "applied after the top-k / top-p cut"),
    ("sampling", lambda z, t, k=None, p=None: next_token_probs(z * t, 1.0, k, p),
     "multiply the logits by the temperature"),
    ("sampling", probs_nucleus_short, "stops one token short"),
]


@pytest.mark.parametrize("name, wrong, hint", MISTAKES, ids=[m[2] for m in MISTAKES])
def test_each_mistake_fails_with_its_hint(name, wrong, hint):
    result = getattr(check, name)(wrong)
    assert not result
    assert result.message.startswith("Not quite")
    assert "Likely mistake: " + hint in result.message or hint in result.message.split("Likely mistake:")[1], \
        result.message
    assert "expected" in result.message and "off by" in result.message  # the element and how far


def test_an_attention_returning_only_the_output_is_told_to_return_both():
    result = check.attention(lambda *a: L.attention(*a)[0])
    assert not result and "return the tuple (out, probs)" in result.message


def test_an_unknown_mistake_still_names_the_element():
    result = check.geglu(lambda gate, up: L.geglu(gate, up) + f32(0.01))
    assert not result and "No common mistake" in result.message and "off by" in result.message


# ---- the solutions: printed on request, and the stub cells they fill --------------------------
def test_solution_prints_the_component_and_a_chapter_function(capsys):
    check.solution("02", "safe_sizes")
    assert "def safe_sizes" in capsys.readouterr().out
    check.solution("02", "no_such_function")
    assert "has no function 'no_such_function'" in capsys.readouterr().out


def test_solved_cell_replaces_each_stub_with_the_solution(tmp_path):
    sol = tmp_path / "99_x_solutions.py"
    sol.write_text("import numpy as np\n\n\ndef other():\n    return 2\n\n\n"
                   "def my_f(x):\n    return np.float32(x) + 1\n")
    stub = 'def my_f(x):\n    """Add one."""\n    raise NotImplementedError\n'
    cell = solutions.solved_cell(stub, sol)
    assert "import numpy as np" in cell and "return np.float32(x) + 1" in cell
    assert "NotImplementedError" not in cell and "def other" not in cell  # only the stubs' names
    with pytest.raises(KeyError, match="does not define my_g"):
        solutions.solved_cell("def my_g():\n    raise NotImplementedError\n", sol)
