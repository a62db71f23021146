"""The Gemma forward pass, composed from ``layers.py``; readable top to bottom.

Gemma 1 block (the released code normalises each sub-layer's input, plus a final norm)::

    h = x + attn(rms_norm(x))
    x = h + mlp(rms_norm(h))

Gemma 2 and 3 add the "sandwich" norms on each sub-layer's output::

    h = x + rms_norm(attn(rms_norm(x)))
    x = h + rms_norm(mlp(rms_norm(h)))

Every projection goes through :meth:`Gemma.linear` (those of one input, q/k/v and gate/up,
through :meth:`Gemma.projections`), the cached attention through :meth:`Gemma.attend`, every
RMSNorm through :meth:`Gemma.norm`, RoPE through :meth:`Gemma.rope` and the MLP's gate through
:meth:`Gemma.geglu`: the fast path (``kernels/``) overrides those six, and in a prefill whose
gate and up nobody looks at, multiplies them and applies the GeGLU in one kernel (less memory).
Shape legend as in ``layers.py``.
"""

from __future__ import annotations

import threading
from contextlib import contextmanager

import numpy as np

from . import layers as L
from .checkpoints.weights import Weights
from .config import GemmaConfig
from .evaluate import token_nll
from .kv_cache import KVCache, check_fits, check_kv_dtype, resolve
from .trace import (NOBODY, Chain, Hooks, Stepper, Tape, ambient_hooks, pop_hooks, push_hooks,
                    step_names)


