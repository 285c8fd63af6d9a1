"""The HTTP side's settings (no heavy imports: the CLI reads them at start-up)."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class ServerSettings:
    """How the HTTP side behaves (the engine's own settings are its ``EngineConfig``)."""

    served_model_names: tuple[str, ...]
    """Names clients may put in ``model``; the first is the one responses report."""
    api_key: str | None = None
    """When set, every route but /health and /metrics needs ``Authorization: Bearer <key>``."""
    max_body_bytes: int = 16 * 1024 * 1024
    """Largest request body accepted (413 beyond)."""

    def __post_init__(self) -> None:
        if not self.served_model_names or not all(
                isinstance(n, str) and n for n in self.served_model_names):
            raise ValueError(f"served_model_names must be non-empty strings, "
                             f"got {self.served_model_names!r}")
        if self.api_key is not None and not self.api_key:
            raise ValueError("api_key must not be empty (leave it unset for no key)")
        if not isinstance(self.max_body_bytes, int) or self.max_body_bytes < 1:
            raise ValueError(f"max_body_bytes must be a positive int, got {self.max_body_bytes!r}")
