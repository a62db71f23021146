"""Checkers for the "your turn" cells: the student writes a component, a checker answers.

    from tinygemma.course import check
    ok = check.rms_norm(my_rms_norm)    # truthy on a pass; ok.message says what was found

Each checker runs the student's function and the package's on random inputs and on inputs
taken from the real demo model (Gemma 3 270M: its weights and the activations of its first
layer; the next-token logits for sampling), and compares them element by element within
``RTOL`` (tight enough to tell the exact GELU from Gemma's tanh one). On a miss the message
names the element that differs and by how much, then runs the known wrong variants (the
classic bugs of Gemma implementations) on the same input: the one that reproduces the
student's output names the likely mistake.

A stub (a function that raises ``NotImplementedError`` or returns None) gets "not written yet"
and how to see a solution, and the check does not raise, so a chapter runs unsolved. With the
environment variable ``TINYGEMMA_COURSE_STRICT=1`` every miss raises ``AssertionError``: CI
runs the chapters solved that way (``tests/test_solutions.py``).
"""

from __future__ import annotations

import functools
import math
import os

import numpy as np

from .. import layers as L
from ..generate import next_token_probs
from . import solutions

RTOL = 1e-5  # of the largest value: float32 rounding passes, the exact GELU (5e-4) does not
STRICT = "TINYGEMMA_COURSE_STRICT"

# component -> (chapter, the stub's name, the package function it must match)
COMPONENTS = {
    "embed": ("02_embeddings", "my_embed", "layers.embed"),
    "rms_norm": ("03_rmsnorm", "my_rms_norm", "layers.rms_norm"),
    "rope": ("04_rope", "my_rope", "layers.rope"),
    "attention": ("05_attention_mha_vs_mqa", "my_attention", "layers.attention"),
    "geglu": ("06_geglu", "my_geglu", "layers.geglu"),
    "sampling": ("08_generation", "my_next_token_probs", "generate.next_token_probs"),
}


class Result:
    """A checker's answer: truthy when the function passed; ``message`` says what was found."""

    def __init__(self, passed: bool, message: str):
        self.passed, self.message = passed, message

    def __bool__(self) -> bool:
        return self.passed

    def __repr__(self) -> str:  # a notebook shows the message as the cell's output
        return self.message

    __str__ = __repr__


class _NotWritten(Exception):
    pass


class _NotATuple(Exception):
    pass


# ---- comparing outputs -------------------------------------------------------------------------
def _outputs(got, names: tuple[str, ...]) -> tuple[np.ndarray, ...]:
    """The student's return value as a tuple of float64 arrays, one per expected output."""
    if got is None:
        raise _NotWritten
    if len(names) > 1:
        if not isinstance(got, (tuple, list)) or len(got) != len(names):
            raise _NotATuple(f"return the tuple ({', '.join(names)})")
        return tuple(np.asarray(g, dtype=np.float64) for g in got)
    return (np.asarray(got, dtype=np.float64),)


def _difference(got, want, names) -> str | None:
    """None when every output equals the expected one within RTOL of its largest value."""
    for name, g, w in zip(names, got, want):
        if g.shape != w.shape:
            return f"{name} has shape {g.shape}, expected {w.shape}"
        w = np.asarray(w, dtype=np.float64)
        scale = float(np.max(np.abs(w[np.isfinite(w)]), initial=0.0))
        off = np.abs(g - w)  # [...]
        off = np.where(g == w, 0.0, off)  # equal infinities are no difference
        bad = ~(off <= RTOL * scale + RTOL * np.abs(w))  # NaN counts as bad
        if bad.any():
            where = np.unravel_index(int(np.argmax(np.where(np.isnan(off), np.inf, off))), off.shape)
            elem = ", ".join(str(int(i)) for i in where)
            return (f"{name}[{elem}] is {g[where]:.6g}, expected {w[where]:.6g} "
                    f"(off by {off[where]:.3g}); {int(bad.sum())} of {bad.size} elements differ "
                    f"by more than {RTOL:g} of the largest value {scale:.4g}")
    return None


