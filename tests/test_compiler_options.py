"""Per-step XLA compiler options: Triton GEMMs for few-token steps, cuBLAS above, GPU only."""

from jaxpaged.compiler_options import TRITON_GEMM_MAX_TOKENS, step_compiler_options


def test_gpu_steps_above_the_threshold_turn_triton_gemms_off():
    assert step_compiler_options(1, "gpu") == {}
    assert step_compiler_options(TRITON_GEMM_MAX_TOKENS, "gpu") == {}
    off = {"xla_gpu_enable_triton_gemm": False}
    assert step_compiler_options(TRITON_GEMM_MAX_TOKENS + 1, "gpu") == off
    assert step_compiler_options(8192, "gpu") == off


def test_other_platforms_get_no_options():
    for tokens in (1, 256, 8192):
        assert step_compiler_options(tokens, "cpu") == {}
