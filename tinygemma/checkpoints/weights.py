"""One weights structure with one naming scheme, whatever the checkpoint format.

Tensors stay compact (memory-mapped bf16 as uint16, GGUF quantised blocks as stored) and are
decoded to float32 one matrix at a time as the forward pass needs them, so Gemma 7B in bf16
(17 GB) runs in 24 GB of memory. The fast path (``kernels/``) reads the compact form.

Our names (the same for Hugging Face and GGUF checkpoints)::

    embed                       [V, D]   token embedding, also the tied LM head
    final_norm                  [D]
    layers.{i}.attn_norm        [D]      pre-attention RMSNorm
    layers.{i}.q / k / v        [H*d, D] / [K*d, D] / [K*d, D]
    layers.{i}.o                [D, H*d]
    layers.{i}.q_norm, k_norm   [d]      Gemma 3 QK-norm
    layers.{i}.post_attn_norm   [D]      Gemma 2/3 sandwich norm
    layers.{i}.mlp_norm         [D]      pre-MLP RMSNorm
    layers.{i}.gate / up        [F, D]
    layers.{i}.down             [D, F]
    layers.{i}.post_mlp_norm    [D]      Gemma 2/3 sandwich norm

Norm weights hold ``w`` of ``(1 + w)``, the Hugging Face convention.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

import numpy as np

from ..config import GemmaConfig
from ..errors import CheckpointError


class Tensor:
    """A compact tensor that decodes to float32 on demand."""

    kind = "f32"

    def __init__(self, data: np.ndarray, shape: tuple[int, ...] | None = None):
        self.data = data
        self.shape = tuple(shape if shape is not None else data.shape)

    @property
    def nbytes(self) -> int:
        return int(self.data.nbytes)

    def f32(self) -> np.ndarray:
        """The whole tensor in float32."""
        return np.asarray(self.data, dtype=np.float32)

    def rows(self, idx: np.ndarray) -> np.ndarray:
        """Selected rows in float32 (the embedding lookup decodes only these)."""
        return np.asarray(self.data[idx], dtype=np.float32)


class F16Tensor(Tensor):
    kind = "f16"


class BF16Tensor(Tensor):
    """bfloat16 held as uint16: shifted left 16 bits it is exactly the float32 value."""

    kind = "bf16"

    @staticmethod
    def decode(u16: np.ndarray) -> np.ndarray:
        return (u16.astype(np.uint32) << 16).view(np.float32)

    def f32(self) -> np.ndarray:
        return self.decode(np.asarray(self.data))

    def rows(self, idx: np.ndarray) -> np.ndarray:
        return self.decode(np.asarray(self.data[idx]))


class Weights:
    """Name -> compact tensor; ``weights[name]`` gives float32.

    Decoded matrices are kept while their total stays under ``cache_bytes`` (the demo model,
    1 GB in float32, stays decoded; Gemma 7B decodes per matrix and keeps nothing).
    """

    def __init__(self, tensors: dict[str, Tensor], cache_bytes: int = 2 << 30):
        self.tensors = tensors
        self._cache: dict[str, np.ndarray] = {}
        self._cache_left = cache_bytes
        self._caching = threading.Lock()  # threads sharing the model decode a matrix once

    def __getitem__(self, name: str) -> np.ndarray:
        x = self._cache.get(name)
        if x is not None:
            return x
        with self._caching:
            x = self._cache.get(name)
            if x is None:
                x = self.tensors[name].f32()
                if x.nbytes <= self._cache_left:
                    self._cache[name] = x
                    self._cache_left -= x.nbytes
        return x

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def table(self, name: str) -> "RowView":
        """A lookup table that decodes only the rows asked for (the embedding)."""
        return RowView(self, name)

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())


class RowView:
    """``view[ids]`` decodes rows ``ids`` of one tensor; ``view.shape`` is the tensor's."""

    def __init__(self, weights: Weights, name: str):
        self.weights, self.name = weights, name
        self.shape = weights.tensors[name].shape

    def __getitem__(self, idx) -> np.ndarray:
        cached = self.weights._cache.get(self.name)
        return cached[idx] if cached is not None else self.weights.tensors[self.name].rows(idx)


def expected_shapes(c: GemmaConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor a model of config ``c`` needs, with its shape ``[out, in]``."""
    D, d, F = c.hidden_size, c.head_dim, c.intermediate_size
    shapes = {"embed": (c.vocab_size, D), "final_norm": (D,)}
    if not c.tie_word_embeddings:
        shapes["lm_head"] = (c.vocab_size, D)
    for i in range(c.num_layers):
        p = f"layers.{i}."
        shapes.update({p + "attn_norm": (D,), p + "q": (c.num_heads * d, D),
                       p + "k": (c.num_kv_heads * d, D), p + "v": (c.num_kv_heads * d, D),
                       p + "o": (D, c.num_heads * d), p + "mlp_norm": (D,),
                       p + "gate": (F, D), p + "up": (F, D), p + "down": (D, F)})
        if c.sandwich_norms:
            shapes.update({p + "post_attn_norm": (D,), p + "post_mlp_norm": (D,)})
        if c.qk_norm:
            shapes.update({p + "q_norm": (d,), p + "k_norm": (d,)})
    return shapes


def check_weights(tensors: dict[str, Tensor], c: GemmaConfig, source: str,
                  origin: dict[str, str], spell: Callable[[str], str]) -> None:
    """Every expected tensor is present with the shape the config implies.

    Errors name the tensor as the checkpoint spells it: ``origin`` maps our names to those of
    the tensors present, ``spell`` gives the name a missing one would have had.
    """
    present = {int(n.split(".")[1]) for n in tensors if n.startswith("layers.")}
    missing = next((i for i in range(c.num_layers) if i not in present), None)
    if missing is not None:  # before sizing anything by a layer count the weights cannot back
        raise CheckpointError(f"{source}: the config has {c.num_layers} layers, the weights "
                              f"have no tensor of layer {missing}")
    for name, shape in expected_shapes(c).items():
        if name not in tensors:
            raise CheckpointError(f"{source}: tensor {spell(name)!r} is missing "
                                  f"(tinygemma's {name!r})")
        if tuple(tensors[name].shape) != shape:
            raise CheckpointError(f"{source}: tensor {origin.get(name, repr(name))} has shape "
                                  f"{list(tensors[name].shape)}, the config implies {list(shape)}")
