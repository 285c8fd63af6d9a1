"""The HTTP side's settings (no heavy imports: the CLI reads them at start-up)."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class ServerSettings:
    """How the HTTP side behaves (the engine's own settings are its ``EngineConfig``)."""

    served_model_names: tuple[str, ...]
    """Names clients may put in ``model``; the first is the one responses report."""
    api_keys: tuple[str, ...] = ()
    """When set, every route but /health and /metrics needs ``Authorization: Bearer <key>`` with
    one of these keys (vLLM's ``--api-key`` takes several)."""
    max_body_bytes: int = 16 * 1024 * 1024
    """Largest request body accepted (413 beyond)."""
    chat_template: str | None = None
    """The chat template's text (``--chat-template``); None: the tokenizer's."""
    trust_request_chat_template: bool = False
    """Whether a request may bring its own ``chat_template`` (vLLM's flag; off: 400)."""
    max_prompts_per_request: int = 1024
    """Most prompts in one /v1/completions request (400 beyond, before any tokenization)."""
    allowed_hosts: tuple[str, ...] | None = None
    """Host header names accepted (400 otherwise; DNS rebinding); None: any
    (``--allowed-hosts``; the command line's default is the loopback names on loopback)."""
    allowed_origins: tuple[str, ...] = ()
    """Browser origins allowed (403 for a request with another ``Origin``; CORS answers for
    these); ``"*"``: all. Pages under an allowed host name are always allowed."""
    tool_call_parser: str | None = None
    """The parser of ``tool_choice: "auto"`` (``--enable-auto-tool-choice --tool-call-parser``);
    None: auto tool choice is off (400)."""

    def __post_init__(self) -> None:
        if not self.served_model_names or not all(
                isinstance(n, str) and n for n in self.served_model_names):
            raise ValueError(f"served_model_names must be non-empty strings, "
                             f"got {self.served_model_names!r}")
        if not isinstance(self.api_keys, tuple) or not all(
                isinstance(k, str) and k for k in self.api_keys):
            raise ValueError("api_keys must be a tuple of non-empty strings (empty for no key)")
        if not isinstance(self.max_body_bytes, int) or self.max_body_bytes < 1:
            raise ValueError(f"max_body_bytes must be a positive int, got {self.max_body_bytes!r}")
        if not isinstance(self.max_prompts_per_request, int) or self.max_prompts_per_request < 1:
            raise ValueError(f"max_prompts_per_request must be a positive int, got "
                             f"{self.max_prompts_per_request!r}")
