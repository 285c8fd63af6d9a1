"""Pallas kernels of the model's step: one op per file, each with its jnp reference.

- ``rope_and_write_kv``: RoPE of q and k from the fused QKV projection, and the K/V store into
  the pool, in place, as one kernel (``rope_kv_write.py``; what the model uses).
- ``write_kv``: store a step's new K/V into their pool slots, in place (``kv_write.py``).
- ``ragged_paged_attention``: chunked prefill, prefix-cache hits, decode and mixed batches in one
  call; decode-only batches (``max_query_len == 1``) take the decode kernel
  (``ragged_paged_attention.py``).
- ``paged_decode_attention``: one query token per sequence, split-K (``paged_decode_attention.py``).
- ``quant_matmul``: ``x @ W`` with fp8 / int8 weight codes and per-output-channel scales: a
  W8A16 and a W8A8 (fp8 x fp8) Pallas kernel and XLA candidates, chosen per token count
  (``quant_matmul.py``).

All four take fp8 pools (``float8_e4m3fn`` / ``float8_e5m2``) with per-layer ``k_scale`` /
``v_scale`` operands: quantized on store, dequantized in registers (``kv_quant.py``).

Every entry point takes ``impl`` ("auto": Pallas on a CUDA GPU, else the reference) and
``interpret`` (run the Pallas kernel on the CPU). ``backend.py`` is the only file that knows the
Pallas GPU backend (Triton-style today).
"""

from jaxpaged.pallas_kernels.backend import on_gpu
from jaxpaged.pallas_kernels.kv_write import write_kv, write_kv_reference
from jaxpaged.pallas_kernels.paged_decode_attention import (DecodeTuning, choose_num_kv_splits,
                                                            paged_decode_attention,
                                                            paged_decode_attention_reference)
from jaxpaged.pallas_kernels.quant_matmul import (MatmulTuning, quant_matmul,
                                                  quant_matmul_reference)
from jaxpaged.pallas_kernels.ragged_paged_attention import (RaggedTuning, ragged_paged_attention,
                                                            ragged_paged_attention_reference)
from jaxpaged.pallas_kernels.rope_kv_write import (apply_rope, rope_and_write_kv,
                                                   rope_and_write_kv_reference)

__all__ = [
    "DecodeTuning",
    "MatmulTuning",
    "RaggedTuning",
    "apply_rope",
    "choose_num_kv_splits",
    "on_gpu",
    "paged_decode_attention",
    "paged_decode_attention_reference",
    "quant_matmul",
    "quant_matmul_reference",
    "ragged_paged_attention",
    "ragged_paged_attention_reference",
    "rope_and_write_kv",
    "rope_and_write_kv_reference",
    "write_kv",
    "write_kv_reference",
]
