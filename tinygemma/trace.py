"""Stepping through a forward pass: its named points, the stepper, hooks, and layer diffs.

A forward pass (``model.py``) hands each intermediate to ``at(name, value)`` and goes on with
what it gets back. Who listens decides what happens there: nothing (``forward``), a record
(``trace``), hooks that may replace the value (``forward(ids, hooks=...)``), or a pause
(``steps``). It is one pass, the same readable code, whoever listens. The points, in order of
computation (:func:`step_names`)::

    embed                          [T, D]     scaled token embeddings
    layers.{i}.attn_norm           [T, D]     pre-attention RMSNorm output
    layers.{i}.q / k / v           [H|K, T, d] after QK-norm and RoPE (v: no RoPE)
    layers.{i}.attn_probs          [H, T, S]  softmax(q k^T * scale + mask) over the S keys seen
    layers.{i}.attn_heads          [H, T, d]  each head's output, probs v, before the o projection
    layers.{i}.attn_out            [T, D]     attention output after the o projection
    layers.{i}.post_attn_norm      [T, D]     Gemma 2/3 sandwich norm of attn_out
    layers.{i}.resid_attn          [T, D]     residual stream after the attention sub-layer
    layers.{i}.mlp_norm            [T, D]     pre-MLP RMSNorm output
    layers.{i}.gate / up           [T, F]     the two GeGLU projections (gate before GELU)
    layers.{i}.mlp_out             [T, D]     MLP output after the down projection
    layers.{i}.post_mlp_norm       [T, D]     Gemma 2/3 sandwich norm of mlp_out
    layers.{i}.resid_mlp           [T, D]     residual stream after the block (the layer output)
    final_norm                     [T, D]
    logits                         [T, V]

Replacing a value (a hook's result, ``Stepper.replace``) changes everything computed from it:
an edited ``attn_probs`` is what the heads then average the values with.
"""

from __future__ import annotations

import contextvars
import difflib
import queue
import threading
import weakref

import numpy as np

# How far our float32 forward may sit from transformers' float32 forward, as a fraction of the
# largest reference value: max|ours - theirs| <= PARITY_RTOL * max|theirs|. Measured on the real
# Gemma 3 270M (the five prompts of tests/fixtures/demo_ref.npz, 6 to 2056 tokens): at most
# 4e-6 of the scale, the rounding of two summation orders, so 1e-4 leaves 25x of headroom. The
# subtlest real mistakes land above it on the same model: the erf GELU where Gemma uses the
# tanh approximation gives 4.6e-4, sqrt(D) rounded to bfloat16 6.1e-4; 1e-3 would pass both.
PARITY_RTOL = 1e-4

SUBLAYER_NAMES = ("attn_norm", "q", "k", "v", "attn_probs", "attn_heads", "attn_out",
                  "post_attn_norm", "resid_attn", "mlp_norm", "gate", "up", "mlp_out",
                  "post_mlp_norm", "resid_mlp")
SANDWICH_NAMES = ("post_attn_norm", "post_mlp_norm")  # Gemma 2 and 3 only


def step_names(config) -> list[str]:
    """Every named point of a forward pass of ``config``'s model, in order: the keys of
    ``model.trace(ids)``, the steps of ``model.steps(ids)``, the places a hook can go."""
    layer = [n for n in SUBLAYER_NAMES if config.sandwich_norms or n not in SANDWICH_NAMES]
    return (["embed"] + [f"layers.{i}.{n}" for i in range(config.num_layers) for n in layer]
            + ["final_norm", "logits"])


def unknown_name(name, names: list[str]) -> ValueError:
    """The error for a name that is not a point of the pass, naming the closest valid ones."""
    close = difflib.get_close_matches(str(name), names, n=3, cutoff=0.5)
    hint = (f"the closest: {', '.join(close)}" if close else
            f"the names run from {names[0]!r} to {names[-1]!r} (trace.step_names)")
    return ValueError(f"{name!r} is not a named point of the forward pass; {hint}")


def replacement(name: str, old: np.ndarray, new, who: str) -> np.ndarray:
    """``new`` as the value at ``name``: the shape the pass has there, in its dtype; always a
    new array, so that the pass sees it was replaced even when ``new`` is ``old`` edited in
    place (see ``attn_probs`` in ``model.py``)."""
    new = np.array(new, dtype=old.dtype)
    if new.shape != old.shape:
        raise ValueError(f"{who} gave {name!r} shape {list(new.shape)}; the pass has "
                         f"{list(old.shape)} there")
    return new


