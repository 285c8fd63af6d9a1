"""Per-step XLA compiler options: Triton GEMMs for few-token steps, cuBLAS above, no
rematerialization; GPU only."""

import jax
import jax.numpy as jnp

from jaxpaged.runner.compiler_options import (NO_REMAT_SLOP_FACTOR, TRITON_GEMM_MAX_TOKENS,
                                       step_compiler_options)

NO_REMAT = {"xla_gpu_memory_limit_slop_factor": NO_REMAT_SLOP_FACTOR}


def test_gpu_steps_above_the_threshold_turn_triton_gemms_off():
    assert step_compiler_options(1, "gpu") == NO_REMAT
    assert step_compiler_options(TRITON_GEMM_MAX_TOKENS, "gpu") == NO_REMAT
    off = {**NO_REMAT, "xla_gpu_enable_triton_gemm": False}
    assert step_compiler_options(TRITON_GEMM_MAX_TOKENS + 1, "gpu") == off
    assert step_compiler_options(8192, "gpu") == off


def test_other_platforms_get_no_options():
    for tokens in (1, 256, 8192):
        assert step_compiler_options(tokens, "cpu") == {}


def test_xla_accepts_every_gpu_option_by_name():
    """The names are XLA debug options: a misspelt one makes ``compile`` raise (the options are
    parsed on every platform, so the CPU checks the spelling of the GPU ones)."""
    lowered = jax.jit(lambda x: x * 2.0).lower(jnp.ones((4,), jnp.float32))
    compiled = lowered.compile(step_compiler_options(8192, "gpu"))
    assert float(compiled(jnp.ones((4,), jnp.float32))[0]) == 2.0
