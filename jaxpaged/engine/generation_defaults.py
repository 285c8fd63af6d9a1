"""Default sampling parameters from the model's ``generation_config.json`` (vLLM's
``ModelConfig.get_diff_sampling_param``).

``EngineConfig.generation_config`` picks the source: ``"auto"`` (the model directory's file),
``"vllm"`` (none: vLLM's neutral defaults) or a directory holding a ``generation_config.json``;
``override_generation_config`` is laid over it. Of the result, the sampling fields vLLM reads
(``SAMPLING_DEFAULT_KEYS``) with a non-null value become the defaults, ``max_new_tokens`` renamed
``max_tokens``. vLLM diffs the file against transformers' ``GenerationConfig()`` first; with
transformers 5 every default there is None, so every value the file sets counts, as here.

The defaults apply where the user gave no value: ``LLM.generate`` / ``LLM.chat`` /
``LLMEngine.add_request`` without a ``SamplingParams`` use ``SamplingParams(**defaults)``
(an explicit one is never changed), and the server fills the fields a request omitted from
``LLMEngine.get_diff_sampling_param()``.
"""

from __future__ import annotations

import pathlib
from collections.abc import Mapping
from typing import Any

# The generation_config.json fields vLLM turns into sampling defaults, in its order.
SAMPLING_DEFAULT_KEYS = ("repetition_penalty", "temperature", "top_k", "top_p", "min_p",
                         "max_new_tokens")
GENERATION_CONFIG_FILE = "generation_config.json"


def generation_config_dir(generation_config: str, model_dir: pathlib.Path) -> pathlib.Path:
    """The directory whose ``generation_config.json`` the engine reads (EOS ids and defaults):
    the model's for "auto" and "vllm", else ``generation_config`` itself, which must hold one."""
    if generation_config in ("auto", "vllm"):
        return model_dir
    directory = pathlib.Path(generation_config).expanduser()
    if not (directory / GENERATION_CONFIG_FILE).is_file():
        raise ValueError(f"generation_config={generation_config!r} must be 'auto', 'vllm' or a "
                         f"directory holding {GENERATION_CONFIG_FILE}")
    return directory


def diff_sampling_param(generation_config: str, file_config: Mapping[str, Any],
                        override: Mapping[str, Any]) -> dict[str, Any]:
    """The default ``SamplingParams`` values (vLLM field names) of an engine: ``file_config``
    (the generation_config.json read; ignored for "vllm") with ``override`` laid over it.

    ``override`` may only name the fields in ``SAMPLING_DEFAULT_KEYS`` (ValueError otherwise:
    jaxpaged reads nothing else from it, and an ignored override would go unnoticed)."""
    unknown = sorted(set(override) - set(SAMPLING_DEFAULT_KEYS))
    if unknown:
        raise ValueError(f"override_generation_config keys {unknown} are not sampling defaults "
                         f"jaxpaged applies (known: {list(SAMPLING_DEFAULT_KEYS)})")
    config = {} if generation_config == "vllm" else dict(file_config)
    config.update(override)
    defaults = {key: config[key] for key in SAMPLING_DEFAULT_KEYS if config.get(key) is not None}
    if "max_new_tokens" in defaults:
        defaults["max_tokens"] = defaults.pop("max_new_tokens")
    return defaults
