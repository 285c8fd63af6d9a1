"""The model's projections: ``x @ W`` for bf16/f32 weights, or quantized weights with scales.

A ``Linear`` is static (shapes, the quantization format, which matmul kernel runs); the module
that uses it holds the parameters under the names the model tree always had (``wqkv``, ``wo``,
``w_gate_up``, ``w_down``), plus, when quantized, ``<name>_scale``: so a bf16 model's tree, its
checkpoints and its sharding rules are unchanged, and a quantized one only adds scale leaves.

Layout: a bf16 ``weight`` is ``[*in, *out]``; quantized, ``weight [*out, *in]`` holds the codes
(``float8_e4m3fn`` or ``int8``) output-major, the layout fp8 GEMMs read (see
``pallas_kernels.quant_matmul``), and ``scale f32[*out]`` one scale per output channel, so a
tensor-parallel split of the output axes would split the scales the same way (quantized weights
under tensor parallelism are refused today; ``models.sharding``'s rules name the bf16 layout, so
they must rotate the codes' axes when that lands). The matmul flattens ``*out`` / ``*in`` to
N / K (free reshapes) and runs the kernel that ``pallas_kernels.quant_matmul.choose_kernel``
picks for the step's token count.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import nnx

from jaxpaged.pallas_kernels.quant_matmul import (MATMUL_KERNELS, QUANT_FORMATS, quant_matmul,
                                                  quantize_weight)

# The projections that are quantized (embeddings, norms and lm_head stay in the model dtype).
QUANTIZED_WEIGHTS = ("wqkv", "wo", "w_gate_up", "w_down")
SCALE_SUFFIX = "_scale"


@dataclasses.dataclass(frozen=True)
class QuantConfig:
    """``method``: "fp8" (E4M3 codes) or "int8"; ``kernel``: a ``MATMUL_KERNELS`` name ("auto":
    the per-token-count table of ``quant_matmul``)."""

    method: str
    kernel: str = "auto"

    def __post_init__(self) -> None:
        if self.method not in QUANT_FORMATS:
            raise ValueError(f"quantization must be one of {QUANT_FORMATS}, got {self.method!r}")
        if self.kernel not in MATMUL_KERNELS:
            raise ValueError(f"quantized matmul kernel must be one of {MATMUL_KERNELS}, "
                             f"got {self.kernel!r}")


def scale_name(weight_name: str) -> str:
    return weight_name + SCALE_SUFFIX


@dataclasses.dataclass(frozen=True)
class Linear:
    """``x [T, K] -> [T, *out]`` with ``weight [K, *out]`` (K = the one input axis)."""

    quant: QuantConfig | None = None

    def init(self, rngs: nnx.Rngs, shape: tuple[int, ...], dtype
             ) -> tuple[nnx.Param, nnx.Param | None]:
        """(weight, scale or None): normal values / sqrt(fan_in), quantized when configured."""
        w = jax.random.normal(rngs.params(), shape) / math.sqrt(shape[0])
        if self.quant is None:
            return nnx.Param(w.astype(dtype)), None
        codes, scale = quantize_weight(w, self.quant.method)
        return nnx.Param(codes), nnx.Param(scale)

    def __call__(self, x: jax.Array, weight: nnx.Param, scale: nnx.Param | None) -> jax.Array:
        w = weight[...]  # [K, *out]; quantized: codes [*out, K]
        if scale is None:
            return jnp.tensordot(x, w, axes=1)  # [T, *out]
        k, out = w.shape[-1], w.shape[:-1]
        y = quant_matmul(x, w.reshape(-1, k), scale[...].reshape(-1), kernel=self.quant.kernel)
        return y.reshape(x.shape[0], *out)
