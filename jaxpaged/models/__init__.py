"""Model definitions (Flax nnx)."""