class Gemma:
    """A Gemma 1, 2 or 3 language model over float32 activations."""

    def __init__(self, config: GemmaConfig, weights: Weights, tokenizer=None,
                 kv_dtype: str = "float32"):
        self.config = config
        self.kv_dtype = check_kv_dtype(kv_dtype)  # of new caches (kv_cache.KV_DTYPES, "auto")
        self.weights = weights
        self._tokenizer = tokenizer  # a Tokenizer, or a function that loads one when first used
        self._loading = threading.Lock()  # threads sharing the model build the tokenizer once
        self.names = step_names(config)  # the named points of a pass, in order

    @property
    def tokenizer(self):
        if callable(self._tokenizer) and not hasattr(self._tokenizer, "encode"):
            with self._loading:
                if callable(self._tokenizer) and not hasattr(self._tokenizer, "encode"):
                    self._tokenizer = self._tokenizer()
        if self._tokenizer is None:
            raise ValueError("this model has no tokenizer: pass token ids to forward()")
        return self._tokenizer

    # ---- public API ------------------------------------------------------------------------
    def forward(self, ids, last_only: bool = False, cache: KVCache | None = None,
                hooks: dict | None = None) -> np.ndarray:
        """Logits ``[T, V]`` (``[1, V]`` with ``last_only``) of the tokens ``ids``.

        With a ``cache`` the tokens continue the positions already in it (KV-cache decoding);
        without one they form a whole sequence. ``hooks`` maps names of the pass
        (:func:`tinygemma.trace.step_names`) to ``fn(value, name)``, whose result (unless None)
        replaces the value there for the rest of the pass.
        """
        ids = self.check_ids(ids, cache)
        at = self._listener(hooks)
        cache = cache if cache is not None else self.new_cache(len(ids))
        return self._forward(ids, cache, last_only, at)

    def trace(self, ids) -> dict[str, np.ndarray]:
        """Every intermediate of a forward pass by a stable name (see :mod:`tinygemma.trace`)."""
        ids = self.check_ids(ids, None)
        tape = Tape()
        self._forward(ids, self.new_cache(len(ids)), False, self._listener(None, then=tape))
        return tape.values

    def steps(self, ids, cache: KVCache | None = None) -> Stepper:
        """A forward pass that pauses at each named point (:class:`tinygemma.trace.Stepper`).

        Nothing runs until the first ``next()``. Stepped to its end it gives exactly
        ``forward(ids)`` (and fills ``cache`` as ``forward`` would); a value replaced where it
        is paused is what the rest of the pass uses.
        """
        ids = self.check_ids(ids, cache)
        cache = cache if cache is not None else self.new_cache(len(ids))
        hooks = ambient_hooks(self)
        return Stepper(lambda pause: self._forward(ids, cache, False, self._listener(
            None, then=pause, ambient=hooks)), self.names)

    @contextmanager
    def hooks(self, hooks: dict):
        """Hooks on every forward pass of this model inside the block (``forward``, ``trace``,
        ``steps``, generation), in this thread only::

            with model.hooks({"layers.3.resid_mlp": fn}):
                text = tg.generate(model, prompt)
        """
        token = push_hooks(self, Hooks(hooks, self.names))
        try:
            yield self
        finally:
            pop_hooks(token)

    def loss(self, ids) -> float:
        """Mean next-token cross-entropy in nats: ``-log p(ids[t] | ids[:t])`` over t = 1 .. T-1.

        The convention of transformers' ``labels=ids``. Computed in float64 from the float32
        logits, 512 positions at a time through a KV cache (see :mod:`tinygemma.evaluate`).
        """
        ids = self.check_ids(ids, None)
        return float(np.concatenate(list(token_nll(self, ids))).mean())

    def new_cache(self, max_len: int, dtype: str | None = None) -> KVCache:
        """An empty cache for ``max_len`` positions, in ``dtype`` (default the model's
        ``kv_dtype``; "auto": float32 while it fits comfortably, else bfloat16). Refused
        (:class:`tinygemma.errors.NotEnoughMemory`) if with the weights it cannot fit in the
        memory available."""
        dtype = check_kv_dtype(self.kv_dtype if dtype is None else dtype)
        dtype = resolve(self.config, max_len, dtype, self.weights.nbytes)
        check_fits(self.config, max_len, dtype, self.weights.nbytes)
        return KVCache(self.config, max_len, dtype)

    def check_ids(self, ids, cache: KVCache | None) -> np.ndarray:
        """Token ids as a 1-D int64 array, checked against the vocabulary and the context."""
        ids = np.asarray(ids)
        if ids.ndim != 1 or ids.size == 0:
            raise ValueError(f"ids must be a non-empty 1-D sequence of token ids, got shape {ids.shape}")
        if not np.issubdtype(ids.dtype, np.integer):
            raise ValueError(f"ids must be integers, got dtype {ids.dtype}")
        bad = ids[(ids < 0) | (ids >= self.config.vocab_size)]
        if bad.size:
            raise ValueError(f"token id {int(bad[0])} is outside the vocabulary "
                             f"[0, {self.config.vocab_size})")
        end = len(ids) + (cache.pos if cache is not None else 0)
        if end > self.config.max_position_embeddings:
            raise ValueError(f"{end} positions exceed the context of "
                             f"{self.config.max_position_embeddings} tokens")
        if cache is not None and end > cache.max_len:
            raise ValueError(f"{end} positions exceed the KV cache of {cache.max_len}")
        return ids.astype(np.int64)

    def _listener(self, hooks, then=None, ambient=False):
        """Who listens at the named points: the hooks of ``with model.hooks(...)`` blocks (or
        ``ambient``, found in the calling thread already), then ``hooks``, then ``then``."""
        found = [ambient_hooks(self) if ambient is False else ambient]
        if hooks:
            found.append(Hooks(hooks, self.names))
        found.append(then)
        at = NOBODY
        for listener in filter(None, found):
            at = listener if at is NOBODY else Chain(at, listener)
        return at

    # ---- the forward pass ------------------------------------------------------------------
    # At each named point the pass hands its value to ``at`` and goes on with what it gets
    # back: nothing happens in a plain forward; trace records, hooks may replace, steps pause.
    def _forward(self, ids, cache, last_only, at):
        c, W = self.config, self.weights
        positions = np.arange(cache.pos, cache.pos + len(ids))  # [T]
        # RoPE angles once per forward for each (base, scale) in use: local and global layers
        bases = {(c.rope_base(i), c.rope_scale(i)) for i in range(c.num_layers)}
        angles = {b: L.rope_angles(positions, c.head_dim, *b) for b in bases}  # [T, d] cos, sin
        x = at("embed", L.embed(W.table("embed"), ids))  # [T, D]
        for i in range(c.num_layers):
            rope = angles[(c.rope_base(i), c.rope_scale(i))]
            x = self._block(i, x, positions, rope, cache, at)  # [T, D]
        cache.pos += len(ids)
        if last_only:
            x = x[-1:]  # [1, D]: the LM head only where logits are needed
        return at("logits", self.unembed(x, at))  # [T, V]

    def unembed(self, x: np.ndarray, at=NOBODY) -> np.ndarray:
        """Logits ``[T, V]`` of residual-stream vectors ``[T, D]``: final norm, LM head, soft-cap.

        The end of every forward pass; the logit lens (:mod:`tinygemma.lens`) applies it to
        any point of the stream.
        """
        c = self.config
        x = at("final_norm", self.norm(x, "final_norm"))  # [T, D]
        logits = self.linear(x, "embed" if c.tie_word_embeddings else "lm_head")  # [T, V]: x E^T
        if c.final_logit_softcap:
            logits = L.softcap(logits, c.final_logit_softcap)  # [T, V] (Gemma 2)
        return logits

    def _block(self, i, x, positions, rope, cache, at):
        c, p = self.config, f"layers.{i}."
        h = at(p + "attn_norm", self.norm(x, p + "attn_norm"))
        h = at(p + "attn_out", self._attention(i, h, positions, rope, cache, at))
        if c.sandwich_norms:
            h = at(p + "post_attn_norm", self.norm(h, p + "post_attn_norm"))
        x = at(p + "resid_attn", x + h)  # [T, D]
        h = at(p + "mlp_norm", self.norm(x, p + "mlp_norm"))
        h = at(p + "mlp_out", self._mlp(i, h, at))
        if c.sandwich_norms:
            h = at(p + "post_mlp_norm", self.norm(h, p + "post_mlp_norm"))
        return at(p + "resid_mlp", x + h)  # [T, D]

    def _attention(self, i, x, positions, rope, cache, at):
        c, p = self.config, f"layers.{i}."
        T, H, K, d = len(x), c.num_heads, c.num_kv_heads, c.head_dim
        q, k, v = self.projections(x, p + "q", p + "k", p + "v")  # [T, H*d], [T, K*d], [T, K*d]
        q = q.reshape(T, H, d).transpose(1, 0, 2)  # [H, T, d]
        k = k.reshape(T, K, d).transpose(1, 0, 2)  # [K, T, d]
        v = v.reshape(T, K, d).transpose(1, 0, 2)  # [K, T, d]
        if c.qk_norm:  # Gemma 3: RMSNorm over head_dim, before RoPE
            q = self.norm(q, p + "q_norm")  # [H, T, d]
            k = self.norm(k, p + "k_norm")  # [K, T, d]
        cos, sin = rope  # [T, d]: this layer's RoPE base (Gemma 3: local or global)
        q, k = self.rope(q, cos, sin), self.rope(k, cos, sin)  # [H, T, d], [K, T, d]
        q, k, v = at(p + "q", q), at(p + "k", k), at(p + "v", v)
        start, end = positions[0], positions[-1] + 1
        cache.write(i, start, k, v)  # [K, T, d] into [K, S, d], rounded to the cache's dtype
        out, probs = self.attend(q, cache, i, positions, at.wants(p + "attn_probs"))  # [H, T, d]
        edited = at(p + "attn_probs", probs)  # [H, T, S]
        if edited is not probs:  # the heads average the values with the edited pattern
            out = L.weigh_values(edited, cache.read(i, end - edited.shape[-1], end)[1])  # [H, T, d]
        out = at(p + "attn_heads", out)  # [H, T, d]
        return self.linear(out.transpose(1, 0, 2).reshape(T, H * d), p + "o")  # [T, H*d] -> [T, D]

    def _mlp(self, i, x, at):
        p = f"layers.{i}."
        gate, up = self.projections(x, p + "gate", p + "up")  # [T, D] -> [T, F], [T, F]
        gate, up = at(p + "gate", gate), at(p + "up", up)
        return self.linear(self.geglu(gate, up), p + "down")  # [T, F] -> [T, D]

    # ---- the six operations the fast path replaces -----------------------------------------
    def linear(self, x: np.ndarray, name: str) -> np.ndarray:
        """``x W^T`` with the weight decoded to float32."""
        return L.linear(x, self.weights[name])

    def projections(self, x: np.ndarray, *names: str) -> list[np.ndarray]:
        """``x W^T`` for each weight named: the projections of one input (q, k, v; gate, up)."""
        return [self.linear(x, name) for name in names]

    def norm(self, x: np.ndarray, name: str) -> np.ndarray:
        """RMSNorm over the last axis with the weight ``name``."""
        return L.rms_norm(x, self.weights[name], self.config.rms_norm_eps)

    def rope(self, x: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
        """Rotary position embedding of queries or keys ``[heads, T, d]``."""
        return L.rope(x, cos, sin)

    def geglu(self, gate: np.ndarray, up: np.ndarray) -> np.ndarray:
        """The MLP's gate, ``gelu_tanh(gate) * up``."""
        return L.geglu(gate, up)

    def attend(self, q, cache: KVCache, i: int, positions, want_probs: bool):
        """Attention of the new queries over the cache (the last W keys on local layers)."""
        c = self.config
        window = c.window(i)
        first = int(L.first_key(positions[0], window))  # the oldest key any new query sees
        keys = np.arange(first, positions[-1] + 1)  # [S]
        mask = L.causal_mask(positions, keys, window)  # [T, S]
        k, v = cache.read(i, first, keys[-1] + 1)  # [K, S, d] in float32
        return L.attention(q, k, v, mask, c.attn_scale, c.attn_logit_softcap)
