"""Prompts -> token ids on the HTTP side: text prompts, token-id prompts and chat templates."""

from __future__ import annotations

from jaxpaged.server.context import ServerContext
from jaxpaged.server.errors import bad_request
from jaxpaged.server.protocol import Prompt


def tokenize_prompt(ctx: ServerContext, prompt: Prompt,
                    add_special_tokens: bool = True) -> tuple[str | None, list[int]]:
    """(text or None, token ids) of a completions prompt; ids are range-checked."""
    if isinstance(prompt, str):
        return prompt, encode(ctx, prompt, add_special_tokens)
    for token_id in prompt:
        if not 0 <= token_id < ctx.vocab_size:
            raise bad_request(f"prompt token id {token_id} is not in [0, {ctx.vocab_size})",
                              "prompt")
    return None, list(prompt)


def encode(ctx: ServerContext, text: str, add_special_tokens: bool) -> list[int]:
    if ctx.tokenizer is None:
        raise bad_request("this server has no tokenizer: send token ids", "prompt")
    return list(ctx.tokenizer.encode(text, add_special_tokens=add_special_tokens))


def render_chat(ctx: ServerContext, messages: list[dict[str, str]], *,
                add_generation_prompt: bool, continue_final_message: bool) -> str:
    """The chat template's text for ``messages`` (its special tokens written out)."""
    if ctx.tokenizer is None:
        raise bad_request("this server has no tokenizer, so no chat template", "messages")
    try:
        return ctx.tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=add_generation_prompt,
            continue_final_message=continue_final_message)
    except Exception as e:  # no template, or the template refused the conversation
        raise bad_request(f"the chat template failed on these messages: {e}", "messages") from None


def chat_token_ids(ctx: ServerContext, text: str) -> list[int]:
    """The rendered template already holds the special tokens (BOS ...): add none."""
    return encode(ctx, text, add_special_tokens=False)