def _describe(args) -> str:
    parts = []
    for a in args:
        if isinstance(a, np.ndarray):
            parts.append(f"[{', '.join(map(str, a.shape))}]")
        else:
            parts.append(repr(a))
    return "(" + ", ".join(parts) + ")"


def _finish(passed: bool, message: str) -> Result:
    if not passed and os.environ.get(STRICT, "") not in ("", "0"):
        raise AssertionError(message)
    return Result(passed, message)


def _not_written(component: str, fn) -> Result:
    chapter, stub, _ = COMPONENTS[component]
    return _finish(False, (
        f"Not written yet: {getattr(fn, '__name__', stub)} still raises NotImplementedError "
        f"(or returns None). Write it in the cell above and run both cells again.\n"
        f"Stuck? check.solution({component!r}) prints a solution; or, in a new cell, "
        f"%load -s {stub} solutions/{chapter}_solutions.py"))


def _run(component: str, fn, cases, reference, variants, names=("output",)) -> Result:
    """Run ``fn`` and ``reference`` on every case; on a miss, find the variant that explains it.

    ``cases``: (label, args) pairs; ``variants``: (hint, function) pairs, each function a known
    wrong version with the reference's signature.
    """
    _, stub, target = COMPONENTS[component]
    name = getattr(fn, "__name__", stub)
    for label, args in cases:
        want = reference(*args)
        want = want if isinstance(want, tuple) else (want,)
        try:
            got = _outputs(fn(*[a.copy() if isinstance(a, np.ndarray) else a for a in args]), names)
        except (NotImplementedError, _NotWritten):
            return _not_written(component, fn)
        except _NotATuple as e:
            return _finish(False, f"Not quite: {name} returns one value; {e}.")
        except Exception as e:  # the student's bug: say what it raised, on which input
            return _finish(False, f"Not quite: {name}{_describe(args)} on {label} raised "
                                  f"{type(e).__name__}: {e}")
        miss = _difference(got, want, names)
        if miss is None:
            continue
        hint = None
        for text, variant in variants:
            try:
                wrong = variant(*args)
            except Exception:
                continue  # a variant that does not apply to this input
            wrong = wrong if isinstance(wrong, tuple) else (wrong,)
            if _difference(got, wrong, names) is None:
                hint = text
                break
        hint = hint or ("No common mistake gives this output: compare your code with the "
                        "formula, one step at a time, on a small input.")
        return _finish(False, f"Not quite: {name} differs from {target} on {label}, "
                              f"inputs {_describe(args)}.\n  {miss}.\n  Likely mistake: {hint}")
    return _finish(True, f"Correct: {name} matches {target} on {len(cases)} inputs, random ones "
                         f"and the demo model's real ones (within {RTOL:g} of the largest value).")


# ---- real inputs from the demo model, computed once ------------------------------------------
PROMPT = "The capital of France is"


