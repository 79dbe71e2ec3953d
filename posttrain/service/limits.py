"""Request body size limits, enforced while the body streams in (not after it was buffered)."""

from __future__ import annotations

import json
from typing import Any

from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from posttrain.service.errors import error_body


class _TooLarge(HTTPException):
    # An HTTPException, so that FastAPI's body parsing re-raises it and the app answers 413 itself.
    def __init__(self, what: str, limit: int) -> None:
        super().__init__(413, f"{what} is larger than this server's limit of {limit} bytes")


class BodySizeLimit:
    """413 for bodies over the limit: uploads to ``upload_path`` get ``upload_limit``, the rest ``body_limit``."""

    def __init__(self, app: ASGIApp, body_limit: int, upload_limit: int, upload_path: str = "/v1/files") -> None:
        self.app = app
        self.body_limit = body_limit
        self.upload_limit = upload_limit
        self.upload_path = upload_path

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        is_upload = scope["path"].rstrip("/") == self.upload_path
        shown = self.upload_limit if is_upload else self.body_limit
        # Multipart framing adds a little around the file itself.
        limit = shown + 64 * 1024 if is_upload else shown
        what = "upload" if is_upload else "request body"
        declared = _content_length(scope)
        if declared is not None and declared > limit:
            await _reject(send, what, shown)
            return
        received = 0
        started = False

        async def counting_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise _TooLarge(what, shown)
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, counting_receive, tracking_send)
        except _TooLarge:
            if not started:
                await _reject(send, what, shown)


def _content_length(scope: Scope) -> int | None:
    for name, value in scope.get("headers", []):
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None


async def _reject(send: Send, what: str, limit: int) -> None:
    body: dict[str, Any] = error_body(413, f"{what} is larger than this server's limit of {limit} bytes",
                                      "PayloadTooLarge")
    payload = json.dumps(body).encode()
    await send({"type": "http.response.start", "status": 413,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode()),
                            (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": payload})
