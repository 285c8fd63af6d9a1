"""Host-side scheduling, pure Python (no jax): requests, the block manager, the scheduler and
what it hands the runner (``SchedulerOutput``) and takes back (``update_from_output``)."""