@functools.lru_cache(maxsize=1)
def _demo() -> dict:
    """The demo model's weights and its first layer's activations on ``PROMPT``.

    Only layer 0 is computed (with the package's functions), which takes well under a second;
    a whole forward pass on the reference path takes several.
    """
    import tinygemma as tg

    model = tg.load_demo(fast=False, cache_bytes=64 << 20)
    c, W = model.config, model.weights
    ids = np.asarray(model.tokenizer.encode(PROMPT))  # [T]
    T, H, K, d = len(ids), c.num_heads, c.num_kv_heads, c.head_dim
    rows, local = np.unique(ids, return_inverse=True)
    E = W.table("embed")[rows]  # [U, D]: the real rows of the prompt's tokens
    x = L.embed(E, local)  # [T, D]
    h = L.rms_norm(x, W["layers.0.attn_norm"], c.rms_norm_eps)  # [T, D]
    q = L.linear(h, W["layers.0.q"]).reshape(T, H, d).transpose(1, 0, 2)  # [H, T, d]
    k = L.linear(h, W["layers.0.k"]).reshape(T, K, d).transpose(1, 0, 2)  # [K, T, d]
    v = L.linear(h, W["layers.0.v"]).reshape(T, K, d).transpose(1, 0, 2)  # [K, T, d]
    qn = L.rms_norm(q, W["layers.0.q_norm"], c.rms_norm_eps)  # [H, T, d]
    kn = L.rms_norm(k, W["layers.0.k_norm"], c.rms_norm_eps)  # [K, T, d]
    pos = np.arange(T)
    cos, sin = L.rope_angles(pos, d, c.rope_base(0), c.rope_scale(0))  # [T, d] local layer
    cos_g, sin_g = L.rope_angles(pos, d, c.rope_theta, c.rope_scaling_factor)  # global layer
    qr, kr = L.rope(qn, cos, sin), L.rope(kn, cos, sin)  # [H, T, d], [K, T, d]
    mask = L.causal_mask(pos, pos, c.window(0))  # [T, T]
    out, _ = L.attention(qr, kr, v, mask, c.attn_scale, c.attn_logit_softcap)  # [H, T, d]
    a = L.linear(out.transpose(1, 0, 2).reshape(T, H * d), W["layers.0.o"])  # [T, D]
    resid = x + L.rms_norm(a, W["layers.0.post_attn_norm"], c.rms_norm_eps)  # [T, D]
    m = L.rms_norm(resid, W["layers.0.mlp_norm"], c.rms_norm_eps)  # [T, D]
    return dict(E=E, ids=local, x=x, attn_norm=W["layers.0.attn_norm"], eps=c.rms_norm_eps,
                q=q, q_norm=W["layers.0.q_norm"], qn=qn, kn=kn, cos=cos, sin=sin, cos_g=cos_g,
                sin_g=sin_g, qr=qr, kr=kr, v=v, mask=mask, scale=c.attn_scale,
                cap=c.attn_logit_softcap, gate=L.linear(m, W["layers.0.gate"]),
                up=L.linear(m, W["layers.0.up"]))


@functools.lru_cache(maxsize=1)
def _demo_logits() -> np.ndarray:
    """The demo model's next-token logits after "My favourite animal is the" ``[V]``.

    The fast path (a short prompt runs through its matrix-vector kernels, over the compact
    weights), so this costs about a second once the kernels are compiled.
    """
    import tinygemma as tg

    model = tg.load_demo()
    ids = np.asarray(model.tokenizer.encode("My favourite animal is the"))
    return model.forward(ids, last_only=True)[0]  # [V]


def _rng(seed: int) -> np.random.Generator:
    return np.random.default_rng(seed)


def _normal(rng, *shape, scale=1.0) -> np.ndarray:
    return (scale * rng.standard_normal(shape)).astype(np.float32)


# ---- embedding ----------------------------------------------------------------------------------
def _to_bf16(x) -> np.ndarray:
    """Round float32 to the nearest bfloat16 (ties to even), returned as float32."""
    b = np.asarray(x, np.float32).view(np.uint32).astype(np.uint64)
    b = ((b + 0x7FFF + ((b >> 16) & 1)) >> 16) << 16
    return b.astype(np.uint32).view(np.float32)


def embed(fn) -> Result:
    """Check ``fn(E, ids)`` against :func:`tinygemma.layers.embed`: ``E[ids] * sqrt(D)``."""
    rng = _rng(2)
    cases = [("a random table of 50 tokens, D = 96", (_normal(rng, 50, 96, scale=0.1),
                                                      rng.integers(0, 50, 7))),
             ("a random table of 6 tokens, D = 3072", (_normal(rng, 6, 3072, scale=0.02),
                                                       np.array([5, 0, 5, 2])))]
    demo = _demo()
    cases.append((f"the demo model's rows for {PROMPT!r}", (demo["E"], demo["ids"])))
    rows = lambda E, ids: E[ids].astype(np.float32)  # noqa: E731
    variants = [
        ("no sqrt(D) scaling: Gemma multiplies the row by sqrt(D), D = E.shape[1] (the hidden "
         "size), so that the input starts at the scale RMSNorm produces.", rows),
        ("sqrt(D) rounded to bfloat16 (sqrt(3072) = 55.43 becomes 55.5): compute the factor in "
         "float32, np.float32(np.sqrt(D)), as transformers does in float32.",
         lambda E, ids: rows(E, ids) * _to_bf16(np.float32(np.sqrt(E.shape[1])))),
        ("you divide by sqrt(D); Gemma multiplies by it.",
         lambda E, ids: rows(E, ids) / np.float32(np.sqrt(E.shape[1]))),
        ("you multiply by D; the factor is its square root, sqrt(D).",
         lambda E, ids: rows(E, ids) * np.float32(E.shape[1])),
        ("you use sqrt(E.shape[0]), the vocabulary size V; D is E.shape[1], the hidden size.",
         lambda E, ids: rows(E, ids) * np.float32(np.sqrt(E.shape[0]))),
    ]
    return _run("embed", fn, cases, L.embed, variants)


