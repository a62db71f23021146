"""Explorers: notebook widgets (ipywidgets) for stepping through a forward pass and for sampling.

::

    from tinygemma import explore
    explore.layers(model, "The capital of France is")     # step through every named intermediate
    explore.sampling(model, "Once upon a time")           # temperature / top-k / top-p, then sample

Each explorer computes once per prompt (the whole pass, or one forward step per sampled token)
and then only redraws: a panel is drawn again only when what it shows has changed. The panels
are PNG images drawn with matplotlib, so the widget state (and its tests) are plain Python
values. Displayed, an explorer also carries a static PNG of its current panels, which is what a
page without a live kernel shows (GitHub, the docs site).
"""

from __future__ import annotations

import html
import io
import re
import warnings

import numpy as np

from . import lens
from . import plot
from .generate import check_sampling, next_token_probs
from .layers import softmax

try:
    import ipywidgets as widgets
    from matplotlib.figure import Figure
    from matplotlib.patches import Rectangle
except ImportError as e:  # notebook dependencies, not runtime ones
    raise ImportError("tinygemma.explore needs ipywidgets and matplotlib "
                      "(pip install jupyter matplotlib, or tinygemma[dev])") from e

DPI = 110

# What each named step computes: words, the equation (matplotlib mathtext, so the static picture
# can draw it too) and the chapter that teaches it. Keys are the names without "layers.{i}.".
NORM = r"$\frac{x}{\mathrm{rms}(x)} \odot (1 + w)$"
OPS = {
    "embed": ("the token embedding, scaled", r"$x = \sqrt{D}\, E[t]$", "02 · embeddings"),
    "attn_norm": ("RMSNorm before attention", "$h = $" + NORM, "03 · RMSNorm"),
    "q": ("the queries: projection, QK-norm (Gemma 3), RoPE",
          r"$q = \mathrm{RoPE}(h W_q^\top)$", "04 · RoPE, 05 · attention"),
    "k": ("the keys: projection, QK-norm (Gemma 3), RoPE",
          r"$k = \mathrm{RoPE}(h W_k^\top)$", "04 · RoPE, 05 · attention"),
    "v": ("the values: projection only", r"$v = h W_v^\top$", "05 · attention"),
    "attn_probs": ("attention probabilities of each head",
                   r"$P = \mathrm{softmax}(s\, q k^\top + M)$", "05 · attention"),
    "attn_heads": ("each head's output, before the heads are mixed", r"$o_h = P_h v$",
                   "05 · attention"),
    "attn_out": ("the heads mixed by the output projection",
                 r"$a = [o_1 \dots o_H]\, W_o^\top$", "05 · attention"),
    "post_attn_norm": ("RMSNorm of the attention output (the sandwich)", "$a = $" + NORM,
                       "10 · Gemma 2 and 3"),
    "resid_attn": ("the attention's output added to the residual stream", r"$x \leftarrow x + a$",
                   "07 · decoder block"),
    "mlp_norm": ("RMSNorm before the MLP", "$h = $" + NORM, "03 · RMSNorm"),
    "gate": ("the MLP's gate projection", r"$g = h W_{gate}^\top$", "06 · GeGLU"),
    "up": ("the MLP's up projection", r"$u = h W_{up}^\top$", "06 · GeGLU"),
    "mlp_out": ("the gated MLP, projected back down",
                r"$m = (\mathrm{gelu}(g) \odot u)\, W_{down}^\top$", "06 · GeGLU"),
    "post_mlp_norm": ("RMSNorm of the MLP output (the sandwich)", "$m = $" + NORM,
                      "10 · Gemma 2 and 3"),
    "resid_mlp": ("the MLP's output added to the residual stream: the layer's output",
                  r"$x \leftarrow x + m$", "07 · decoder block"),
    "final_norm": ("the final RMSNorm", "$x = $" + NORM, "07 · decoder block"),
    "logits": ("the logits: the tied embedding read backwards", r"$z = x E^\top$",
               "07 · decoder block"),
}
STREAM = re.compile(r"^(embed|layers\.(\d+)\.(resid_attn|resid_mlp))$")  # residual-stream points


