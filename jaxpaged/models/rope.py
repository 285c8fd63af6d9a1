"""Rotary position embeddings in Hugging Face's split-half layout (no q/k permutation needed).

Frequencies follow HF's ``rope_type``s: ``default``, ``linear`` (positions divided by ``factor``) and
``llama3`` (long wavelengths divided by ``factor``, short ones kept, a smooth blend between).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from jaxpaged.models.config import ModelConfig, RopeScaling


def inverse_frequencies(head_dim: int, theta: float, scaling: RopeScaling | None) -> np.ndarray:
    """f32[head_dim // 2]: the angle per position of each rotated pair."""
    exponents = np.arange(0, head_dim, 2, dtype=np.int64).astype(np.float32) / head_dim
    inv_freq = 1.0 / (theta ** exponents)
    if scaling is None:
        return inv_freq.astype(np.float32)
    if scaling.rope_type == "linear":
        return (inv_freq / scaling.factor).astype(np.float32)
    return _llama3_scale(inv_freq, scaling).astype(np.float32)


def _llama3_scale(inv_freq: np.ndarray, s: RopeScaling) -> np.ndarray:
    low_freq_wavelen = s.original_max_position_embeddings / s.low_freq_factor
    high_freq_wavelen = s.original_max_position_embeddings / s.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = np.where(wavelen > low_freq_wavelen, inv_freq / s.factor, inv_freq)
    smooth = ((s.original_max_position_embeddings / wavelen - s.low_freq_factor)
              / (s.high_freq_factor - s.low_freq_factor))
    blended = (1 - smooth) * scaled / s.factor + smooth * scaled
    is_medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
    return np.where(is_medium, blended, scaled)


class RotaryEmbedding:
    """cos/sin tables of RoPE at integer positions ``[T]`` (applied by ``jaxpaged.models.attention``)."""

    def __init__(self, config: ModelConfig):
        self.inv_freq = inverse_frequencies(config.head_dim, config.rope_theta, config.rope_scaling)

    def cos_sin(self, positions: jax.Array) -> tuple[jax.Array, jax.Array]:
        """f32[T, head_dim] cosines and sines, computed in f32 like HF."""
        angles = positions.astype(jnp.float32)[:, None] * jnp.asarray(self.inv_freq)[None, :]
        angles = jnp.concatenate([angles, angles], axis=-1)
        return jnp.cos(angles), jnp.sin(angles)
