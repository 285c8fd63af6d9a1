"""XLA compiler options chosen per compiled model step.

GEMM backend by step size. XLA's own Triton GEMMs (split-K for a few rows) read the weights of a
few-token step at about the copy bandwidth; from a few dozen rows on, cuBLAS is faster. Measured on
an H100 with Llama-3-8B decode steps (bench/RESULTS.md), Triton GEMMs against cuBLAS only: batch 1
5.68 against 5.96 ms, batch 16 6.63 against 6.80, batch 64 9.40 against 8.86, batch 256 20.22
against 19.43; nano 7,628 against 8,157 output tok/s. So a step of more than
``TRITON_GEMM_MAX_TOKENS`` tokens is compiled with XLA's Triton GEMMs turned off (other Triton
fusions and the Pallas kernels are unaffected).
"""

from __future__ import annotations

TRITON_GEMM_MAX_TOKENS = 16


def step_compiler_options(num_tokens: int, platform: str) -> dict[str, bool]:
    """Options for ``Lowered.compile`` of a model step of ``num_tokens`` tokens on ``platform``
    (``jax.default_backend()``)."""
    if platform != "gpu" or num_tokens <= TRITON_GEMM_MAX_TOKENS:
        return {}
    return {"xla_gpu_enable_triton_gemm": False}
