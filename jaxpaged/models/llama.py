"""The LLaMA family (LLaMA 1/2/3, Mistral without sliding window) in Flax nnx.

Layers are stacked along a leading ``num_layers`` axis and run with ``jax.lax.scan``, so compile
time stays flat in depth. The KV pool is threaded functionally through the scan carry; attention
goes through the single paged entry point in ``jaxpaged.attention``.

Weight layout (x @ W, inputs first), chosen so tensor parallelism can later shard heads cleanly:
  attn.wqkv  [L, hidden, Hkv, G + 2, D]  per KV head: its G query heads, then K, then V
  attn.wo    [L, Hq * D, hidden]          query heads in HF order (h = kv_head * G + g)
  mlp.w_gate_up [L, hidden, 2, I]         gate then up
  mlp.w_down [L, I, hidden]
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
    def __init__(self, cfg: ModelConfig, dtype, *, rngs: nnx.Rngs):
        h, hkv, g, d = cfg.hidden_size, cfg.num_kv_heads, cfg.queries_per_kv, cfg.head_dim
        self.wqkv = _normal(rngs, (h, hkv, g + 2, d), h, dtype)
        self.bqkv = nnx.Param(jnp.zeros((hkv, g + 2, d), dtype)) if cfg.attention_bias else None
        self.wo = _normal(rngs, (cfg.num_heads * d, h), cfg.num_heads * d, dtype)
        self.bo = nnx.Param(jnp.zeros((h,), dtype)) if cfg.attention_bias else None
        self.queries_per_kv = g
        self.sm_scale = 1.0 / math.sqrt(d)

    def __call__(self, x, cos, sin, kv_cache: KVCache, layer, md: AttentionMetadata, attn_impl: str):
        t = x.shape[0]
        g = self.queries_per_kv
        qkv = jnp.einsum("th,hkgd->tkgd", x, self.wqkv[...])  # [T, Hkv, G + 2, D]
        if self.bqkv is not None:
            qkv = qkv + self.bqkv[...]
        q = qkv[:, :, :g].reshape(t, -1, qkv.shape[-1])  # [T, Hq, D]
        k, v = qkv[:, :, g], qkv[:, :, g + 1]  # [T, Hkv, D]
        q = RotaryEmbedding.apply(q, cos, sin)
        k = RotaryEmbedding.apply(k, cos, sin)
        out, kv_cache = paged_attention(q, k, v, kv_cache, layer, md, sm_scale=self.sm_scale,
                                        impl=attn_impl)  # [T, Hq, D]
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

    def __call__(self, x, cos, sin, kv_cache, layer, md, attn_impl):
        attn_out, kv_cache = self.attn(self.input_norm(x), cos, sin, kv_cache, layer, md, attn_impl)
        x = x + attn_out
        x = x + self.mlp(self.post_attn_norm(x))
        return x, kv_cache


class LlamaForCausalLM(nnx.Module):
    """``model(token_ids, positions, kv_cache, md) -> (hidden, kv_cache)``; ``compute_logits``."""

    def __init__(self, cfg: ModelConfig, *, dtype=jnp.bfloat16, attn_impl: str = "auto",
                 rngs: nnx.Rngs):
        self.config = cfg
        self.attn_impl = attn_impl
        self.embed = nnx.Param(jax.random.normal(rngs.params(), (cfg.vocab_size, cfg.hidden_size))
                               .astype(dtype))

        @nnx.split_rngs(splits=cfg.num_layers)
        @nnx.vmap(in_axes=(0,), out_axes=0)
        def make_layers(rngs: nnx.Rngs) -> DecoderLayer:
            return DecoderLayer(cfg, dtype, rngs=rngs)

        self.layers = make_layers(rngs)
        self.final_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)
        self.lm_head = (None if cfg.tie_word_embeddings
                        else _normal(rngs, (cfg.hidden_size, cfg.vocab_size), cfg.hidden_size, dtype))

    def __call__(self, token_ids: jax.Array, positions: jax.Array, kv_cache: KVCache,
                 md: AttentionMetadata) -> tuple[jax.Array, KVCache]:
        """token_ids, positions: i32[T] -> hidden [T, hidden] (after the final norm)."""
        x = self.embed[...][token_ids]  # [T, hidden]
        cos, sin = RotaryEmbedding(self.config).cos_sin(positions)  # f32[T, D]
        graphdef, stacked = nnx.split(self.layers)

        def one_layer(carry, layer_and_index):
            x, kv_cache = carry
            layer_state, index = layer_and_index
            layer = nnx.merge(graphdef, layer_state)
            with jax.named_scope("decoder_layer"):
                x, kv_cache = layer(x, cos, sin, kv_cache, index, md, self.attn_impl)
            return (x, kv_cache), None

        indices = jnp.arange(self.config.num_layers, dtype=jnp.int32)
        (x, kv_cache), _ = jax.lax.scan(one_layer, (x, kv_cache), (stacked, indices))
        return self.final_norm(x), kv_cache

    def compute_logits(self, hidden: jax.Array) -> jax.Array:
        """hidden [N, hidden] -> f32[N, vocab]."""
        if self.lm_head is None:
            logits = hidden @ self.embed[...].T
        else:
            logits = hidden @ self.lm_head[...]
        return logits.astype(jnp.float32)