def describe(name: str) -> tuple[str, str, str]:
    """``(what it is, equation, chapter)`` of a step name such as ``layers.3.attn_probs``."""
    op = OPS.get(name.rsplit(".", 1)[-1])
    return op if op else ("an intermediate of the pass", "", "12 · looking inside")


def layer_of(name: str, num_layers: int) -> int:
    """The layer a step belongs to (the embedding: 0; the final norm and logits: the last)."""
    m = re.match(r"layers\.(\d+)\.", name)
    return int(m.group(1)) if m else (0 if name == "embed" else num_layers - 1)


def stream_points(names: list[str]) -> list[tuple[str, float]]:
    """For every step, the residual stream as it stands there: its name and depth.

    The stream is the latest of ``embed``, ``layers.{i}.resid_attn`` (depth ``i + 0.5``) and
    ``layers.{i}.resid_mlp`` (depth ``i + 1``) at or before the step.
    """
    out, current = [], ("embed", 0.0)
    for name in names:
        m = STREAM.match(name)
        if m and m.group(2) is not None:
            current = (name, int(m.group(2)) + (0.5 if m.group(3) == "resid_attn" else 1.0))
        out.append(current)
    return out


def png(fig) -> bytes:
    """A matplotlib figure as PNG bytes (DPI dots per inch)."""
    buf = io.BytesIO()
    with warnings.catch_warnings():  # tokens in scripts the default font lacks draw as boxes
        warnings.filterwarnings("ignore", message="Glyph .* missing from font")
        fig.savefig(buf, format="png", dpi=DPI, bbox_inches="tight")
    return buf.getvalue()


def _text(ids, tokenizer) -> list[str]:
    return [tokenizer.id_to_piece(int(i)) for i in ids]


def _check_prompt(prompt) -> str:
    if not isinstance(prompt, str):
        raise ValueError(f"the prompt must be a str, got {type(prompt).__name__}")
    return prompt


