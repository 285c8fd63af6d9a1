"""Sampling on the device: per-row sampling tensors, the jitted sampler, prompt logprobs."""
