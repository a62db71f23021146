"""Looking inside a forward pass: the logit lens, residual-stream norms, ablating heads.

Small helpers on top of ``model.trace(ids)`` (see :mod:`tinygemma.trace` for the names) that the
notebooks use to step through the layers of a real model::

    tape = model.trace(ids)
    lens = logit_lens(model, tape)               # what each layer "would say" next
    lens.top_pieces(model)[-1]                   # the model's own top tokens (last row)
    residual_norms(tape)                         # [L + 1, T] size of the residual stream
    with ablate_heads(model, {(5, 0)}):          # zero head 0 of layer 5
        logits = model.forward(ids)

The logit lens (nostalgebraist, 2020): the residual stream after layer ``l`` is passed through
the *final* norm and the (tied) unembedding as if the remaining layers were skipped,
``lens_l = rms_norm(x_l) E^T``. The last row is exactly the model's own logits. Gemma 2 soft-caps
the final logits (``30 tanh(z / 30)``) and the lens does the same; Gemma 1 and 3 have no final
soft-cap.
"""

from __future__ import annotations

from collections import defaultdict
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np

from . import layers as L


def unembed(model, x: np.ndarray) -> np.ndarray:
    """Logits of residual-stream vectors ``[T, D] -> [T, V]``: final norm, LM head, soft-cap.

    The model's own :meth:`~tinygemma.model.Gemma.unembed`, the last steps of its forward pass,
    applied to any point of the stream.
    """
    return model.unembed(x)  # [T, V]


def residual_stream(tape: dict[str, np.ndarray], num_layers: int) -> list[np.ndarray]:
    """The residual stream entering layer 0, then after each layer: ``L + 1`` arrays ``[T, D]``."""
    return [tape["embed"]] + [tape[f"layers.{i}.resid_mlp"] for i in range(num_layers)]


def stream_names(num_layers: int) -> list[str]:
    """Names of the ``L + 1`` points of the residual stream: ``embed``, then each layer's output."""
    return ["embed"] + [f"layers.{i}" for i in range(num_layers)]


@dataclass
class Lens:
    """The logit lens at some positions: for each stream point and position, the top tokens.

    Arrays are ``[L + 1, P, ...]``: one row per point of the residual stream (``names``), one
    column per position in ``positions``.
    """

    names: list[str]  # L + 1: "embed", "layers.0", ..., "layers.{L-1}"
    positions: np.ndarray  # [P]
    top_ids: np.ndarray  # [L + 1, P, k] most likely tokens, best first
    top_probs: np.ndarray  # [L + 1, P, k] their probabilities
    target_probs: np.ndarray | None = None  # [L + 1, P] probability of each position's target
    target_ranks: np.ndarray | None = None  # [L + 1, P] its rank (0 = the top token)

    def top_pieces(self, model, position: int = -1) -> list[list[tuple[str, float]]]:
        """Per stream point, ``(piece, probability)`` of the top tokens at one column."""
        tok = model.tokenizer
        return [[(tok.id_to_piece(int(i)), float(p)) for i, p in zip(ids, probs)]
                for ids, probs in zip(self.top_ids[:, position], self.top_probs[:, position])]


def logit_lens(model, tape: dict[str, np.ndarray], positions=None, targets=None,
               k: int = 5) -> Lens:
    """Read every layer's residual stream through the final norm and the tied LM head.

    ``positions`` (default: the last one) picks the columns; ``targets`` gives one token id per
    chosen position (e.g. the token the model finally predicts, or the next token of the text)
    whose probability and rank are tracked through the layers. Only the top ``k`` per row are
    kept, so a whole prompt fits in memory even with Gemma's 256K vocabulary.
    """
    n = model.config.num_layers
    stream = residual_stream(tape, n)  # L + 1 arrays [T, D]
    T = len(stream[0])
    positions = np.atleast_1d(np.arange(T)[-1] if positions is None else np.asarray(positions))
    positions = np.arange(T)[positions]  # negative positions -> absolute; checks the range
    if targets is not None:
        targets = np.atleast_1d(np.asarray(targets))
        if targets.shape != positions.shape:
            raise ValueError(f"{targets.size} targets for {positions.size} positions")
    top_ids, top_probs, t_probs, t_ranks = [], [], [], []
    for x in stream:
        p = L.softmax(unembed(model, x[positions]).astype(np.float64))  # [P, V]
        order = top_k_ids(p, k)  # [P, k]
        top_ids.append(order)
        top_probs.append(np.take_along_axis(p, order, axis=-1))
        if targets is not None:
            pt = p[np.arange(len(positions)), targets]  # [P]
            t_probs.append(pt)
            t_ranks.append(np.sum(p > pt[:, None], axis=-1))  # tokens strictly more likely
    return Lens(stream_names(n), positions, np.stack(top_ids), np.stack(top_probs),
                np.stack(t_probs) if targets is not None else None,
                np.stack(t_ranks) if targets is not None else None)


