"""OpenAI-style errors: ``{"error": {"message", "type", "param", "code"}}`` with an HTTP status."""

from __future__ import annotations

from starlette.responses import JSONResponse

# HTTP status -> OpenAI's error "type".
_ERROR_TYPES = {400: "invalid_request_error", 401: "invalid_request_error",
                403: "invalid_request_error", 404: "invalid_request_error",
                415: "invalid_request_error", 405: "invalid_request_error",
                413: "invalid_request_error", 500: "server_error", 503: "server_error"}


class APIError(Exception):
    """An error the client gets as JSON; ``param`` names the offending request field."""

    def __init__(self, status: int, message: str, *, param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code

    def to_dict(self) -> dict:
        return {"error": {"message": self.message,
                          "type": _ERROR_TYPES.get(self.status, "invalid_request_error"),
                          "param": self.param, "code": self.code}}

    def to_response(self) -> JSONResponse:
        return JSONResponse(self.to_dict(), status_code=self.status)


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)
