"""jaxpaged: vLLM rebuilt in pure JAX and Pallas.

``from jaxpaged import LLM, SamplingParams`` works like vLLM's.
"""

import logging
import os

# jaxpaged uses transformers only for tokenizers; its "PyTorch was not found" advice is noise here.
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")


def _configure_logging() -> None:
    """Like vLLM: INFO lines (KV capacity, start-up times) on stderr unless the application set up
    the "jaxpaged" logger itself or JAXPAGED_CONFIGURE_LOGGING=0."""
    logger = logging.getLogger("jaxpaged")
    if os.environ.get("JAXPAGED_CONFIGURE_LOGGING", "1") == "0" or logger.handlers:
        return
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(levelname)s %(asctime)s [%(name)s] %(message)s",
                                           "%m-%d %H:%M:%S"))
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False


_configure_logging()

from jaxpaged.llm import LLM  # noqa: E402
from jaxpaged.outputs import CompletionOutput, RequestOutput  # noqa: E402
from jaxpaged.sampling_params import SamplingParams  # noqa: E402

__all__ = ["LLM", "SamplingParams", "RequestOutput", "CompletionOutput"]
