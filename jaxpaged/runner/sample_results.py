"""A sampler step's results as one device array, so the host copies them in one transfer.

The sampler returns the sampled ids i32[B] and, when a row asked for logprobs, four more arrays
(``SampleLogprobs``). Handed back as they are, each is its own device-to-host copy to queue at
dispatch and to wait for at fetch; a beam search step, whose rows all ask for logprobs, would move
five arrays per step. ``pack_results`` lays them side by side in one i32[B, K] array on the device
(float32 values as their bits) and ``unpack_results`` cuts the host copy back into views, without
copying::

    column:  0          1 .. N     N+1 .. 2N              2N+1                     2N+2
             sampled id top ids    top logprobs (f32 bits) sampled logprob (bits)   sampled rank

K = 1 when no row asked for logprobs, else 2N + 3 (N: the step's top-N bucket).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jaxpaged.runner.step_logprobs import LogprobArrays
from jaxpaged.sample.sampler import SamplerOutput


def pack_results(out: SamplerOutput) -> jax.Array:
    """(jit-traceable) SamplerOutput [B] -> i32[B, K] in the layout above."""
    ids = out.token_ids.astype(jnp.int32)[:, None]  # [B, 1]
    logprobs = out.logprobs
    if logprobs is None:
        return ids

    def bits(values: jax.Array) -> jax.Array:
        return jax.lax.bitcast_convert_type(values.astype(jnp.float32), jnp.int32)

    return jnp.concatenate([
        ids, logprobs.top_ids.astype(jnp.int32), bits(logprobs.top_logprobs),
        bits(logprobs.sampled_logprob)[:, None],
        logprobs.sampled_rank.astype(jnp.int32)[:, None]], axis=1)


def unpack_results(host: np.ndarray) -> tuple[np.ndarray, LogprobArrays | None]:
    """i32[B, K] host copy of ``pack_results`` -> (sampled ids i32[B], the logprobs or None),
    views of ``host``."""
    if host.ndim != 2 or host.dtype != np.int32:
        raise ValueError(f"expected i32[B, K] sampler results, got {host.dtype}{list(host.shape)}")
    width = host.shape[1]
    if width == 1:
        return host[:, 0], None
    if width < 3 or (width - 3) % 2:
        raise ValueError(f"sampler results of {width} columns: expected 1 or 2N + 3")
    n = (width - 3) // 2
    return host[:, 0], LogprobArrays(
        top_ids=host[:, 1:1 + n], top_logprobs=host[:, 1 + n:1 + 2 * n].view(np.float32),
        sampled_logprob=host[:, 1 + 2 * n].view(np.float32), sampled_rank=host[:, 2 + 2 * n])