# ---- RMSNorm ------------------------------------------------------------------------------------
def rms_norm(fn) -> Result:
    """Check ``fn(x, w, eps)`` against :func:`tinygemma.layers.rms_norm`."""
    rng = _rng(3)
    eps = 1e-6
    cases = [("random x [5, 64] with a non-zero mean", (_normal(rng, 5, 64, scale=3) + 1,
                                                         _normal(rng, 64, scale=0.5), eps)),
             ("random heads x [2, 3, 16] (QK-norm's shape)", (_normal(rng, 2, 3, 16, scale=2),
                                                               _normal(rng, 16, scale=0.5), eps)),
             ("a tiny random x [4, 32] (RMS near sqrt(eps))", (_normal(rng, 4, 32, scale=1e-3),
                                                               _normal(rng, 32, scale=0.5), eps))]
    demo = _demo()
    cases += [(f"the demo model's embedded {PROMPT!r} with layer 0's attn_norm",
               (demo["x"], demo["attn_norm"], demo["eps"])),
              ("the demo model's layer-0 query heads with their q_norm (QK-norm)",
               (demo["q"], demo["q_norm"], demo["eps"]))]

    def norm(x, w, eps, centre=False, axis=-1, power=0.5, eps_inside=True, mean=True, one=1.0):
        x = x.astype(np.float64)
        if centre:
            x = x - x.mean(axis=-1, keepdims=True)
        ms = (np.mean if mean else np.sum)(x * x, axis=axis, keepdims=axis is not None)
        den = (ms + eps) ** power if eps_inside else ms ** power + eps
        return x / den * (one + w)

    variants = [
        ("you scale by w; Gemma scales by (1 + w): the stored weight is an offset from 1, so "
         "w = 0 is the identity.", lambda x, w, eps: norm(x, w, eps, one=0.0)),
        ("the 1 is added twice, a scale of (2 + w) (a GGUF file already stores 1 + w).",
         lambda x, w, eps: norm(x, w, eps, one=2.0)),
        ("you subtract the mean: that is LayerNorm. RMSNorm divides by the root mean square "
         "without centring.", lambda x, w, eps: norm(x, w, eps, centre=True)),
        ("you divide by the mean square; RMSNorm divides by its square root.",
         lambda x, w, eps: norm(x, w, eps, power=1.0)),
        ("eps belongs inside the square root: x / sqrt(mean(x^2) + eps).",
         lambda x, w, eps: norm(x, w, eps, eps_inside=False)),
        ("eps is missing: x / sqrt(mean(x^2) + eps) keeps a tiny vector from being blown up.",
         lambda x, w, eps: norm(x, w, 0.0)),
        ("you use the sum of squares; RMSNorm uses their mean (the sum divided by N).",
         lambda x, w, eps: norm(x, w, eps, mean=False)),
        ("you average over the first axis (the tokens); RMSNorm normalises each vector over "
         "its last axis: axis=-1, keepdims=True.", lambda x, w, eps: norm(x, w, eps, axis=0)),
        ("you take one RMS over the whole array; each vector (the last axis) gets its own: "
         "axis=-1, keepdims=True.", lambda x, w, eps: norm(x, w, eps, axis=None)),
    ]
    return _run("rms_norm", fn, cases, L.rms_norm, variants)


