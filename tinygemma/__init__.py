"""tinygemma: Google's Gemma language models from scratch in NumPy.

    import tinygemma as tg
    model = tg.load("path/to/checkpoint-or.gguf")   # or tg.load_demo()
    print(tg.generate(model, "The capital of France is", max_new_tokens=16))
"""

import os
import sys

# OpenBLAS's threads spin (yielding) for ~0.1 s after each matrix product, and the kernels'
# threads then share the cores with them: ~2x slower kernels. The fast path over panels (GGUF
# types, int8) makes no BLAS call; matrices read as stored (bf16, f16, f32) are multiplied on
# BLAS in a prefill. OpenBLAS reads this when NumPy loads it, so it takes effect when NumPy is
# not loaded yet (the tinygemma command; or import tinygemma first). An explicit setting wins.
if "numpy" not in sys.modules:
    os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "4")  # spin 2^4 cycles, then sleep

from .config import GemmaConfig  # noqa: E402
from .evaluate import perplexity  # noqa: E402
from .errors import CheckpointError, CheckpointNotFound, TinyGemmaError  # noqa: E402
from .generate import generate, stream  # noqa: E402
from .loader import load, load_demo  # noqa: E402
from .model import Gemma, KVCache  # noqa: E402

__all__ = ["GemmaConfig", "Gemma", "KVCache", "load", "load_demo", "generate", "stream",
           "perplexity", "TinyGemmaError", "CheckpointError", "CheckpointNotFound"]
__version__ = "0.1.0"
