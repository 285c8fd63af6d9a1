"""The LLaMA family (LLaMA 1/2/3, Mistral without sliding window) in Flax nnx.

Each layer owns its weights and the layers run as an unrolled Python loop. (A ``lax.scan`` over
weights stacked along a layer axis compiles faster, but XLA then copies every layer's weights out
of the stack before its matmuls: a batch-1 decode step of Llama-3-8B measured at over three times
its weight-read floor, bench/RESULTS.md. The persistent compilation cache and
parallel warm-up compilation pay for the unrolled program instead.) The KV pool is threaded
functionally through the layers; attention goes through the single paged entry point in
``jaxpaged.models.attention``.

Per-layer weight layout (x @ W, inputs first), chosen so tensor parallelism shards heads
(``models.sharding``):
  attn.wqkv  [hidden, Hkv, G + 2, D]  per KV head: its G query heads, then K, then V
  attn.wo    [Hq * D, hidden]          query heads in HF order (h = kv_head * G + g)
  mlp.w_gate_up [hidden, 2, I]         gate then up
  mlp.w_down [I, hidden]
Quantized models (``quant``) hold codes of the same shapes in these four, and one f32 scale per
output channel beside each (``wqkv_scale [Hkv, G + 2, D]``, ...; see ``jaxpaged.models.linear``).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from jaxpaged.models.attention import PagedAttention
from jaxpaged.models.attention_metadata import AttentionMetadata
from jaxpaged.models.config import ModelConfig
from jaxpaged.models.kv_cache import KVCache
from jaxpaged.models.linear import Linear, QuantConfig
from jaxpaged.models.rope import RotaryEmbedding


def _normal(rngs: nnx.Rngs, shape: tuple[int, ...], fan_in: int, dtype) -> nnx.Param:
    return nnx.Param((jax.random.normal(rngs.params(), shape) / math.sqrt(fan_in)).astype(dtype))


class RMSNorm(nnx.Module):
    def __init__(self, dim: int, eps: float, dtype):
        self.weight = nnx.Param(jnp.ones((dim,), dtype))
        self.eps = eps

    def __call__(self, x: jax.Array) -> jax.Array:  # [T, dim]
        x32 = x.astype(jnp.float32)
        x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return self.weight[...] * x32.astype(x.dtype)


class Attention(nnx.Module):
    def __init__(self, cfg: ModelConfig, dtype, *, rngs: nnx.Rngs,
                 quant: QuantConfig | None = None):
        h, hkv, g, d = cfg.hidden_size, cfg.num_kv_heads, cfg.queries_per_kv, cfg.head_dim
        self.linear = Linear(quant)
        self.wqkv, self.wqkv_scale = self.linear.init(rngs, (h, hkv, g + 2, d), dtype)
        self.bqkv = nnx.Param(jnp.zeros((hkv, g + 2, d), dtype)) if cfg.attention_bias else None
        self.wo, self.wo_scale = self.linear.init(rngs, (cfg.num_heads * d, h), dtype)
        self.bo = nnx.Param(jnp.zeros((h,), dtype)) if cfg.attention_bias else None
        self.sm_scale = 1.0 / math.sqrt(d)

    def __call__(self, x, cos, sin, kv_cache: KVCache, layer, md: AttentionMetadata,
                 attention: PagedAttention):
        t = x.shape[0]
        qkv = self.linear(x, self.wqkv, self.wqkv_scale)  # [T, Hkv, G + 2, D]
        if self.bqkv is not None:
            qkv = qkv + self.bqkv[...]
        # RoPE of q and k, the K/V write and attention: one entry point (two kernels on the GPU).
        out, kv_cache = attention(qkv, cos, sin, kv_cache, layer, md,
                                  sm_scale=self.sm_scale)  # [T, Hq, D]
        out = self.linear(out.reshape(t, -1), self.wo, self.wo_scale)  # [T, hidden]
        if self.bo is not None:
            out = out + self.bo[...]
        return out, kv_cache


class MLP(nnx.Module):
    def __init__(self, cfg: ModelConfig, dtype, *, rngs: nnx.Rngs,
                 quant: QuantConfig | None = None):
        h, i = cfg.hidden_size, cfg.intermediate_size
        self.linear = Linear(quant)
        self.w_gate_up, self.w_gate_up_scale = self.linear.init(rngs, (h, 2, i), dtype)
        self.b_gate_up = nnx.Param(jnp.zeros((2, i), dtype)) if cfg.mlp_bias else None
        self.w_down, self.w_down_scale = self.linear.init(rngs, (i, h), dtype)
        self.b_down = nnx.Param(jnp.zeros((h,), dtype)) if cfg.mlp_bias else None

    def __call__(self, x: jax.Array) -> jax.Array:  # [T, hidden]
        gate_up = self.linear(x, self.w_gate_up, self.w_gate_up_scale)  # [T, 2, I]
        if self.b_gate_up is not None:
            gate_up = gate_up + self.b_gate_up[...]
        hidden = jax.nn.silu(gate_up[:, 0]) * gate_up[:, 1]  # [T, I]
        out = self.linear(hidden, self.w_down, self.w_down_scale)
        if self.b_down is not None:
            out = out + self.b_down[...]
        return out


class DecoderLayer(nnx.Module):
    def __init__(self, cfg: ModelConfig, dtype, *, rngs: nnx.Rngs,
                 quant: QuantConfig | None = None):
        self.input_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)
        self.attn = Attention(cfg, dtype, rngs=rngs, quant=quant)
        self.post_attn_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)
        self.mlp = MLP(cfg, dtype, rngs=rngs, quant=quant)

    def __call__(self, x, cos, sin, kv_cache, layer, md, attention):
        attn_out, kv_cache = self.attn(self.input_norm(x), cos, sin, kv_cache, layer, md, attention)
        x = x + attn_out
        x = x + self.mlp(self.post_attn_norm(x))
        return x, kv_cache


class LlamaForCausalLM(nnx.Module):
    """``model(token_ids, positions, kv_cache, md) -> (hidden, kv_cache)``; ``compute_logits``."""

    def __init__(self, cfg: ModelConfig, *, dtype=jnp.bfloat16, attn_impl: str = "auto",
                 mesh: jax.sharding.Mesh | None = None, rngs: nnx.Rngs,
                 quant: QuantConfig | None = None):
        self.config = cfg
        self.attn_impl = attn_impl
        # per shard under tensor parallelism (mesh set; models.tensor_parallel)
        self.attention = PagedAttention(attn_impl, mesh)
        self.embed = nnx.Param(jax.random.normal(rngs.params(), (cfg.vocab_size, cfg.hidden_size))
                               .astype(dtype))

        self.layers = nnx.List([DecoderLayer(cfg, dtype, rngs=rngs, quant=quant)
                                for _ in range(cfg.num_layers)])
        self.final_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)
        self.lm_head = (None if cfg.tie_word_embeddings
                        else _normal(rngs, (cfg.hidden_size, cfg.vocab_size), cfg.hidden_size, dtype))

    def __call__(self, token_ids: jax.Array, positions: jax.Array, kv_cache: KVCache,
                 md: AttentionMetadata) -> tuple[jax.Array, KVCache]:
        """token_ids, positions: i32[T] -> hidden [T, hidden] (after the final norm)."""
        x = self.embed[...][token_ids]  # [T, hidden]
        cos, sin = RotaryEmbedding(self.config).cos_sin(positions)  # f32[T, D]
        for index, layer in enumerate(self.layers):
            with jax.named_scope(f"layer_{index}"):
                x, kv_cache = layer(x, cos, sin, kv_cache, index, md, self.attention)
        return self.final_norm(x), kv_cache

    def compute_logits(self, hidden: jax.Array) -> jax.Array:
        """hidden [N, hidden] -> f32[N, vocab]."""
        if self.lm_head is None:
            logits = hidden @ self.embed[...].T
        else:
            logits = hidden @ self.lm_head[...]
        return logits.astype(jnp.float32)