class LayerExplorer(widgets.VBox):
    """Step through the named intermediates of one forward pass (see :func:`layers`)."""

    def __init__(self, model, prompt: str, step: str | None = None, position: int = -1,
                 head: int = 0):
        c = model.config
        self.model = model
        self.prompt_box = widgets.Text(_check_prompt(prompt), description="prompt",
                                       continuous_update=False,
                                       layout=widgets.Layout(width="60%"))
        self.prev_button = widgets.Button(description="◀ previous", tooltip="previous step")
        self.next_button = widgets.Button(description="next ▶", tooltip="next step")
        self.step_slider = widgets.SelectionSlider(options=["embed"], description="step",
                                                   continuous_update=False,
                                                   layout=widgets.Layout(width="60%"))
        self.position_menu = widgets.Dropdown(description="position")
        self.head_menu = widgets.Dropdown(options=[(str(h), h) for h in range(c.num_heads)],
                                          value=head, description="head",
                                          layout=widgets.Layout(width="160px"))
        self.info = widgets.HTMLMath()
        self.panels = {k: widgets.Image(format="png", layout=widgets.Layout(width=w))
                       for k, w in [("value", "52%"), ("attention", "40%"),
                                    ("lens", "40%"), ("norms", "52%")]}
        self.drawn: dict[str, tuple] = {}  # panel -> what it shows now (redrawn when it changes)
        self.shown: dict[str, object] = {}  # panel -> the numbers it shows (for tests, readers)
        self._loading = False
        super().__init__([
            self.prompt_box,
            widgets.HBox([self.prev_button, self.step_slider, self.next_button]),
            widgets.HBox([self.position_menu, self.head_menu]),
            self.info,
            widgets.HBox([self.panels["value"], self.panels["attention"]]),
            widgets.HBox([self.panels["norms"], self.panels["lens"]]),
        ])
        self.prev_button.on_click(lambda _: self.go(-1))
        self.next_button.on_click(lambda _: self.go(+1))
        self.prompt_box.observe(lambda ch: self.load(ch["new"]), "value")
        for w in (self.step_slider, self.position_menu, self.head_menu):
            w.observe(self.redraw, "value")
        self.load(prompt, step, position)

    # ---- state -----------------------------------------------------------------------------
    def load(self, prompt: str, step: str | None = None, position: int = -1):
        """Run the pass for a new prompt (once), then redraw everything."""
        model, tok = self.model, self.model.tokenizer
        ids = tok.encode(_check_prompt(prompt))
        self.ids, self.tokens = np.asarray(ids), _text(ids, tok)
        steps = model.steps(ids)  # the pass, paused at each named point
        self.tape = dict(steps)  # ... run to the end once: every intermediate by name
        self.names = steps.names  # trace.step_names(config), in order
        self.streams = stream_points(self.names)
        self.norms = lens.residual_norms(self.tape, model.config.num_layers)  # [L + 1, T]
        self.drawn.clear()
        T = len(ids)
        self._loading = True  # the controls change together: redraw once, at the end
        try:
            self.step_slider.options = self.names
            self.step_slider.value = step if step is not None else self.names[0]
            self.position_menu.options = [(f"{t}: {plot.show_piece(p, 16)}", t)
                                          for t, p in enumerate(self.tokens)]
            self.position_menu.value = range(T)[position]
        finally:
            self._loading = False
        self.redraw()

    def go(self, delta: int):
        """Move ``delta`` steps along the pass (clamped at both ends)."""
        i = self.names.index(self.step_slider.value) + delta
        self.step_slider.value = self.names[min(max(i, 0), len(self.names) - 1)]

    @property
    def step(self) -> str:
        return self.step_slider.value

    # ---- drawing ---------------------------------------------------------------------------
    def redraw(self, *_):
        """Redraw the panels whose content changed, and the line describing the step."""
        if self._loading:
            return
        name, t, h = self.step, self.position_menu.value, self.head_menu.value
        value = self.tape[name]
        c = self.model.config
        layer = layer_of(name, c.num_layers)
        stream, depth = self.streams[self.names.index(name)]
        keys = {"value": (name, t, h if value.ndim == 3 else None),
                "attention": (layer, h, t),
                "lens": (stream, t),
                "norms": (depth, t)}
        for panel, key in keys.items():
            if self.drawn.get(panel) != key:
                fig = Figure(figsize=(5.2, 3.4) if panel in ("value", "norms") else (4.2, 3.4))
                getattr(self, "draw_" + panel)(fig.add_subplot(), name, t, h)
                self.panels[panel].value = png(fig)
                self.drawn[panel] = key
        what, eq, chapter = describe(name)
        self.info.value = (f"<b>{html.escape(name)}</b> {tuple(value.shape)}: {what} &nbsp; "
                           f"{eq} &nbsp; <i>(chapter {chapter})</i>")

    def draw_value(self, ax, name, t, h):
        """The current intermediate: a heat map (positions x features, or one head), or bars."""
        value, c = self.tape[name], self.model.config
        if name.endswith("attn_probs"):  # [H, T, S]: every head side by side, h boxed
            self.shown["value"] = value[h]
            H, T, S = value.shape
            gap = np.full((H, T, 1), np.nan)  # a blank column between heads
            row = np.concatenate(np.concatenate([value, gap], axis=-1), axis=-1)[:, :-1]
            ax.imshow(row, cmap="viridis", vmin=0, vmax=1, aspect="auto", interpolation="nearest")
            ax.add_patch(Rectangle((h * (S + 1) - 0.5, -0.5), S, T, fill=False, ec="C3", lw=2))
            ax.set_xticks([g * (S + 1) + (S - 1) / 2 for g in range(H)],
                          [f"head {g}" for g in range(H)], fontsize=7)
            ax.set_yticks(range(T), [plot.show_piece(s) for s in self.tokens], fontsize=7)
            ax.axhline(t, color="w", lw=0.8, ls=":")
            ax.set_title(f"{name} {tuple(value.shape)}: every head, keys across", fontsize=9)
        elif value.ndim == 3:  # [H or K, T, d]: one head's rows
            g = h * len(value) // c.num_heads  # the KV head that query head h reads
            self.shown["value"] = value[g]
            heat(ax, value[g], self.tokens, t, f"{name}[{g}]" + (" (shared KV head)"
                                                               if len(value) < c.num_heads else ""))
        elif value.shape[-1] == c.vocab_size:  # logits: the distribution at the position
            top = lens.top_tokens(self.model, value[t], k=10)
            self.shown["value"] = top
            plot.distribution(np.array([p for *_, p in top]), [s for _, s, _ in top], ax=ax,
                              title=f"{name} at position {t}: softmax, top 10")
        else:
            self.shown["value"] = value
            heat(ax, value, self.tokens, t, name)

    def draw_attention(self, ax, name, t, h):
        """The chosen head's attention map in the current layer, the chosen query marked."""
        layer = layer_of(name, self.model.config.num_layers)
        probs = self.tape[f"layers.{layer}.attn_probs"][h]  # [T, S]
        self.shown["attention"] = (layer, h, probs)
        plot.attention_map(probs, self.tokens, ax=ax, title=f"attention: layer {layer}, head {h}")
        ax.axhline(t, color="w", lw=0.8, ls=":")

    def draw_lens(self, ax, name, t, h):
        """The logit lens: the stream where the pass stands, read through the final norm and E."""
        stream = self.streams[self.names.index(name)][0]
        top = lens.top_tokens(self.model, lens.unembed(self.model, self.tape[stream][t:t + 1]), 5)
        self.shown["lens"] = top
        probs, pieces = [p for *_, p in top][::-1], [plot.show_piece(s, 14) for _, s, _ in top][::-1]
        ax.barh(range(len(top)), probs, color="C2")
        ax.set_yticks(range(len(top)), pieces, fontsize=8)
        for y, p in enumerate(probs):
            ax.text(p, y, f" {p:.2f}", va="center", fontsize=7)
        ax.set_xlim(0, 1.15)
        ax.set_xlabel("probability")
        ax.set_title(f"logit lens of {stream}, position {t}", fontsize=9)

    def draw_norms(self, ax, name, t, h):
        """Residual-stream norms against depth, the chosen position bold, the current depth marked."""
        depth = self.streams[self.names.index(name)][1]
        self.shown["norms"] = (depth, self.norms[:, t])
        x = np.arange(len(self.norms))
        ax.plot(x, self.norms, color="0.8", lw=0.8)
        ax.plot(x, self.norms[:, t], "o-", color="C0", ms=3,
                label=f"position {t} ({plot.show_piece(self.tokens[t])})")
        ax.axvline(depth, color="C3", lw=1.2, label="the pass is here")
        ax.set_xticks(x, ["emb"] + [str(i) for i in range(len(x) - 1)], fontsize=7)
        ax.set_xlabel("after layer")
        ax.set_ylabel("‖x‖₂")
        ax.set_yscale("log")
        ax.legend(fontsize=7)
        ax.set_title("residual stream norm", fontsize=9)

    def snapshot(self) -> bytes:
        """The four panels and the step's line in one PNG (the static picture)."""
        name, t, h = self.step, self.position_menu.value, self.head_menu.value
        fig = Figure(figsize=(10.5, 7.4))
        axes = fig.subplots(2, 2, gridspec_kw={"width_ratios": [5.2, 4.2]})
        for ax, panel in zip(axes.flat, ["value", "attention", "norms", "lens"]):
            getattr(self, "draw_" + panel)(ax, name, t, h)
        what, eq, chapter = describe(name)
        fig.suptitle(f"{name}: {what}   {eq}   (chapter {chapter})", fontsize=10)
        fig.tight_layout()
        return png(fig)

    def _repr_mimebundle_(self, **kwargs):
        bundle = super()._repr_mimebundle_(**kwargs)
        bundle["image/png"] = self.snapshot()  # shown where widgets are not (GitHub, the docs)
        return bundle


