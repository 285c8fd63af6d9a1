"""What the HTTP side needs to know about the engine behind it, as plain picklable values.

The front end reads these once at start-up: from the in-process ``LLMEngine``
(``EngineFacts.of``), or from an engine replica in another process (``jaxpaged.distributed``), so
that ``build_app`` never needs the engine object itself.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from jaxpaged.engine.llm_engine import LLMEngine


@dataclasses.dataclass(frozen=True)
class EngineFacts:
    tokenizer_dir: str | None  # where the HTTP side loads its own tokenizer; None: no tokenizer
    max_model_len: int
    vocab_size: int
    max_num_seqs: int
    max_logprobs: int
    block_size: int  # tokens per KV block (the replica router hashes whole blocks)
    scheduling_policy: str
    diff_sampling_param: dict[str, Any]  # the model's sampling defaults (generation config)
    caps_max_tokens: bool  # a max_new_tokens from a directory or the override caps requests

    @classmethod
    def of(cls, engine: LLMEngine) -> EngineFacts:
        config = engine.config
        caps = (config.generation_config not in ("auto", "vllm")
                or "max_new_tokens" in config.override_generation_config)
        return cls(tokenizer_dir=None if engine.tokenizer is None
                   else (config.tokenizer or config.model),
                   max_model_len=engine.max_model_len,
                   vocab_size=engine.model_config.vocab_size,
                   max_num_seqs=engine.max_num_seqs, max_logprobs=config.max_logprobs,
                   block_size=config.block_size, scheduling_policy=config.scheduling_policy,
                   diff_sampling_param=dict(engine.get_diff_sampling_param()),
                   caps_max_tokens=caps)
