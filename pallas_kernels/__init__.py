"""Pallas kernels for paged attention: one op per file, each with its jnp reference."""
