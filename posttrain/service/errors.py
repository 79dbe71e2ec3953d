"""Error bodies of the API: posttrain's ``{"detail", "type"}`` and, beside them, OpenAI's
``{"error": {"message", "type", "param", "code"}}``, so that posttrain's client and OpenAI's SDK (which
picks its exception class from the status and reads ``error``) both understand every error."""

from __future__ import annotations

from typing import Any

from fastapi import HTTPException

# OpenAI's error types by HTTP status; anything else 4xx is an invalid request.
OPENAI_TYPES = {401: "authentication_error", 403: "permission_error", 404: "not_found_error",
                409: "conflict_error", 429: "rate_limit_error"}


class InvalidRequest(HTTPException):
    """A 4xx (400 by default) that names the request field at fault (OpenAI's ``param``) and a ``code``."""

    def __init__(self, message: str, param: str | None = None, code: str | None = None, status_code: int = 400,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(status_code, message, headers=headers)
        self.param = param
        self.code = code


def error_body(status: int, message: str, kind: str, param: str | None = None, code: str | None = None,
               **extra: Any) -> dict[str, Any]:
    openai_type = "server_error" if status >= 500 else OPENAI_TYPES.get(status, "invalid_request_error")
    return {"detail": message, "type": kind, **extra,
            "error": {"message": message, "type": openai_type, "param": param, "code": code}}
