"""``LLM``: vLLM's offline API (``generate``, ``chat``) on the jaxpaged engine."""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Any

from tqdm.auto import tqdm

from jaxpaged.engine.llm_engine import LLMEngine
from jaxpaged.config import EngineConfig
from jaxpaged.utils.hub import resolve_model
from jaxpaged.outputs import BeamSearchOutput, RequestOutput
from jaxpaged.sampling_params import BeamSearchParams, RequestOutputKind, SamplingParams

# vLLM's prompt forms: "text", {"prompt": "text"}, {"prompt_token_ids": [...]}.
PromptType = str | dict[str, Any]


class LLM:
    """An LLM for offline batched generation, with vLLM's constructor arguments.

    ``LLM(model="path/to/model", max_model_len=4096, gpu_memory_utilization=0.9, ...)``; see
    ``EngineConfig`` for every argument. ``model`` (and ``tokenizer``) may be a Hugging Face hub
    id (``jaxpaged.utils.hub.resolve_model``).
    """

    def __init__(self, model: str, **kwargs: Any):
        if kwargs.get("tokenizer"):
            kwargs["tokenizer"] = resolve_model(kwargs["tokenizer"])
        self.llm_engine = LLMEngine(EngineConfig.from_kwargs(resolve_model(model), kwargs))
        self._request_counter = itertools.count()

    def get_tokenizer(self):
        return self.llm_engine.tokenizer

    def get_default_sampling_params(self) -> SamplingParams:
        """The SamplingParams ``generate`` / ``chat`` use when given none: the model's
        generation_config.json defaults (see ``EngineConfig.generation_config``) over vLLM's."""
        return self.llm_engine.get_default_sampling_params()

    def generate(self, prompts: PromptType | Sequence[PromptType] | None = None,
                 sampling_params: SamplingParams | Sequence[SamplingParams] | None = None, *,
                 prompt_token_ids: list[int] | list[list[int]] | None = None,
                 use_tqdm: bool = True, priority: list[int] | None = None) -> list[RequestOutput]:
        """Generates completions for ``prompts``; outputs come back in input order."""
        requests = _normalize_prompts(prompts, prompt_token_ids)
        params = self._per_prompt(sampling_params, len(requests))
        priorities = priority if priority is not None else [0] * len(requests)
        if len(priorities) != len(requests):
            raise ValueError(f"priority has {len(priorities)} entries for {len(requests)} prompts")
        return self._run(requests, params, priorities, use_tqdm)

    def beam_search(self, prompts: PromptType | Sequence[PromptType], params: BeamSearchParams,
                    lora_request: None = None, use_tqdm: bool = False,
                    concurrency_limit: int | None = None) -> list[BeamSearchOutput]:
        """vLLM's ``LLM.beam_search``, run inside the engine: the beams of a prompt are
        sequences of one request that share their KV blocks (``jaxpaged.engine.beam_search``).
        Outputs come back in input order; ``concurrency_limit`` bounds the prompts searched at
        once."""
        if lora_request is not None:
            raise ValueError(f"lora_request is not supported, got {lora_request!r}")
        if concurrency_limit is not None and (not isinstance(concurrency_limit, int)
                                              or concurrency_limit < 1):
            raise ValueError(f"concurrency_limit must be an int >= 1, got {concurrency_limit!r}")
        if not isinstance(params, BeamSearchParams):
            raise ValueError(f"params must be a BeamSearchParams, got {type(params)!r}")
        requests = _normalize_prompts(prompts, None)
        limit = concurrency_limit or len(requests)
        outputs: list[BeamSearchOutput] = []
        with tqdm(total=len(requests), desc="Beam search", disable=not use_tqdm,
                  dynamic_ncols=True) as bar:
            for start in range(0, len(requests), limit):
                outputs += self._run_beam_search(requests[start:start + limit], params, bar)
        return outputs

    def _run_beam_search(self, requests: list[dict[str, Any]], params: BeamSearchParams,
                         bar) -> list[BeamSearchOutput]:
        engine = self.llm_engine
        ids = [str(next(self._request_counter)) for _ in requests]
        try:
            for request_id, request in zip(ids, requests):
                engine.add_beam_search(request_id, request.get("prompt"), params,
                                       prompt_token_ids=request.get("prompt_token_ids"))
        except Exception:
            engine.abort_request(ids)
            raise
        finished: dict[str, BeamSearchOutput] = {}
        while len(finished) < len(ids):
            if not engine.has_unfinished_requests():
                raise RuntimeError("the engine stopped before every beam search finished")
            engine.step()
            done = engine.take_beam_search_outputs()
            finished.update(done)
            bar.update(len(done))
        return [finished[i] for i in ids]

    def chat(self, messages: list[dict[str, Any]] | list[list[dict[str, Any]]],
             sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
             use_tqdm: bool = True, chat_template: str | None = None,
             add_generation_prompt: bool = True,
             continue_final_message: bool = False) -> list[RequestOutput]:
        """Generates replies to one conversation or a list of them, through the chat template."""
        tokenizer = self.get_tokenizer()
        if tokenizer is None:
            raise ValueError("chat needs a tokenizer (skip_tokenizer_init=True)")
        conversations = messages if messages and isinstance(messages[0], list) else [messages]
        requests = []
        for conversation in conversations:
            if not conversation:
                raise ValueError("messages must not be empty")
            text = tokenizer.apply_chat_template(
                conversation, tokenize=False, chat_template=chat_template,
                add_generation_prompt=add_generation_prompt,
                continue_final_message=continue_final_message)
            # The template already writes the special tokens (BOS ...): don't add them twice.
            requests.append({"prompt": text,
                             "prompt_token_ids": tokenizer.encode(text, add_special_tokens=False)})
        params = self._per_prompt(sampling_params, len(requests))
        return self._run(requests, params, [0] * len(requests), use_tqdm)

    def _per_prompt(self, sampling_params, count: int) -> list[SamplingParams]:
        """One SamplingParams per prompt; None: the defaults (as vLLM's ``LLM`` does)."""
        if sampling_params is None:
            sampling_params = self.get_default_sampling_params()
        if isinstance(sampling_params, SamplingParams):
            return [sampling_params] * count
        params = list(sampling_params)
        if len(params) != count:
            raise ValueError(f"got {len(params)} sampling_params for {count} prompts")
        return params

    def _run(self, requests: list[dict[str, Any]], params: list[SamplingParams],
             priorities: list[int], use_tqdm: bool) -> list[RequestOutput]:
        engine = self.llm_engine
        ids = [str(next(self._request_counter)) for _ in requests]
        final_only = {id(p): _final_only(p) for p in params}
        try:
            for request_id, request, p, prio in zip(ids, requests, params, priorities):
                engine.add_request(request_id, request.get("prompt"), final_only[id(p)],
                                   prompt_token_ids=request.get("prompt_token_ids"),
                                   priority=prio)
        except Exception:
            engine.abort_request(ids)  # all or nothing: a bad prompt queues none of the batch
            raise
        finished: dict[str, RequestOutput] = {}
        with tqdm(total=len(ids), desc="Processed prompts", disable=not use_tqdm,
                  dynamic_ncols=True) as bar:
            while engine.has_unfinished_requests():
                for output in engine.step():
                    if output.finished:
                        finished[output.request_id] = output
                        bar.update(1)
        return [finished[i] for i in ids]


