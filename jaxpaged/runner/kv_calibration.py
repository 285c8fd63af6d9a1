"""``calculate_kv_scales``: per-layer fp8 KV scales estimated from one calibration forward pass.

The model runs a calibration prompt as one prefill into a small pool of the model's own dtype
(never the engine's pool), so the pool then holds exactly the values the fp8 pool would have to
store: K after RoPE, and V. Each layer's scale follows vLLM's rule for the same flag, amax over the
prompt divided by a fixed range (200 for K, 100 for V: headroom below fp8 e4m3's 448 for values
larger than the calibration prompt's). Deterministic: the prompt is a fixed English text when
there is a tokenizer, else fixed pseudo-random ids.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxpaged.converters.kv_scales import KVScales
from jaxpaged.models.attention_metadata import AttentionMetadata
from jaxpaged.models.kv_cache import KVCache
from jaxpaged.models.llama import LlamaForCausalLM
from jaxpaged.models.sharding import kv_cache_shardings

K_SCALE_RANGE = 200.0  # vLLM's K_SCALE_CONSTANT
V_SCALE_RANGE = 100.0  # vLLM's V_SCALE_CONSTANT
MAX_CALIBRATION_TOKENS = 256

CALIBRATION_TEXT = (
    "The history of science is the study of how people came to understand the natural world. "
    "Early astronomers tracked the motion of the planets, physicians described the body, and "
    "engineers built bridges, clocks and ships long before anyone could explain why they worked. "
    "In 1905 a patent clerk published four papers that changed physics; today a phone holds "
    "more computing power than the machines that guided the first flights to the Moon. "
    "def add(a, b):\n    return a + b\n\nprint(add(2, 3))  # 5\n"
    "Questions: What is the capital of France? How many legs does a spider have? 7 * 8 = 56.")


def calibration_token_ids(tokenizer, vocab_size: int, max_tokens: int) -> np.ndarray:
    """i32[T]: T a power of two <= ``max_tokens`` (the kernels' tiles), the text repeated to fill it."""
    length = 1 << (max(min(MAX_CALIBRATION_TOKENS, max_tokens), 1).bit_length() - 1)
    if tokenizer is not None:
        ids = np.asarray(tokenizer.encode(CALIBRATION_TEXT), np.int64)
    else:
        ids = np.random.default_rng(0).integers(0, vocab_size, MAX_CALIBRATION_TOKENS)
    return np.resize(ids, length).astype(np.int32)


def calibrate_kv_scales(model: LlamaForCausalLM, token_ids: np.ndarray, *,
                        block_size: int) -> KVScales:
    """Scales for every layer from one prefill of ``token_ids`` (i32[T])."""
    cfg = model.config
    t = token_ids.shape[0]
    num_pages = -(-t // block_size)
    cache = KVCache.zeros(num_layers=cfg.num_layers, num_blocks=num_pages + 1,
                          block_size=block_size, num_kv_heads=cfg.num_kv_heads,
                          head_dim=cfg.head_dim, dtype=model.embed[...].dtype,
                          **kv_cache_shardings(model.attention.mesh))
    md = AttentionMetadata(
        slot_mapping=jnp.arange(t, dtype=jnp.int32) + block_size,  # pages 1.. (0 is the null block)
        block_tables=jnp.arange(1, num_pages + 1, dtype=jnp.int32)[None],  # [1, pages]
        seq_lens=jnp.array([t], jnp.int32), query_start_loc=jnp.array([0, t], jnp.int32),
        max_query_len=t)
    graphdef, state = nnx.split(model)
    k_amax, v_amax = _layer_amax(graphdef, state, jnp.asarray(token_ids), cache, md)
    return KVScales(k=_scales(k_amax, K_SCALE_RANGE), v=_scales(v_amax, V_SCALE_RANGE))


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _layer_amax(graphdef, state, token_ids: jax.Array, cache: KVCache, md: AttentionMetadata):
    """-> (f32[L], f32[L]): max |K| and max |V| of each layer over the prompt."""
    model = nnx.merge(graphdef, state)
    positions = jnp.arange(token_ids.shape[0], dtype=jnp.int32)
    _, cache = model(token_ids, positions, cache, md)
    per_layer = lambda pool: jnp.abs(pool.astype(jnp.float32)).reshape(  # noqa: E731
        cache.num_layers, -1).max(axis=1)
    return per_layer(cache.k), per_layer(cache.v)


def _scales(amax: jax.Array, value_range: float) -> tuple[float, ...]:
    """A layer whose values are all zero keeps scale 1.0."""
    amax = np.asarray(amax, np.float64)
    return tuple(float(a / value_range) if a > 0 else 1.0 for a in amax)