def heat(ax, x, tokens, t, title):
    """Rows = positions, columns = features; diverging colours clipped at the 99th percentile
    of |x| (a few outlier features would otherwise wash out the rest); position t marked."""
    lim = float(np.percentile(np.abs(x), 99)) or 1.0
    im = ax.imshow(x, cmap="RdBu_r", vmin=-lim, vmax=lim, aspect="auto", interpolation="nearest")
    ax.set_yticks(range(len(tokens)), [plot.show_piece(s) for s in tokens], fontsize=7)
    ax.axhline(t - 0.5, color="k", lw=0.8), ax.axhline(t + 0.5, color="k", lw=0.8)
    ax.set_xlabel(f"feature (of {x.shape[-1]})")
    ax.set_title(f"{title} {tuple(x.shape)}", fontsize=9)
    ax.figure.colorbar(im, ax=ax, fraction=0.046)


def layers(model, prompt: str, step: str | None = None, position: int = -1,
           head: int = 0) -> LayerExplorer:
    """A widget to step through the forward pass of ``prompt``, one named intermediate at a time.

    Controls: previous / next step, a slider over every step (:func:`tinygemma.trace.step_names`),
    the position (token) and the attention head. Panels: the current intermediate (a heat map
    of positions x features, one head's map, or the top tokens of the logits), the chosen head's
    attention map in the current layer, the logit lens of the residual stream where the pass
    stands (top 5 at the chosen position), the residual-stream norms with the current depth
    marked, and a line naming the operation, its equation and the chapter that teaches it.
    Changing the prompt runs the pass again; everything else only redraws.
    """
    return LayerExplorer(model, prompt, step, position, head)


