"""The device side of a step (vLLM's worker): packing a ``SchedulerOutput`` into padded step
inputs, the bucket ladder of step shapes, compiling and caching the step programs, KV sizing."""
