"""Checkpoint readers: Hugging Face folders and GGUF files -> config + one weights structure."""

from .gguf_file import load_gguf
from .hf import load_hf
from .weights import Weights

__all__ = ["load_gguf", "load_hf", "Weights"]