# ---- RoPE ---------------------------------------------------------------------------------------
def rope(fn) -> Result:
    """Check ``fn(x, cos, sin)`` against :func:`tinygemma.layers.rope` (split halves)."""
    rng = _rng(4)
    c8, s8 = L.rope_angles(np.arange(2, 7), 8)
    pos = np.array([0, 1, 7, 100, 5000])
    c64, s64 = L.rope_angles(pos, 64)
    cases = [("random heads x [3, 5, 8] at positions 2..6", (_normal(rng, 3, 5, 8), c8, s8)),
             ("random x [5, 64] at positions 0, 1, 7, 100, 5000", (_normal(rng, 5, 64), c64, s64))]
    demo = _demo()
    cases += [("the demo model's layer-0 queries (base 10 000)", (demo["qn"], demo["cos"], demo["sin"])),
              ("the demo model's layer-0 keys, global base 1 000 000",
               (demo["kn"], demo["cos_g"], demo["sin_g"]))]

    def halves(x):
        h = x.shape[-1] // 2
        return x[..., :h], x[..., h:]

    def interleaved_pairs(x, cos, sin):  # pairs (2i, 2i+1), one angle per pair
        h = x.shape[-1] // 2
        c, s = cos[..., :h], sin[..., :h]
        even, odd = x[..., 0::2], x[..., 1::2]
        out = np.empty(x.shape, np.float64)
        out[..., 0::2], out[..., 1::2] = even * c - odd * s, even * s + odd * c
        return out

    def interleaved_rotate(x, cos, sin):  # LLaMA-1 style rotate_every_two with the full cos/sin
        r = np.empty(x.shape, np.float64)
        r[..., 0::2], r[..., 1::2] = -x[..., 1::2], x[..., 0::2]
        return x * cos + r * sin

    pairs_hint = ("you rotate neighbouring pairs (2i, 2i+1), the interleaved layout of RoFormer "
                  "and LLaMA 1. Gemma rotates halves: dimension i pairs with i + d/2, "
                  "rotate_half(x) = (-x[d/2:], x[:d/2]).")
    variants = [
        (pairs_hint, interleaved_pairs),
        (pairs_hint, interleaved_rotate),
        ("you rotate the wrong way (by -m theta): rotate_half(x) is (-x[d/2:], x[:d/2]), "
         "with the minus on the second half.",
         lambda x, cos, sin: x * cos + np.concatenate([halves(x)[1], -halves(x)[0]], -1) * sin),
        ("rotate_half negates the second half: (-x[d/2:], x[:d/2]); yours has no minus sign.",
         lambda x, cos, sin: x * cos + np.concatenate([halves(x)[1], halves(x)[0]], -1) * sin),
        ("sin multiplies rotate_half(x), not x itself: x * cos + rotate_half(x) * sin.",
         lambda x, cos, sin: x * cos + x * sin),
        ("cos and sin are swapped: x * cos + rotate_half(x) * sin.",
         lambda x, cos, sin: x * sin + np.concatenate([-halves(x)[1], halves(x)[0]], -1) * cos),
    ]
    return _run("rope", fn, cases, L.rope, variants)


# ---- attention ----------------------------------------------------------------------------------
def _attend(q, k, v, mask, scale, cap, *, by_group=True, masked=True, cap_late=False,
            mask_late=False, axis=-1):
    """Attention with one switch per classic mistake (all off: the right answer)."""
    H, K = q.shape[0], k.shape[0]
    kv = np.arange(H) // (H // K) if by_group else np.arange(H) % K  # [H] the KV head each reads
    kk, vv = k[kv].astype(np.float64), v[kv].astype(np.float64)  # [H, S, d]
    s = q.astype(np.float64) @ kk.transpose(0, 2, 1) * scale  # [H, T, S]
    if cap is not None and not cap_late:
        s = cap * np.tanh(s / cap)
    if masked and not mask_late:
        s = np.where(mask, s, -np.inf)
    if cap is not None and cap_late:
        s = cap * np.tanh(s / cap)
    e = np.exp(s - np.max(s, axis=axis, keepdims=True))
    p = e / np.sum(e, axis=axis, keepdims=True)  # [H, T, S]
    if mask_late:
        p = p * mask
    return p @ vv, p


