"""XLA compiler options chosen per compiled model step.

GEMM backend by step size. XLA's own Triton GEMMs (split-K for a few rows) read the weights of a
few-token step at about the copy bandwidth; from a few dozen rows on, cuBLAS is faster (Llama-3-8B
decode steps at batch 1 to 256 and nano, Triton GEMMs against cuBLAS only: bench/RESULTS.md,
"third run"). So a step of more than
``TRITON_GEMM_MAX_TOKENS`` tokens is compiled with XLA's Triton GEMMs turned off (other Triton
fusions and the Pallas kernels are unaffected).

No rematerialization. XLA's GPU scheduler estimates a step's peak memory with the donated KV pool
counted as both an input and an output, finds it far above the card (about twice the pool plus
the weights), and its rematerialization pass then recomputes values
(residual adds, even a GEMM) in a vain attempt to get under a limit it can never reach; the real
peak is the pool plus weights plus a few activations. The pass's limit is a percentage of the
device memory, ``xla_gpu_memory_limit_slop_factor``, so a large factor switches it off for model
steps. Measured with nano in one GPU call: a little faster and a third less compile time
(bench/RESULTS.md, "fourth run").
"""

from __future__ import annotations

from typing import Any

TRITON_GEMM_MAX_TOKENS = 16
NO_REMAT_SLOP_FACTOR = 1000  # percent: a limit ten times the card's memory, never reached


def step_compiler_options(num_tokens: int, platform: str) -> dict[str, Any]:
    """Options for ``Lowered.compile`` of a model step of ``num_tokens`` tokens on ``platform``
    (``jax.default_backend()``)."""
    if platform != "gpu":
        return {}
    options: dict[str, Any] = {"xla_gpu_memory_limit_slop_factor": NO_REMAT_SLOP_FACTOR}
    if num_tokens > TRITON_GEMM_MAX_TOKENS:
        options["xla_gpu_enable_triton_gemm"] = False
    return options
