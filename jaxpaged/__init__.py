"""jaxpaged: vLLM rebuilt in pure JAX and Pallas.

``from jaxpaged import LLM, SamplingParams`` works like vLLM's.
"""

import importlib
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

# The public names load on first use, so that the host-side packages (``jaxpaged.core``) import
# without jax.
_PUBLIC = {"LLM": "jaxpaged.llm", "SamplingParams": "jaxpaged.sampling_params",
           "RequestOutput": "jaxpaged.outputs", "CompletionOutput": "jaxpaged.outputs",
           "StructuredOutputsParams": "jaxpaged.sampling_params",
           "BeamSearchParams": "jaxpaged.sampling_params",
           "BeamSearchOutput": "jaxpaged.outputs",
           "BeamSearchSequence": "jaxpaged.outputs"}
__all__ = list(_PUBLIC)


def __getattr__(name: str):
    if name not in _PUBLIC:
        raise AttributeError(f"module 'jaxpaged' has no attribute {name!r}")
    value = getattr(importlib.import_module(_PUBLIC[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)
