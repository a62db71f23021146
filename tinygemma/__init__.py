"""tinygemma: Google's Gemma language models from scratch in NumPy.

    import tinygemma as tg
    model = tg.load("path/to/checkpoint-or.gguf")   # or tg.load_demo()
    print(tg.generate(model, "The capital of France is", max_new_tokens=16))
"""

from .config import GemmaConfig
from .errors import CheckpointError, CheckpointNotFound, TinyGemmaError
from .generate import generate, stream
from .loader import load, load_demo
from .model import Gemma, KVCache

__all__ = ["GemmaConfig", "Gemma", "KVCache", "load", "load_demo", "generate", "stream",
           "TinyGemmaError", "CheckpointError", "CheckpointNotFound"]
__version__ = "0.1.0"
