"""Stepping through a pass, and hooks: one forward pass that pauses, records or is edited.

The claims: the stepper's names are trace()'s, in order; stepped to its end unedited it gives
exactly forward(ids), every value equal to trace()'s, on the reference and the fast path; an
edit where it is paused is what the rest of the pass uses, and equals forward with a hook doing
the same edit; hooks reach generation; bad names and shapes are refused clearly.
"""

import gc
import threading

import numpy as np
import pytest

import tinygemma as tg
from tinygemma.trace import step_names
from tiny import write_hf


@pytest.fixture(scope="module", params=[1, 2, 3], ids=["gemma1", "gemma2", "gemma3"])
def folder(request, tmp_path_factory):
    """A tiny checkpoint per family (Gemma 2: soft-caps and a window of 4 keys)."""
    return write_hf(tmp_path_factory.mktemp(f"g{request.param}"), family=request.param,
                    num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2)


@pytest.fixture(scope="module", params=[False, True], ids=["reference", "fast"])
def tiny(request, folder):
    return tg.load(folder, fast=request.param)


IDS = np.array([2, 17, 33, 5, 9, 121, 7, 250, 3, 64, 11])  # 11 tokens: > 8, the prefill path


def demo_ids(model):
    return np.asarray(model.tokenizer.encode("The capital of France is"))


def test_names_are_traces_in_order(tiny):
    c = tiny.config
    names = step_names(c)
    assert list(tiny.trace(IDS)) == names == tiny.steps(IDS).names
    per_layer = 15 if c.sandwich_norms else 13
    assert len(names) == 3 + c.num_layers * per_layer
    assert names[:2] == ["embed", "layers.0.attn_norm"] and names[-2:] == ["final_norm", "logits"]


def test_stepping_unedited_is_forward_and_trace(tiny):
    want, tape = tiny.forward(IDS), tiny.trace(IDS)
    s = tiny.steps(IDS)
    assert s.name is None  # nothing has run yet
    seen = []
    for name, value in s:
        np.testing.assert_array_equal(value, tape[name], err_msg=name)
        seen.append(name)
    assert seen == s.names
    np.testing.assert_array_equal(s.logits, want)
    np.testing.assert_array_equal(tape["logits"], want)


def test_demo_stepping_is_forward_on_both_paths(model):
    """On the fast path too: the stepped pass runs the kernels forward runs (the attention
    probabilities it shows come from the reference, beside them)."""
    ids = demo_ids(model)
    s = model.steps(ids)
    probs = s.run_to("layers.17.attn_probs")
    assert probs.shape == (4, len(ids), len(ids))
    np.testing.assert_allclose(probs.sum(-1), 1, rtol=1e-5)
    assert np.all(np.triu(probs[0], 1) == 0)  # causal: no query sees a later key
    s.run_to("logits")
    np.testing.assert_array_equal(s.logits, model.forward(ids))


def test_run_to_and_its_errors(tiny):
    s = tiny.steps(IDS)
    v = s.run_to("layers.1.mlp_norm")
    assert s.name == "layers.1.mlp_norm" and v is s.value
    assert s.run_to("layers.1.mlp_norm") is v  # where it is: no step
    with pytest.raises(ValueError, match="already been passed"):
        s.run_to("layers.0.resid_mlp")
    with pytest.raises(ValueError, match="closest: layers.1.attn_probs"):
        s.run_to("layers.1.attn_prob")
    with pytest.raises(ValueError, match="has not reached its end"):
        s.logits
    s.run_to("logits")
    assert s.logits.shape == (len(IDS), tiny.config.vocab_size)  # at the last point: finished
    assert list(s) == []


def test_replace_is_what_the_rest_of_the_pass_uses(tiny):
    name = "layers.1.resid_attn"
    s = tiny.steps(IDS)
    x = s.run_to(name)
    with pytest.raises(ValueError, match=r"replace\(\) gave 'layers.1.resid_attn' shape"):
        s.replace(x[:3])
    s.replace(x * 2)
    for _ in s:
        pass
    hooked = tiny.forward(IDS, hooks={name: lambda v, n: v * 2})
    np.testing.assert_array_equal(s.logits, hooked)
    assert not np.allclose(hooked, tiny.forward(IDS))