def attention(fn) -> Result:
    """Check ``fn(q, k, v, mask, scale, cap)`` against :func:`tinygemma.layers.attention`.

    It must return ``(out [H, T, d], probs [H, T, S])``, for MHA, MQA and GQA alike.
    """
    rng = _rng(5)
    causal = L.causal_mask
    cases = [
        ("random GQA: 4 query heads, 2 KV heads, 5 tokens, scale 0.3",
         (_normal(rng, 4, 5, 8), _normal(rng, 2, 5, 8), _normal(rng, 2, 5, 8),
          causal(np.arange(5), np.arange(5)), 0.3, None)),
        ("random MHA, 3 new tokens after 4 cached ones, soft-cap 5",
         (_normal(rng, 2, 3, 16, scale=2), _normal(rng, 2, 7, 16, scale=2),
          _normal(rng, 2, 7, 16), causal(np.arange(4, 7), np.arange(7)), 16 ** -0.5, 5.0)),
        ("random GQA 6 heads / 3 KV heads, sliding window of 3",
         (_normal(rng, 6, 6, 4), _normal(rng, 3, 6, 4), _normal(rng, 3, 6, 4),
          causal(np.arange(6), np.arange(6), window=3), 0.5, None)),
    ]
    demo = _demo()
    cases.append(("the demo model's layer 0 (MQA: 4 query heads, 1 KV head)",
                  (demo["qr"], demo["kr"], demo["v"], demo["mask"], demo["scale"], demo["cap"])))
    variants = [
        ("no causal mask: every query also sees the keys after it. Set the scores where the "
         "mask is False to -inf before the softmax.",
         lambda *a: _attend(*a, masked=False)),
        ("you mask after the softmax: the probabilities that are left no longer sum to 1. "
         "Put -inf in the masked scores before the softmax.",
         lambda *a: _attend(*a, mask_late=True)),
        ("a KV head is not shared across its query group: with G = H / K query heads per KV "
         "head, query head h reads KV head h // G (heads 0..G-1 share KV head 0). Yours pairs "
         "them as h % K: np.repeat(k, G, 0) copies each KV head for its group, np.tile does not.",
         lambda *a: _attend(*a, by_group=False)),
        ("the scores are not scaled: multiply q k^T by `scale`.",
         lambda q, k, v, mask, scale, cap: _attend(q, k, v, mask, 1.0, cap)),
        ("you divide by `scale`; it is the factor to multiply by (head_dim ** -0.5).",
         lambda q, k, v, mask, scale, cap: _attend(q, k, v, mask, 1 / scale, cap)),
        ("you compute 1 / sqrt(d) yourself; use the `scale` argument (Gemma 2 and 3 take it "
         "from query_pre_attn_scalar, which need not be head_dim).",
         lambda q, k, v, mask, scale, cap: _attend(q, k, v, mask, q.shape[-1] ** -0.5, cap)),
        ("`cap` is ignored: when it is given (Gemma 2), soft-cap the scores, "
         "cap * tanh(scores / cap), before masking.",
         lambda q, k, v, mask, scale, cap: _attend(q, k, v, mask, scale, None)),
        ("you soft-cap after masking: cap * tanh(-inf / cap) = -cap, so masked keys get "
         "probability again. Soft-cap first, then mask.",
         lambda *a: _attend(*a, cap_late=True)),
        ("your softmax runs over the queries (axis -2); each query's scores over the keys "
         "(the last axis) must sum to 1.",
         lambda *a: _attend(*a, axis=-2)),
    ]
    return _run("attention", fn, cases, L.attention, variants, names=("out", "probs"))


# ---- GeGLU --------------------------------------------------------------------------------------
_erf = np.vectorize(math.erf, otypes=[np.float64])


def _gelu_exact(x):
    x = np.asarray(x, np.float64)
    return 0.5 * x * (1.0 + _erf(x / math.sqrt(2.0)))