class SamplingExplorer(widgets.VBox):
    """Temperature, top-k and top-p over the next-token distribution (see :func:`sampling`)."""

    def __init__(self, model, prompt: str, temperature: float = 1.0, top_k: int = 0,
                 top_p: float = 1.0, seed: int = 0, shown: int = 15, max_new_tokens: int = 64):
        self.model, self.prompt, self.seed = model, _check_prompt(prompt), seed
        self.shown_k, self.max_new_tokens = shown, max_new_tokens
        check_sampling(max_new_tokens, temperature, top_k or None, top_p)
        self.temperature = widgets.FloatSlider(temperature, min=0, max=2, step=0.05,
                                               description="temperature", continuous_update=False)
        self.top_k = widgets.IntSlider(top_k, min=0, max=50, description="top-k (0: off)",
                                       continuous_update=False)
        self.top_p = widgets.FloatSlider(top_p, min=0.05, max=1, step=0.05,
                                         description="top-p (1: off)", continuous_update=False)
        for w in (self.temperature, self.top_k, self.top_p):
            w.style.description_width = "100px"
            w.observe(self.redraw, "value")
        self.sample_button = widgets.Button(description="sample", button_style="primary")
        self.reset_button = widgets.Button(description="reset")
        self.sample_button.on_click(lambda _: self.sample())
        self.reset_button.on_click(lambda _: self.reset())
        self.text = widgets.HTML()
        self.status = widgets.HTML()
        self.panel = widgets.Image(format="png", layout=widgets.Layout(width="70%"))
        super().__init__([
            widgets.HBox([widgets.VBox([self.temperature, self.top_k, self.top_p]),
                          widgets.VBox([self.sample_button, self.reset_button])]),
            self.text, self.panel, self.status])
        self.reset()

    def reset(self):
        """Back to the prompt alone: one forward pass fills a fresh KV cache."""
        ids = self.model.tokenizer.encode(self.prompt)
        self.ids, self.new = list(ids), []
        self.rng = np.random.default_rng(self.seed)
        self.cache = self.model.new_cache(len(ids) + self.max_new_tokens)
        self.logits = self.model.forward(ids, cache=self.cache, last_only=True)[0]  # [V]
        self.sample_button.disabled = False
        self.redraw()

    def probs(self) -> np.ndarray:
        """The distribution the next token is drawn from ``[V]`` under the sliders' settings."""
        t, k, p = self.temperature.value, self.top_k.value, self.top_p.value
        if t == 0:  # greedy: all the mass on the argmax
            out = np.zeros(len(self.logits))
            out[np.argmax(self.logits)] = 1
            return out
        return next_token_probs(self.logits, t, k or None, p if p < 1 else None)

    def sample(self) -> int:
        """Draw a token from :meth:`probs`, append it, and run one forward step for the next."""
        token = int(self.rng.choice(len(self.logits), p=self.probs()))
        self.ids.append(token)
        self.new.append(token)
        self.logits = self.model.forward([token], cache=self.cache, last_only=True)[0]  # [V]
        self.sample_button.disabled = len(self.new) >= self.max_new_tokens
        self.redraw()
        return token

    def redraw(self, *_):
        """The text so far, and the distribution: the top tokens at temperature 1 (outlined)
        against the probabilities the sliders leave them (filled)."""
        tok = self.model.tokenizer
        raw = softmax(self.logits.astype(np.float64))  # [V] temperature 1, no truncation
        p = self.probs()  # [V]
        ids = lens.top_k_ids(raw, self.shown_k)  # [shown] by the model's own ranking
        self.shown_ids, self.shown_probs = ids, p[ids]
        fig = Figure(figsize=(7, 3))
        ax = fig.add_subplot()
        labels = [tok.id_to_piece(int(i)) for i in ids]
        plot.distribution(p[ids], labels, ax=ax, color="C1",
                          title=f"next token: T={self.temperature.value:g}, "
                                f"top-k={self.top_k.value or 'off'}, "
                                f"top-p={self.top_p.value if self.top_p.value < 1 else 'off'}")
        ax.bar(np.arange(len(ids)), raw[ids], fill=False, edgecolor="0.3", lw=0.8,
               label="T = 1, no cut")
        ax.set_ylim(0, max(p[ids].max(), raw[ids].max()) * 1.15)
        ax.legend(fontsize=7)
        self.panel.value = png(fig)
        prompt = tok.decode(self.ids[:len(self.ids) - len(self.new)], skip_special_tokens=True)
        new = tok.decode(self.new)
        self.text.value = (f"<pre style='white-space: pre-wrap'>{html.escape(prompt)}"
                           f"<b style='color: #c05000'>{html.escape(new)}</b></pre>")
        kept = int(np.count_nonzero(p))
        entropy = float(-np.sum(p[p > 0] * np.log2(p[p > 0])))
        self.status.value = (f"{kept:,} tokens can be drawn; entropy {entropy:.2f} bits; "
                             f"{len(self.new)} sampled")

    def _repr_mimebundle_(self, **kwargs):
        bundle = super()._repr_mimebundle_(**kwargs)
        bundle["image/png"] = bytes(self.panel.value)  # the static picture (the widget holds a memoryview)
        return bundle


def sampling(model, prompt: str, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
             seed: int = 0) -> SamplingExplorer:
    """A widget over the next-token distribution of ``prompt``.

    Sliders set the temperature (0: greedy), top-k (0: off) and top-p (1: off), as in
    :func:`tinygemma.generate.next_token_probs`; the bars show the sampling distribution over
    the model's top tokens, outlined by the untouched (temperature 1) distribution. "sample"
    draws a token and appends it (one forward step on a KV cache); "reset" starts over.
    """
    return SamplingExplorer(model, prompt, temperature, top_k, top_p, seed)