def _final_only(params: SamplingParams) -> SamplingParams:
    """generate() returns only finished outputs, so the engine need not build the intermediate
    (cumulative) ones every step, as vLLM's LLM does."""
    params = params.clone()
    params.output_kind = RequestOutputKind.FINAL_ONLY
    return params


def _normalize_prompts(prompts, prompt_token_ids) -> list[dict[str, Any]]:
    if prompts is not None and prompt_token_ids is not None:
        raise ValueError("pass prompts or prompt_token_ids, not both")
    if prompt_token_ids is not None:
        batch = prompt_token_ids if prompt_token_ids and isinstance(prompt_token_ids[0], list) \
            else [prompt_token_ids]
        return [{"prompt_token_ids": ids} for ids in batch]
    if prompts is None:
        raise ValueError("prompts must be given")
    batch = [prompts] if isinstance(prompts, (str, dict)) else list(prompts)
    if not batch:
        raise ValueError("prompts must not be empty")
    out = []
    for p in batch:
        if isinstance(p, str):
            out.append({"prompt": p})
        elif isinstance(p, dict) and ("prompt" in p or "prompt_token_ids" in p):
            out.append({k: p[k] for k in ("prompt", "prompt_token_ids") if k in p})
        else:
            raise ValueError(f"a prompt must be a str or a dict with 'prompt' or "
                             f"'prompt_token_ids', got {type(p).__name__}")
    return out


