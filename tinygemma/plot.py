"""Figures for stepping through a model: attention maps, residual norms, the logit lens,
next-token distributions.

matplotlib is a notebook (dev) dependency, not a runtime one: it is imported inside each
function. Every function draws on ``ax`` (a new figure when it is None) and returns the axes.
"""

from __future__ import annotations

import numpy as np


def _axes(ax, figsize):
    if ax is None:
        import matplotlib.pyplot as plt

        _, ax = plt.subplots(figsize=figsize)
    return ax


def show_piece(piece: str, width: int = 10) -> str:
    """A token piece made readable on a plot: ``▁`` as a space marker, newlines escaped."""
    s = piece.replace("\n", "\\n").replace("\t", "\\t")
    return s if len(s) <= width else s[: width - 1] + "…"


def attention_map(probs: np.ndarray, tokens=None, ax=None, title: str | None = None):
    """One head's attention probabilities ``[T, S]``: row = query position, column = key."""
    ax = _axes(ax, (4.5, 4))
    T, S = probs.shape
    im = ax.imshow(probs, cmap="viridis", vmin=0, vmax=1, aspect="auto")
    if tokens is not None:
        labels = [show_piece(t) for t in tokens]
        ax.set_xticks(range(S), labels[-S:], rotation=90, fontsize=7)
        ax.set_yticks(range(T), labels[-T:], fontsize=7)
    ax.set_xlabel("key")
    ax.set_ylabel("query")
    if title:
        ax.set_title(title, fontsize=9)
    ax.figure.colorbar(im, ax=ax, fraction=0.046)
    return ax


def attention_heads(tape: dict, layer: int, tokens=None, axes=None):
    """Every head of one layer side by side, from ``tape["layers.{layer}.attn_probs"]``."""
    import matplotlib.pyplot as plt

    probs = tape[f"layers.{layer}.attn_probs"]  # [H, T, S]
    H = len(probs)
    if axes is None:
        _, axes = plt.subplots(1, H, figsize=(3.6 * H, 3.6), squeeze=False)
        axes = axes[0]
    for h, ax in enumerate(axes):
        attention_map(probs[h], tokens, ax=ax, title=f"layer {layer}, head {h}")
    return axes


def residual_norms(norms: np.ndarray, tokens=None, ax=None, title="residual stream norm"):
    """Norm of the residual stream ``[L + 1, T]`` against depth, one line per position."""
    ax = _axes(ax, (6, 3.5))
    depth = np.arange(len(norms))
    for t in range(norms.shape[1]):
        label = show_piece(tokens[t]) if tokens is not None else f"pos {t}"
        ax.plot(depth, norms[:, t], marker=".", label=label)
    ax.set_xticks(depth, ["emb"] + [str(i) for i in range(len(norms) - 1)], fontsize=7)
    ax.set_xlabel("after layer")
    ax.set_ylabel("‖x‖₂")
    ax.set_yscale("log")
    ax.set_title(title, fontsize=9)
    if norms.shape[1] <= 12:
        ax.legend(fontsize=7, ncol=2)
    return ax


def lens_heatmap(lens, model, tokens=None, ax=None, value: str = "top", title="logit lens"):
    """The logit lens as a heat map: rows = depth, columns = positions.

    ``value="top"`` colours each cell by the probability of its top token and writes the token;
    ``value="target"`` colours by the probability of the lens's targets.
    """
    ax = _axes(ax, (1.1 * len(lens.positions) + 2, 0.32 * len(lens.names) + 1.5))
    if value == "target":
        grid = lens.target_probs  # [L + 1, P]
    else:
        grid = lens.top_probs[:, :, 0]  # [L + 1, P]
    im = ax.imshow(grid, cmap="Blues", vmin=0, vmax=1, aspect="auto", origin="lower")
    tok = model.tokenizer
    for r in range(grid.shape[0]):
        for c in range(grid.shape[1]):
            piece = show_piece(tok.id_to_piece(int(lens.top_ids[r, c, 0])), 8)
            ax.text(c, r, piece, ha="center", va="center", fontsize=6,
                    color="white" if grid[r, c] > 0.5 else "black")
    ax.set_yticks(range(len(lens.names)), [n.replace("layers.", "") for n in lens.names], fontsize=7)
    if tokens is not None:
        ax.set_xticks(range(len(lens.positions)),
                      [show_piece(tokens[p]) for p in lens.positions], rotation=45, fontsize=7)
    ax.set_xlabel("input position (the lens predicts the token after it)")
    ax.set_ylabel("after layer")
    ax.set_title(title, fontsize=9)
    ax.figure.colorbar(im, ax=ax, fraction=0.03, label="probability")
    return ax


def distribution(probs: np.ndarray, labels, ax=None, title: str | None = None, color="C0"):
    """A bar plot of a few probabilities (e.g. the top tokens of a next-token distribution)."""
    ax = _axes(ax, (6, 3))
    x = np.arange(len(probs))
    ax.bar(x, probs, color=color)
    ax.set_xticks(x, [show_piece(s) for s in labels], rotation=60, fontsize=7)
    ax.set_ylabel("probability")
    ax.set_ylim(0, max(1e-9, float(np.max(probs))) * 1.15)
    if title:
        ax.set_title(title, fontsize=9)
    return ax
