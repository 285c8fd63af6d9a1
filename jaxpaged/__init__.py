"""jaxpaged: vLLM rebuilt in pure JAX and Pallas.

``from jaxpaged import LLM, SamplingParams`` works like vLLM's.
"""

import os

# jaxpaged uses transformers only for tokenizers; its "PyTorch was not found" advice is noise here.
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

from jaxpaged.llm import LLM  # noqa: E402
from jaxpaged.outputs import CompletionOutput, RequestOutput  # noqa: E402
from jaxpaged.sampling_params import SamplingParams  # noqa: E402

__all__ = ["LLM", "SamplingParams", "RequestOutput", "CompletionOutput"]
