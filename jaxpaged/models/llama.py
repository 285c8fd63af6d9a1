"""The LLaMA family (LLaMA 1/2/3, Mistral without sliding window) in Flax nnx.

Each layer owns its weights and the layers run as an unrolled Python loop. (A ``lax.scan`` over
weights stacked along a layer axis compiles faster, but XLA then copies every layer's weights out
of the stack before its matmuls: measured on an H200, a batch-1 decode step of Llama-3-8B took
11.5 ms of device time against a 3.5 ms weight-read floor. The persistent compilation cache and
parallel warm-up compilation pay for the unrolled program instead.) The KV pool is threaded
functionally through the layers; attention goes through the single paged entry point in
``jaxpaged.attention``.

Per-layer weight layout (x @ W, inputs first), chosen so tensor parallelism can later shard heads:
  attn.wqkv  [hidden, Hkv, G + 2, D]  per KV head: its G query heads, then K, then V
  attn.wo    [Hq * D, hidden]          query heads in HF order (h = kv_head * G + g)
  mlp.w_gate_up [hidden, 2, I]         gate then up
  mlp.w_down [I, hidden]
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from jaxpaged.attention import paged_attention
from jaxpaged.attention_metadata import AttentionMetadata
from jaxpaged.config import ModelConfig
from jaxpaged.kv_cache import KVCache
from jaxpaged.compiler_options import cublas_gemms
from jaxpaged.models.rope import RotaryEmbedding
from jaxpaged.pallas_kernels.rms_norm import fused_add_rms_norm, rms_norm


def _normal(rngs: nnx.Rngs, shape: tuple[int, ...], fan_in: int, dtype) -> nnx.Param:
    return nnx.Param((jax.random.normal(rngs.params(), shape) / math.sqrt(fan_in)).astype(dtype))


class RMSNorm(nnx.Module):
    """RMSNorm (HF's rounding: normalize in f32, cast, then scale in the model dtype). With
    ``impl="reference"`` XLA fuses it into the neighbouring kernels; with "auto"/"pallas" it is one
    Pallas kernel on the GPU, fused with the residual add before it (``add_and_norm``)."""

    def __init__(self, dim: int, eps: float, dtype):
        self.weight = nnx.Param(jnp.ones((dim,), dtype))
        self.eps = eps

    def __call__(self, x: jax.Array, impl: str) -> jax.Array:  # [T, dim]
        return rms_norm(x, self.weight[...], eps=self.eps, impl=impl)

    def add_and_norm(self, x: jax.Array, residual: jax.Array, impl: str
                     ) -> tuple[jax.Array, jax.Array]:
        """[T, dim] each -> (norm(x + residual), x + residual)."""
        return fused_add_rms_norm(x, residual, self.weight[...], eps=self.eps, impl=impl)


class Attention(nnx.Module):
    def __init__(self, cfg: ModelConfig, dtype, *, rngs: nnx.Rngs):
        h, hkv, g, d = cfg.hidden_size, cfg.num_kv_heads, cfg.queries_per_kv, cfg.head_dim
        self.wqkv = _normal(rngs, (h, hkv, g + 2, d), h, dtype)
        self.bqkv = nnx.Param(jnp.zeros((hkv, g + 2, d), dtype)) if cfg.attention_bias else None
        self.wo = _normal(rngs, (cfg.num_heads * d, h), cfg.num_heads * d, dtype)
        self.bo = nnx.Param(jnp.zeros((h,), dtype)) if cfg.attention_bias else None
        self.sm_scale = 1.0 / math.sqrt(d)

    def __call__(self, x, cos, sin, kv_cache: KVCache, layer, md: AttentionMetadata, attn_impl: str):
        t = x.shape[0]
        qkv = jnp.einsum("th,hkgd->tkgd", x, self.wqkv[...])  # [T, Hkv, G + 2, D]
        if self.bqkv is not None:
            qkv = qkv + self.bqkv[...]
        # RoPE of q and k, the K/V write and attention: one entry point (two kernels on the GPU).
        out, kv_cache = paged_attention(qkv, cos, sin, kv_cache, layer, md,
                                        sm_scale=self.sm_scale, impl=attn_impl)  # [T, Hq, D]
        out = out.reshape(t, -1) @ self.wo[...]  # [T, hidden]
        if self.bo is not None:
            out = out + self.bo[...]
        return out, kv_cache


class MLP(nnx.Module):
    def __init__(self, cfg: ModelConfig, dtype, *, rngs: nnx.Rngs):
        h, i = cfg.hidden_size, cfg.intermediate_size
        self.w_gate_up = _normal(rngs, (h, 2, i), h, dtype)
        self.b_gate_up = nnx.Param(jnp.zeros((2, i), dtype)) if cfg.mlp_bias else None
        self.w_down = _normal(rngs, (i, h), i, dtype)
        self.b_down = nnx.Param(jnp.zeros((h,), dtype)) if cfg.mlp_bias else None

    def __call__(self, x: jax.Array) -> jax.Array:  # [T, hidden]
        gate_up = jnp.einsum("th,hci->tci", x, self.w_gate_up[...])  # [T, 2, I]
        if self.b_gate_up is not None:
            gate_up = gate_up + self.b_gate_up[...]
        out = (jax.nn.silu(gate_up[:, 0]) * gate_up[:, 1]) @ self.w_down[...]
        if self.b_down is not None:
            out = out + self.b_down[...]
        return out


class DecoderLayer(nnx.Module):
    def __init__(self, cfg: ModelConfig, dtype, *, rngs: nnx.Rngs):
        self.input_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)
        self.attn = Attention(cfg, dtype, rngs=rngs)
        self.post_attn_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)
        self.mlp = MLP(cfg, dtype, rngs=rngs)

    def __call__(self, h, residual, next_norm: RMSNorm, cos, sin, kv_cache, layer, md,
                 attn_impl: str, norm_impl: str):
        """h: this layer's normed input (``input_norm`` of the residual stream ``residual``) ->
        (``next_norm`` of the stream after this layer, that stream, pool). Each residual add goes
        with the norm that follows it (vLLM's layout): this layer ends with the next layer's
        ``input_norm``, or with the final norm."""
        attn_out, kv_cache = self.attn(h, cos, sin, kv_cache, layer, md, attn_impl)
        h, residual = self.post_attn_norm.add_and_norm(attn_out, residual, norm_impl)
        h, residual = next_norm.add_and_norm(self.mlp(h), residual, norm_impl)
        return h, residual, kv_cache


class LlamaForCausalLM(nnx.Module):
    """``model(token_ids, positions, kv_cache, md) -> (hidden, kv_cache)``; ``compute_logits``."""

    def __init__(self, cfg: ModelConfig, *, dtype=jnp.bfloat16, attn_impl: str = "auto",
                 rngs: nnx.Rngs):
        self.config = cfg
        self.attn_impl = attn_impl
        self.embed = nnx.Param(jax.random.normal(rngs.params(), (cfg.vocab_size, cfg.hidden_size))
                               .astype(dtype))

        self.layers = nnx.List([DecoderLayer(cfg, dtype, rngs=rngs)
                                for _ in range(cfg.num_layers)])
        self.final_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)
        self.lm_head = (None if cfg.tie_word_embeddings
                        else _normal(rngs, (cfg.hidden_size, cfg.vocab_size), cfg.hidden_size, dtype))

    def __call__(self, token_ids: jax.Array, positions: jax.Array, kv_cache: KVCache,
                 md: AttentionMetadata) -> tuple[jax.Array, KVCache]:
        """token_ids, positions: i32[T] -> hidden [T, hidden] (after the final norm)."""
        residual = self.embed[...][token_ids]  # [T, hidden]
        cos, sin = RotaryEmbedding(self.config).cos_sin(positions)  # f32[T, D]
        norm_impl = self._norm_impl(token_ids.shape[0])
        h = self.layers[0].input_norm(residual, norm_impl)
        norms_after = [layer.input_norm for layer in self.layers[1:]] + [self.final_norm]
        for index, (layer, next_norm) in enumerate(zip(self.layers, norms_after)):
            with jax.named_scope(f"layer_{index}"):
                h, residual, kv_cache = layer(h, residual, next_norm, cos, sin, kv_cache, index,
                                              md, self.attn_impl, norm_impl)
        return h, kv_cache

    def _norm_impl(self, num_tokens: int) -> str:
        """The fused add + norm kernel where the GEMMs are cuBLAS's (which read a materialized
        input anyway); XLA's own norm where its Triton GEMMs fuse the norm into their prologue
        (a custom call in between measured slower there: ``compiler_options``)."""
        return self.attn_impl if cublas_gemms(num_tokens) else "reference"

    def compute_logits(self, hidden: jax.Array) -> jax.Array:
        """hidden [N, hidden] -> f32[N, vocab]."""
        if self.lm_head is None:
            logits = hidden @ self.embed[...].T
        else:
            logits = hidden @ self.lm_head[...]
        return logits.astype(jnp.float32)