def geglu(fn) -> Result:
    """Check ``fn(gate, up)`` against :func:`tinygemma.layers.geglu` (tanh GELU)."""
    rng = _rng(6)
    cases = [("random gate and up [4, 32]", (_normal(rng, 4, 32, scale=2), _normal(rng, 4, 32))),
             ("random gate and up [3, 7, 5]", (_normal(rng, 3, 7, 5, scale=3),
                                               _normal(rng, 3, 7, 5)))]
    demo = _demo()
    cases.append(("the demo model's layer-0 MLP", (demo["gate"], demo["up"])))
    sig = lambda x: 1 / (1 + np.exp(-np.asarray(x, np.float64)))  # noqa: E731
    tanh_gelu = lambda x: L.gelu_tanh(np.asarray(x, np.float64))  # noqa: E731
    variants = [
        ("you use the exact GELU, x Phi(x) with erf. Gemma always uses the tanh approximation: "
         "0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))).",
         lambda g, u: _gelu_exact(g) * u),
        ("you use the sigmoid approximation x sigmoid(1.702 x); Gemma's GELU is the tanh one.",
         lambda g, u: g * sig(1.702 * g) * u),
        ("you use SiLU, x sigmoid(x) (that makes SwiGLU, LLaMA's MLP); Gemma's gate is GELU "
         "(tanh approximation).", lambda g, u: g * sig(g) * u),
        ("you use ReLU; Gemma's gate is GELU (tanh approximation).",
         lambda g, u: np.maximum(g, 0) * u),
        ("the GELU is missing: GeGLU is gelu_tanh(gate) * up.", lambda g, u: g * u),
        ("the GELU goes on the gate, not on up: gelu_tanh(gate) * up.",
         lambda g, u: tanh_gelu(u) * g),
        ("you apply the GELU to the product; it applies to the gate alone: gelu_tanh(gate) * up.",
         lambda g, u: tanh_gelu(np.asarray(g, np.float64) * u)),
        ("your GELU is twice too large: it starts with 0.5 x.",
         lambda g, u: 2 * tanh_gelu(g) * u),
    ]
    return _run("geglu", fn, cases, L.geglu, variants)


# ---- sampling -----------------------------------------------------------------------------------
def _cut(z, top_k, top_p, *, renorm=True, p_rule="before", order="k_then_p", k_shift=0):
    """softmax(z) cut to top-k and top-p, with one switch per classic mistake."""
    z = np.asarray(z, np.float64)

    def top_k_cut(z):
        k = None if top_k is None else top_k + k_shift
        if k is None or k >= len(z):
            return z
        kth = np.sort(z)[-k]
        return np.where(z >= kth, z, -np.inf)

    def top_p_cut(p):
        if top_p is None or top_p >= 1:
            return p
        srt = np.argsort(-p, kind="stable")
        cum = np.cumsum(p[srt])
        keep = {"before": cum - p[srt] < top_p,  # the right rule
                "short": cum < top_p,  # stops before the token that crosses top_p
                "extra": np.concatenate([[True], cum[:-1] - p[srt][:-1] < top_p])}[p_rule]
        q = np.zeros_like(p)
        q[srt[keep]] = p[srt[keep]]
        return q / q.sum() if renorm else q

    if order == "k_then_p":
        p = L.softmax(top_k_cut(z))
        return top_p_cut(p)
    p = top_p_cut(L.softmax(z))  # top-p on the whole distribution, then top-k
    keep = np.log(np.where(p > 0, p, 1e-300))
    return L.softmax(top_k_cut(np.where(p > 0, keep, -np.inf)))


def _temperature_late(logits, temperature, top_k, top_p):
    """The cut chosen on softmax(logits) at temperature 1; the temperature applied after."""
    kept = _cut(logits, top_k, top_p) > 0
    return L.softmax(np.where(kept, np.asarray(logits, np.float64) / temperature, -np.inf))


