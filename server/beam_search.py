"""Beam search on ``/v1/completions``: vLLM's ``use_beam_search`` (with ``n`` beams returned as
choices and ``length_penalty``), run inside the engine (``LLMEngine.add_beam_search``).

vLLM's beam search reads only ``n`` (the beam width), ``max_tokens``, ``ignore_eos``,
``temperature``, ``length_penalty`` and ``include_stop_str_in_output``; a request that also sets
a field the search would not honour (``top_p``, ``stop``, ``logprobs``, ...) gets a 400 naming it
rather than silently different results. Its one output arrives when the search ends.
"""

from __future__ import annotations

from typing import Any

from jaxpaged.outputs import BeamSearchOutput, CompletionOutput, RequestOutput
from jaxpaged.sampling_params import BeamSearchParams, SamplingParams
from jaxpaged.server.errors import bad_request

# request fields a beam search honours, or that do not change what it generates
_WITH_BEAM_SEARCH = frozenset({
    "model", "prompt", "n", "max_tokens", "ignore_eos", "temperature", "length_penalty",
    "include_stop_str_in_output", "use_beam_search", "early_stopping", "stream",
    "stream_options", "request_id", "priority", "cache_salt", "user", "session_id",
    "add_special_tokens", "truncate_prompt_tokens", "truncation_side", "return_token_ids",
    "return_tokens_as_token_ids", "skip_special_tokens", "spaces_between_special_tokens",
    "routed_experts_prompt_start", "return_token_offsets", "return_mm_kwargs", "best_of"})


def beam_search_params(values: dict[str, Any], params: SamplingParams) -> BeamSearchParams | None:
    """The request's BeamSearchParams, None without ``use_beam_search``; 400 for a field the
    search would ignore."""
    if not values.get("use_beam_search"):
        if values.get("length_penalty", 1.0) != 1.0:
            raise bad_request("'length_penalty' needs 'use_beam_search'", "length_penalty")
        return None
    for name in values:
        if name not in _WITH_BEAM_SEARCH:
            raise bad_request(f"'{name}' is not supported with 'use_beam_search'", name,
                              "unsupported_field")
    try:
        return BeamSearchParams(
            beam_width=params.n, max_tokens=params.max_tokens,
            ignore_eos=params.ignore_eos, temperature=params.temperature,
            length_penalty=values.get("length_penalty", 1.0),
            include_stop_str_in_output=params.include_stop_str_in_output)
    except ValueError as e:
        raise bad_request(str(e), "length_penalty" if "length_penalty" in str(e) else None
                          ) from None


def beam_search_request_output(request_id: str, prompt: str | None, prompt_token_ids: list[int],
                               result: BeamSearchOutput) -> RequestOutput:
    """A finished beam search as one final output, its beams the ``n`` completions (vLLM's)."""
    num_prompt = len(prompt_token_ids)
    outputs = [CompletionOutput(index=i, text=seq.text or "",
                                token_ids=seq.tokens[num_prompt:],
                                cumulative_logprob=seq.cum_logprob, logprobs=None,
                                finish_reason=seq.finish_reason, stop_reason=seq.stop_reason)
               for i, seq in enumerate(result.sequences)]
    return RequestOutput(request_id, prompt, prompt_token_ids, None, outputs, finished=True)