def test_edited_attention_pattern_drives_the_heads(tiny):
    """Every query of layer 0 attends only to key 0: each head's output is then exactly the
    value at position 0 of its KV head (a hand check of what an edited pattern does)."""
    c = tiny.config
    s = tiny.steps(IDS)
    v = s.run_to("layers.0.v")  # [K, T, d]
    probs = s.run_to("layers.0.attn_probs")
    onehot = np.zeros_like(probs)
    onehot[..., 0] = 1
    s.replace(onehot)
    heads = s.run_to("layers.0.attn_heads")  # [H, T, d]
    G = c.num_heads // c.num_kv_heads
    for h in range(c.num_heads):
        np.testing.assert_array_equal(heads[h], np.broadcast_to(v[h // G, 0], heads[h].shape))
    s.run_to("logits")

    def first_key_only(p, name):  # in place, returned: an edit all the same
        p[:] = 0
        p[..., 0] = 1
        return p
    hooked = tiny.forward(IDS, hooks={"layers.0.attn_probs": first_key_only})
    np.testing.assert_allclose(s.logits, hooked, rtol=1e-6, atol=1e-6)
    assert not np.allclose(hooked, tiny.forward(IDS))


def test_stepping_fills_the_cache_as_forward_does(tiny):
    """Step through the prompt, then through one decoded token."""
    n = len(IDS)
    a, b = tiny.new_cache(n + 1), tiny.new_cache(n + 1)
    tiny.forward(IDS[:-1], cache=a)
    for _ in (s := tiny.steps(IDS[:-1], cache=b)):
        pass
    assert a.pos == b.pos == n - 1
    for i in range(tiny.config.num_layers):
        np.testing.assert_array_equal(a.k[i], b.k[i])
        np.testing.assert_array_equal(a.v[i], b.v[i])
    s = tiny.steps(IDS[-1:], cache=b)
    q = s.run_to("layers.0.attn_probs")
    assert q.shape[1:] == (1, min(n, tiny.config.window(0) or n))  # one query over the keys it sees
    s.run_to("logits")
    np.testing.assert_array_equal(s.logits, tiny.forward(IDS[-1:], cache=a))
    np.testing.assert_allclose(s.logits[0], tiny.forward(IDS)[-1], rtol=1e-4, atol=1e-4)


def test_hook_errors_name_the_problem(tiny):
    with pytest.raises(ValueError, match="closest: layers.1.resid_mlp"):
        tiny.forward(IDS, hooks={"layers.1.resid_mpl": lambda v, n: None})
    with pytest.raises(ValueError, match="not a named point"):
        tiny.forward(IDS, hooks={"layer.9": lambda v, n: None})
    with pytest.raises(ValueError, match="the hook on 'embed' gave 'embed' shape"):
        tiny.forward(IDS, hooks={"embed": lambda v, n: v[:, :4]})
    with pytest.raises(ValueError, match="not callable"):
        tiny.forward(IDS, hooks={"embed": 3})


def test_hooks_see_every_name_and_none_keeps_the_value(tiny):
    seen = []
    logits = tiny.forward(IDS, hooks={n: lambda v, n: seen.append(n) for n in tiny.names})
    assert seen == tiny.names
    np.testing.assert_array_equal(logits, tiny.forward(IDS))


def test_hooks_apply_at_every_generation_step(model):
    """A steering hook changes the text; it runs once for the prompt, then once a token."""
    calls = []

    def steer(x, name):  # [T, D]: push the last position along a fixed direction
        calls.append(len(x))
        x = x.copy()
        x[-1] += 40 * np.sign(np.arange(x.shape[1]) % 2 - 0.5)
        return x
    plain = tg.generate(model, "The capital of France is", max_new_tokens=6, ignore_eos=True)
    steered = tg.generate(model, "The capital of France is", max_new_tokens=6, ignore_eos=True,
                          hooks={"layers.6.resid_mlp": steer})
    assert steered != plain
    assert calls == [6, 1, 1, 1, 1, 1]  # the 6-token prompt, then 5 decode steps (the 6th token needs none)
    pieces = list(tg.stream(model, "The capital of France is", max_new_tokens=6, ignore_eos=True,
                            hooks={"layers.6.resid_mlp": steer}))
    assert "".join(pieces) == steered


def test_hooks_block_is_this_threads_only(tiny):
    zero = {"layers.0.attn_out": lambda v, n: np.zeros_like(v)}
    plain = tiny.forward(IDS)
    other = []
    with tiny.hooks(zero):
        inside = tiny.forward(IDS)
        t = threading.Thread(target=lambda: other.append(tiny.forward(IDS)))
        t.start()
        t.join()
        stepped = tiny.steps(IDS)
        stepped.run_to("logits")
        np.testing.assert_array_equal(stepped.logits, inside)
    np.testing.assert_array_equal(inside, tiny.forward(IDS, hooks=zero))
    np.testing.assert_array_equal(other[0], plain)
    np.testing.assert_array_equal(tiny.forward(IDS), plain)


def test_a_dropped_stepper_ends_its_thread(tiny):
    def pass_threads():
        return [t for t in threading.enumerate() if t.name == "tinygemma-steps"]
    before = len(pass_threads())
    s = tiny.steps(IDS)
    s.run_to("layers.0.q")
    assert len(pass_threads()) == before + 1
    s.close()
    assert len(pass_threads()) == before
    s = tiny.steps(IDS)
    next(s)
    thread = pass_threads()[-1]
    del s
    gc.collect()
    thread.join(timeout=10)
    assert not thread.is_alive()


def test_an_error_in_the_pass_reaches_the_stepper(tiny):
    def boom(v, n):
        raise RuntimeError("hook failed")
    with tiny.hooks({"layers.0.q": boom}):
        s = tiny.steps(IDS)
    with pytest.raises(RuntimeError, match="hook failed"):
        s.run_to("logits")
    assert list(s) == []