# ---- who listens at the named points ---------------------------------------------------------
class Listener:
    """A forward pass calls ``at(name, value)`` at each named point and goes on with the
    result; ``wants(name)`` tells it whether a value that costs extra to compute (the attention
    probabilities, which the fast path does not form) is wanted. This one does nothing."""

    def __call__(self, name: str, value):
        return value

    def wants(self, name: str) -> bool:
        return False


NOBODY = Listener()  # a plain forward pass


class Tape(Listener):
    """Records every intermediate by name (``model.trace``)."""

    def __init__(self):
        self.values: dict[str, np.ndarray] = {}

    def __call__(self, name, value):
        self.values[name] = value
        return value

    def wants(self, name):
        return True


class Hooks(Listener):
    """``{name: fn}``; at ``name`` the pass goes on with ``fn(value, name)``, or with the value
    unchanged when ``fn`` returns None. Names are checked before the pass starts."""

    def __init__(self, hooks: dict, names: list[str]):
        known = set(names)
        self.hooks: dict[str, list] = {}
        for name, fn in dict(hooks).items():
            if name not in known:
                raise unknown_name(name, names)
            if not callable(fn):
                raise ValueError(f"the hook for {name!r} is not callable: {fn!r}")
            self.hooks.setdefault(name, []).append(fn)

    def add(self, other: Hooks) -> Hooks:
        """Both sets of hooks; where both hook a name, ``self``'s run first."""
        both = Hooks({}, [])
        for hooks in (self.hooks, other.hooks):
            for name, fns in hooks.items():
                both.hooks.setdefault(name, []).extend(fns)
        return both

    def __call__(self, name, value):
        for fn in self.hooks.get(name, ()):
            new = fn(value, name)
            if new is not None:
                value = replacement(name, value, new, f"the hook on {name!r}")
        return value

    def wants(self, name):
        return name in self.hooks


class Chain(Listener):
    """Two listeners, one after the other: ``second`` sees what ``first`` gives on."""

    def __init__(self, first: Listener, second: Listener):
        self.first, self.second = first, second

    def __call__(self, name, value):
        return self.second(name, self.first(name, value))

    def wants(self, name):
        return self.first.wants(name) or self.second.wants(name)


class _Stop(BaseException):
    """Ends an abandoned pass in its thread (a BaseException, so hooks' ``except Exception``
    does not swallow it)."""


class Stepper:
    """A forward pass that pauses at each named point (``model.steps(ids)``).

    ``next(s)`` runs on to the next point and returns ``(name, value)``; ``s.run_to(name)``
    runs on to ``name`` and returns its value; ``s.replace(value)`` edits the value where the
    pass is paused (the rest of the pass uses it); ``s.logits``, once the pass has reached its
    end, is what ``forward`` returns. ``s.name`` is where it is paused, ``s.names`` every point.

    The pass runs in a thread of its own that waits at each point for the next step, so the
    code that runs is exactly the model's forward pass. A stepper dropped half way ends its
    thread (``close()`` does so at once).
    """

    def __init__(self, run, names: list[str]):
        self.names = list(names)
        self.name: str | None = None  # paused at (None: not started)
        self._value = None
        self._logits = None
        self._done = False
        self._to_pass: queue.Queue = queue.Queue()
        self._from_pass: queue.Queue = queue.Queue()
        self._thread = threading.Thread(target=_run_paused, daemon=True, name="tinygemma-steps",
                                        args=(run, self._to_pass, self._from_pass))
        weakref.finalize(self, self._to_pass.put, _STOP)

    def __iter__(self):
        return self

    def __next__(self) -> tuple[str, np.ndarray]:
        if self._done:
            raise StopIteration
        if self._thread.ident is None:
            self._thread.start()  # the pass runs to its first point
        else:
            self._to_pass.put(self._value)  # and on from the point it waits at
        kind, *got = self._from_pass.get()
        if kind == "error":
            self._done = True
            raise got[0]
        if kind == "done":
            self._done, self._logits, self._value = True, got[0], None
            raise StopIteration
        self.name, self._value = got
        return self.name, self._value

    def run_to(self, name: str) -> np.ndarray:
        """Run on to the point ``name`` and pause there; its value."""
        if name not in self.names:
            raise unknown_name(name, self.names)
        passed = self.names.index(self.name) if self.name is not None else -1
        if self.names.index(name) < passed or (self._done and name == self.name):
            raise ValueError(f"{name!r} has already been passed (the pass is at "
                             f"{self.name!r}); start again with model.steps(ids)")
        while self.name != name:
            next(self)
        return self._value

    def replace(self, value) -> None:
        """Edit the value where the pass is paused: same shape; what follows uses it."""
        if self.name is None or self._done:
            raise ValueError("the pass is not paused at a named point: step first (next(s)) "
                             if self.name is None else "the pass has ended: nothing to replace")
        self._value = replacement(self.name, self._value, value, "replace()")

    @property
    def value(self) -> np.ndarray:
        """The value where the pass is paused."""
        return self._value

    @property
    def logits(self) -> np.ndarray:
        """What ``forward`` returns, ``[T, V]``; at the last point the pass is run to its end."""
        if not self._done and self.name == self.names[-1]:
            next(self, None)
        if not self._done or self._logits is None:
            raise ValueError(f"the pass has not reached its end (paused at {self.name!r}): step "
                             f"on, e.g. s.run_to('logits'), then read s.logits")
        return self._logits

    def close(self) -> None:
        """End the pass here (its thread stops; a KV cache keeps what it was given so far)."""
        if not self._done and self._thread.ident is not None:
            self._to_pass.put(_STOP)
            self._thread.join()
        self._done = True


