"""Checkpoint conversion (Hugging Face -> jaxpaged) and the tiny-checkpoint builder."""
