"""XLA compiler options chosen per compiled model step.

GEMM backend by step size. XLA's own Triton GEMMs (split-K for a few rows) read the weights of a
few-token step at about the copy bandwidth; from a few dozen rows on, cuBLAS is faster. Measured on
an H100 with Llama-3-8B decode steps (bench/RESULTS.md), Triton GEMMs against cuBLAS only: batch 1
5.68 against 5.96 ms, batch 16 6.63 against 6.80, batch 64 9.40 against 8.86, batch 256 20.22
against 19.43; nano 7,628 against 8,157 output tok/s. So a step of more than
``TRITON_GEMM_MAX_TOKENS`` tokens is compiled with XLA's Triton GEMMs turned off (other Triton
fusions and the Pallas kernels are unaffected).

No rematerialization. XLA's GPU scheduler estimates a step's peak memory with the donated KV pool
counted as both an input and an output, finds it far above the card (~141 GiB for a 47 GiB pool
and 16 GB of weights on an 80 GB H100), and its rematerialization pass then recomputes values
(residual adds, even a GEMM) in a vain attempt to get under a limit it can never reach; the real
peak is the pool plus weights plus a few activations. The pass's limit is a percentage of the
device memory, ``xla_gpu_memory_limit_slop_factor``, so a large factor switches it off for model
steps. Measured on an H100 with nano (bench/RESULTS.md): 8,198 output tok/s against 8,025 and
7,926 without it in the same call (across machines within the ~3% run-to-run spread), and 19.7 s
against 27.9 s of compilation.
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