def top_k_ids(p: np.ndarray, k: int) -> np.ndarray:
    """Indices of the ``k`` largest values along the last axis, largest first.

    ``argpartition`` then a sort of only ``k`` values: a full sort of 256K logits per row
    would cost far more than the matmul that made them.
    """
    k = min(k, p.shape[-1])
    part = np.argpartition(-p, k - 1, axis=-1)[..., :k]  # [..., k] unordered
    vals = np.take_along_axis(p, part, axis=-1)
    return np.take_along_axis(part, np.argsort(-vals, axis=-1, kind="stable"), axis=-1)


def residual_norms(tape: dict[str, np.ndarray], num_layers: int | None = None) -> np.ndarray:
    """The L2 norm of the residual stream at every point and position, ``[L + 1, T]``.

    Row 0 is the scaled embedding, row ``l + 1`` the output of layer ``l``. ``num_layers``
    defaults to the number of layers recorded in the tape.
    """
    if num_layers is None:
        num_layers = sum(1 for name in tape if name.endswith(".resid_mlp"))
    return np.stack([np.linalg.norm(x.astype(np.float64), axis=-1)
                     for x in residual_stream(tape, num_layers)])


def top_tokens(model, logits: np.ndarray, k: int = 5) -> list[tuple[int, str, float]]:
    """The ``k`` most likely next tokens of one logits row ``[V]``: ``(id, piece, probability)``."""
    logits = np.asarray(logits)
    if logits.ndim == 2:
        logits = logits[-1]  # [T, V] -> the last position
    p = L.softmax(logits.astype(np.float64))  # [V]
    order = top_k_ids(p, k)
    return [(int(i), model.tokenizer.id_to_piece(int(i)), float(p[i])) for i in order]


@contextmanager
def ablate_heads(model, heads):
    """Zero the attention output of the given ``(layer, head)`` pairs inside the block.

    A hook (``model.hooks``) on each layer's ``attn_heads``, the heads' outputs before the o
    projection, the reference and the fast path alike: head ``h`` of layer ``l`` contributes
    nothing to the o projection (zero-ablation). The attention probabilities recorded by
    ``trace`` are left as computed (the head still looks; its answer is dropped). Only this
    thread's passes inside the block are ablated::

        with ablate_heads(model, {(3, 1)}):
            ablated = model.forward(ids)
    """
    with model.hooks(head_ablation_hooks(model.config, heads)):
        yield model


def head_ablation_hooks(config, heads) -> dict:
    """Hooks (for ``forward``, ``generate``) zeroing the outputs of ``(layer, head)`` pairs."""
    by_layer: dict[int, list[int]] = defaultdict(list)
    for layer, head in heads:
        if not (0 <= layer < config.num_layers and 0 <= head < config.num_heads):
            raise ValueError(f"no head ({layer}, {head}): the model has {config.num_layers} "
                             f"layers of {config.num_heads} heads")
        by_layer[int(layer)].append(int(head))

    def zero(out, name):  # [H, T, d]
        out = out.copy()
        out[by_layer[int(name.split(".")[1])]] = 0  # the ablated heads' outputs
        return out
    return {f"layers.{layer}.attn_heads": zero for layer in by_layer}
