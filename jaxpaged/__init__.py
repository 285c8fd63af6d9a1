"""jaxpaged: vLLM rebuilt in pure JAX and Pallas."""
