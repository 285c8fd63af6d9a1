"""Prompts -> token ids on the HTTP side: text prompts, token-id prompts, chat templates, and
vLLM's prompt truncation (``truncate_prompt_tokens``, done here as vLLM's front end does)."""

from __future__ import annotations

from typing import Any

from jaxpaged.engine.input_processor import truncate_prompt
from jaxpaged.server.context import ServerContext
from jaxpaged.server.errors import bad_request
from jaxpaged.server.protocol import ChatTemplateOptions, Prompt, Tokenization


def tokenize_prompt(ctx: ServerContext, prompt: Prompt, tokenization: Tokenization,
                    room: int) -> tuple[str | None, list[int]]:
    """(text or None, token ids) of a completions prompt; ids are range-checked, then cut per
    ``truncate_prompt_tokens`` (``room``: the output tokens that must still fit)."""
    if isinstance(prompt, str):
        token_ids = encode(ctx, prompt, tokenization.add_special_tokens)
        text: str | None = prompt
    else:
        check_token_ids(ctx, prompt, "prompt")
        token_ids, text = list(prompt), None
    return text, truncate(ctx, token_ids, tokenization, room)


def check_token_ids(ctx: ServerContext, token_ids: list[int], field: str) -> None:
    for token_id in token_ids:
        if not 0 <= token_id < ctx.vocab_size:
            raise bad_request(f"{field} token id {token_id} is not in [0, {ctx.vocab_size})",
                              field)


def truncate(ctx: ServerContext, token_ids: list[int], tokenization: Tokenization,
             room: int) -> list[int]:
    """vLLM's ``truncate_prompt_tokens`` (the engine's ``truncate_prompt``), with the request's
    ``truncation_side``; -1 keeps as many as leave ``room`` output tokens in the context. Done
    here, not again in the engine: the server needs the prompt's final length itself."""
    try:
        return truncate_prompt(token_ids, tokenization.truncate_prompt_tokens,
                               max_model_len=ctx.max_model_len,
                               longest=max(ctx.max_model_len - max(room, 1), 1),
                               side=tokenization.truncation_side)
    except ValueError as e:
        raise bad_request(str(e), "truncate_prompt_tokens") from None


def encode(ctx: ServerContext, text: str, add_special_tokens: bool,
           field: str = "prompt") -> list[int]:
    """Token ids of ``text``; a text too long to fit the context is refused before tokenizing."""
    if ctx.tokenizer is None:
        raise bad_request("this server has no tokenizer: send token ids", "prompt")
    check_text_length(ctx, len(text), field)
    return list(ctx.tokenizer.encode(text, add_special_tokens=add_special_tokens))


def check_text_length(ctx: ServerContext, num_chars: int, field: str) -> None:
    if num_chars > ctx.max_prompt_chars:
        raise bad_request(f"this model's maximum context length is {ctx.max_model_len} tokens, "
                          f"and the {field} has {num_chars} characters: more than any "
                          f"{ctx.max_model_len} tokens can spell (at most {ctx.max_prompt_chars})",
                          field, "context_length_exceeded")


def render_chat(ctx: ServerContext, messages: list[dict[str, Any]],
                options: ChatTemplateOptions) -> str:
    """The chat template's text for ``messages`` (its special tokens written out): the request's
    template (only with --trust-request-chat-template), else the server's --chat-template, else
    the tokenizer's."""
    if ctx.tokenizer is None:
        raise bad_request("this server has no tokenizer, so no chat template", "messages")
    if options.chat_template is not None and not ctx.settings.trust_request_chat_template:
        raise bad_request("a chat template in the request needs the server started with "
                          "--trust-request-chat-template", "chat_template")
    extra = {"tools": options.tools} if options.tools is not None else {}
    check_text_length(ctx, sum(len(m["content"]) for m in messages), "messages")
    try:
        return ctx.tokenizer.apply_chat_template(
            messages, tokenize=False,
            chat_template=options.chat_template or ctx.settings.chat_template,
            add_generation_prompt=options.add_generation_prompt,
            continue_final_message=options.continue_final_message, **extra, **options.kwargs)
    except Exception as e:  # no template, or the template refused the conversation
        raise bad_request(f"the chat template failed on these messages: {e}", "messages") from None


def chat_token_ids(ctx: ServerContext, text: str, add_special_tokens: bool = False) -> list[int]:
    """The rendered template already holds the special tokens (BOS ...): by default add none
    (vLLM's chat ``add_special_tokens`` adds them on top)."""
    return encode(ctx, text, add_special_tokens=add_special_tokens, field="messages")