def sampling(fn) -> Result:
    """Check ``fn(logits, temperature, top_k, top_p)`` against
    :func:`tinygemma.generate.next_token_probs`."""
    rng = _rng(8)
    z = (3 * rng.standard_normal(50)).astype(np.float32)  # distinct logits: no ties at the cuts
    z2 = (2 * rng.standard_normal(200)).astype(np.float32)
    cases = [("random logits [50], temperature 0.7", (z, 0.7, None, None)),
             ("random logits [50], temperature 1.3, top-k 10", (z, 1.3, 10, None)),
             ("random logits [50], temperature 0.5, top-p 0.8", (z, 0.5, None, 0.8)),
             ("random logits [200], temperature 2, top-k 20, top-p 0.6", (z2, 2.0, 20, 0.6)),
             ("random logits [50], temperature 1, top-k 100 (more than the vocabulary)",
              (z, 1.0, 100, None))]
    real = _demo_logits()
    cases += [("the demo model's logits after 'My favourite animal is the', temperature 0.8, "
               "top-p 0.95", (real, 0.8, None, 0.95)),
              ("the demo model's logits, temperature 1.5, top-k 40, top-p 0.9", (real, 1.5, 40, 0.9))]
    variants = [
        ("the temperature has no effect: it divides the logits before the softmax, "
         "softmax(logits / temperature) (dividing the probabilities by it does nothing once "
         "they are renormalised).", lambda z, t, k, p: _cut(z, k, p)),
        ("you multiply the logits by the temperature; divide them: softmax(logits / temperature).",
         lambda z, t, k, p: _cut(np.asarray(z, np.float64) * t, k, p)),
        ("the temperature is applied after the top-k / top-p cut: the nucleus must be chosen on "
         "the distribution the temperature has already reshaped. Divide the logits first.",
         _temperature_late),
        ("your nucleus stops one token short: keep a token while the tokens ranked above it "
         "hold less than top_p, so the token that crosses top_p is kept.",
         lambda z, t, k, p: _cut(np.asarray(z, np.float64) / t, k, p, p_rule="short")),
        ("your nucleus keeps one token too many: the smallest set whose probability reaches "
         "top_p ends with the token that crosses it.",
         lambda z, t, k, p: _cut(np.asarray(z, np.float64) / t, k, p, p_rule="extra")),
        ("the kept probabilities do not sum to 1: after the top-p cut, divide them by their sum.",
         lambda z, t, k, p: _cut(np.asarray(z, np.float64) / t, k, p, renorm=False)),
        ("you cut top-p before top-k; the order is temperature, top-k, then the nucleus of what "
         "top-k kept (renormalised), as in transformers.",
         lambda z, t, k, p: _cut(np.asarray(z, np.float64) / t, k, p, order="p_then_k")),
        ("you keep top_k + 1 tokens: the k most likely, ties aside, are np.sort(z)[-k] and above.",
         lambda z, t, k, p: _cut(np.asarray(z, np.float64) / t, k, p, k_shift=1)),
        ("you keep top_k - 1 tokens: the k most likely, ties aside, are np.sort(z)[-k] and above.",
         lambda z, t, k, p: _cut(np.asarray(z, np.float64) / t, k, p, k_shift=-1)),
        ("top_p is ignored.", lambda z, t, k, p: _cut(np.asarray(z, np.float64) / t, k, None)),
        ("top_k is ignored.", lambda z, t, k, p: _cut(np.asarray(z, np.float64) / t, None, p)),
    ]
    return _run("sampling", fn, cases, next_token_probs, variants, names=("probs",))


# ---- solutions, on request ----------------------------------------------------------------------
def solution(what: str, name: str | None = None) -> None:
    """Print a solution, for a student who asks.

    ``solution("rms_norm")``: the solution of a "your turn" cell (embed, rms_norm, rope,
    attention, geglu, sampling). ``solution("02", "safe_sizes")``: one function of a chapter's
    solution file; ``solution("02")``: the whole file.
    """
    if what in COMPONENTS:
        what, name = COMPONENTS[what][0], COMPONENTS[what][1]
    try:
        path = solutions.file_of(what)
    except FileNotFoundError as e:
        print(e)
        return
    source = path.read_text(encoding="utf-8")
    if name is None:
        print(f"# {path.name}\n{source}")
        return
    found = solutions.definitions(source)
    if name not in found:
        print(f"{path.name} has no function {name!r}; it has: {', '.join(found)}")
        return
    print(f"# from {path.name}\n{found[name]}")
