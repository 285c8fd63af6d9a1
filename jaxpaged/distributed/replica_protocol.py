"""What a replica's ``generate`` stream carries back to the front end, besides the engine's
``RequestOutput``s: first the admission, or a failure to be raised as the front end's own
exception type (so the HTTP side maps it exactly as it maps the in-process engine's)."""

from __future__ import annotations

import dataclasses
from typing import Literal

from jaxpaged.core.scheduler import QueueFullError
from jaxpaged.server.async_engine import EngineUnavailableError, RequestFailedError

FailureKind = Literal["invalid", "queue_full", "failed", "unavailable"]


@dataclasses.dataclass(frozen=True)
class ReplicaAdmitted:
    """Every prompt of the request is queued in the replica's engine."""

    replica: int


@dataclasses.dataclass(frozen=True)
class ReplicaFailure:
    kind: FailureKind
    message: str
    request_id: str | None = None

    @classmethod
    def of(cls, error: BaseException) -> ReplicaFailure:
        request_id = getattr(error, "request_id", None)
        if isinstance(error, QueueFullError):
            return cls("queue_full", str(error))
        if isinstance(error, ValueError):
            return cls("invalid", str(error))
        if isinstance(error, EngineUnavailableError):
            return cls("unavailable", str(error), request_id)
        if isinstance(error, RequestFailedError):
            return cls("failed", str(error), request_id)
        return cls("failed", f"{type(error).__name__}: {error}", request_id)

    def to_exception(self) -> Exception:
        if self.kind == "queue_full":
            return QueueFullError(self.message)
        if self.kind == "invalid":
            return ValueError(self.message)
        if self.kind == "unavailable":
            return EngineUnavailableError(self.message, self.request_id)
        return RequestFailedError(self.request_id or "", self.message)