_STOP = object()


def _run_paused(run, to_pass: queue.Queue, from_pass: queue.Queue) -> None:
    """A stepper's thread: the pass, handing each point's value out and waiting for the one to
    go on with. It holds only the queues, so a dropped stepper can be collected (and stop it)."""

    class Pause(Listener):
        def __call__(self, name, value):
            from_pass.put(("point", name, value))
            value = to_pass.get()
            if value is _STOP:
                raise _Stop
            return value

        def wants(self, name):
            return True

    try:
        from_pass.put(("done", run(Pause())))
    except _Stop:
        pass
    except BaseException as e:  # noqa: BLE001 - handed to the stepping thread, raised there
        from_pass.put(("error", e))


# ---- hooks for every pass inside a block -----------------------------------------------------
_AMBIENT: contextvars.ContextVar[tuple] = contextvars.ContextVar("tinygemma_hooks", default=())


def ambient_hooks(model) -> Hooks | None:
    """The hooks ``with model.hooks(...)`` blocks put on ``model`` in this thread."""
    found = [h for m, h in _AMBIENT.get() if m is model]
    if not found:
        return None
    hooks = found[0]
    for more in found[1:]:
        hooks = hooks.add(more)
    return hooks


def push_hooks(model, hooks: Hooks):
    """Put ``hooks`` on every pass of ``model`` in this thread; returns the token to undo it."""
    return _AMBIENT.set(_AMBIENT.get() + ((model, hooks),))


def pop_hooks(token) -> None:
    _AMBIENT.reset(token)


def hidden_state_names(num_layers: int) -> list[str]:
    """Our names for transformers' ``hidden_states``: the embeddings, the output of every layer
    but the last, then the last layer's output after the final norm (``L + 1`` entries)."""
    return ["embed"] + [f"layers.{i}.resid_mlp" for i in range(num_layers - 1)] + ["final_norm"]


def layer_diffs(tape: dict[str, np.ndarray], reference: np.ndarray,
                num_layers: int) -> list[tuple[str, float, float]]:
    """``(name, max|ours - reference|, max|reference|)`` along the residual stream.

    ``reference`` is ``[L + 1, T, D]``, transformers' ``output_hidden_states``.
    """
    names = hidden_state_names(num_layers)
    return [(n, float(np.max(np.abs(tape[n] - ref))), float(np.max(np.abs(ref))))
            for n, ref in zip(names, reference)]


def first_drift(tape: dict[str, np.ndarray], reference: np.ndarray, num_layers: int,
                rtol: float = PARITY_RTOL) -> str:
    """A report naming the first intermediate whose error exceeds ``rtol`` of its scale."""
    rows = layer_diffs(tape, reference, num_layers)
    lines = [f"  {n:24s} max|Δ| {d:.3g}  (scale {s:.3g})" for n, d, s in rows]
    bad = next((n for n, d, s in rows if d > rtol * max(s, 1e-30)), None)
    head = f"first drifting intermediate: {bad}" if bad else "no intermediate drifts"
    return "\n".join([head, *lines])
