"""The fast path: Numba kernels over compact weights, switched in by :class:`FastGemma`.

The reference path (``layers.py``, ``model.py``) decodes every weight matrix to float32 and
multiplies with NumPy. Decoding one token is a matrix-vector product per projection, which
reads every weight once; float32 copies would make it read 2x (bf16) to 7x (4-bit) more bytes.
So the kernels read compact weights and decode them in registers, inside the dot product.
One file per concern:

* ``_llvm.py``: Numba's options and the LLVM-level helpers the kernels inline (bit casts of
  16-bit floats, a vectorised ``_exp``, accumulator lanes in registers);
* ``quant.py``: GGUF blocks (Q8_0, Q5_0, Q4_0, Q4_K, Q5_K, Q6_K) unpacked exactly to int8 plus
  scales (``w = scale * q - shift``), int8 quantisation of bf16/f16/f32, the exact decoders
  to float32, and which kernel reads which type (``FORMATS``);
* ``matvec.py``: panels of 16 rows, the matvec kernels, and :class:`Packed`, one matrix in the
  form they read;
* ``gemm.py``: the prefill's matrix product over panels (many tokens at once), decoding each
  panel's column in registers once for 16 tokens, and the MLP's gate and up in one product
  that writes their GeGLU;
* ``attention.py``: attention over the KV cache, the prefill's attention, RMSNorm, RoPE
  and the GeGLU gate;
* ``fast_model.py``: :class:`FastGemma`, which overrides six methods of :class:`Gemma`
  (``linear``, ``projections``, ``attend``, ``norm``, ``rope``, ``geglu``) and a prefill's
  MLP, and
  :class:`PackedWeights`, what they read, built once.

Every kernel is tested equal to its NumPy twin (``tests/test_kernels.py``). Numba caches the
compiled kernels; as the kernels inline helpers from other files, which Numba's cache does not
track (numba issue 1833), :mod:`tinygemma.numba_cache` stamps each kernel's cache with a hash
of every file here: editing any of them recompiles all.
"""

from ..numba_cache import release_llvm_after_loading
from ._llvm import _exp
from .attention import (KEYS_PER_PART, QUERIES, attend_cache, attend_prefill, geglu_rows,
                        rms_norm_rows, rope_rows)
from .fast_model import (KEEP_F32_BYTES, SMALL_T, FastGemma, PackedWeights, launch,
                         tune_malloc)
from .gemm import gemm_panels, gemm_rows
from .matvec import (PANEL, TILE_ELEMS, Packed, _panel_dot, decode_panels, matvec_panels,
                     matvec_stored, release_pages, stored_bytes, to_panels)
from .quant import (FORMATS, STORED, UNPACKED, decode_stored, quantize_int8_g32, unpack_k,
                    unpack_q4_0, unpack_q5_0, unpack_q6_k, unpack_q8_0)

# Process-wide, once: glibc's malloc thresholds (see tune_malloc; TINYGEMMA_MALLOPT=0 opts out)
# and LLVM's pages out of the RSS after each kernel is loaded (numba_cache.release_llvm_pages;
# TINYGEMMA_RELEASE_LLVM=0 opts out). Numba's thread count is set per calling thread, by launch().
tune_malloc()
release_llvm_after_loading()

__all__ = ["FastGemma", "FORMATS", "Packed", "PackedWeights", "attend_cache", "stored_bytes"]
