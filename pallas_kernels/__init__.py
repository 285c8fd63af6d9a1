"""Pallas kernels for paged attention: one op per file, each with its jnp reference.

- ``write_kv``: store a step's new K/V into their pool slots, in place (``kv_write.py``).
- ``ragged_paged_attention``: chunked prefill, prefix-cache hits, decode and mixed batches in one
  call; decode-only batches (``max_query_len == 1``) take the decode kernel
  (``ragged_paged_attention.py``).
- ``paged_decode_attention``: one query token per sequence, split-K (``paged_decode_attention.py``).

Every entry point takes ``impl`` ("auto": Pallas on a CUDA GPU, else the reference) and
``interpret`` (run the Pallas kernel on the CPU). ``backend.py`` is the only file that knows the
Pallas GPU backend (Triton-style today).
"""

from .backend import on_gpu
from .kv_write import write_kv, write_kv_reference
from .paged_decode_attention import (DecodeTuning, choose_num_kv_splits, paged_decode_attention,
                                     paged_decode_attention_reference)
from .ragged_paged_attention import (RaggedTuning, ragged_paged_attention,
                                     ragged_paged_attention_reference)

__all__ = [
    "DecodeTuning",
    "RaggedTuning",
    "choose_num_kv_splits",
    "on_gpu",
    "paged_decode_attention",
    "paged_decode_attention_reference",
    "ragged_paged_attention",
    "ragged_paged_attention_reference",
    "write_kv",
    "write_kv_reference",
]
