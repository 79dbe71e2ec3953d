"""DNS rebinding protection for servers without API keys.

A server on 127.0.0.1 without keys trusts whoever can connect, and a web page the user visits can make
the browser connect: it points its own host name at 127.0.0.1 and sends requests that carry that name
in the ``Host`` header. Such a server therefore answers only requests addressed to a loopback name
(``localhost``, ``127.0.0.1``, ``[::1]``, any port) or to a name the operator listed; everything else gets
400 before any route runs. A keyed server needs no such check: the browser has no key to send.

A page on another site can also send such a server requests under its real name (a form posted to
``http://127.0.0.1:8322/v1/jobs/<id>/cancel`` needs no CORS preflight). Browsers mark those with an
``Origin`` header (and ``Sec-Fetch-Site: cross-site``), so a request that changes something (any method but
GET, HEAD, OPTIONS) from an origin other than the server's own is refused with 403. Programs (the CLI, the
SDKs, curl) send no ``Origin`` and are unaffected; the dashboard is the server's own origin.
"""

from __future__ import annotations

import functools
import ipaddress
import json
from urllib.parse import urlsplit

from starlette.types import ASGIApp, Receive, Scope, Send

from posttrain.service.errors import error_body


@functools.lru_cache(maxsize=1024)  # every request asks, nearly always about the same few names
def is_loopback(host: str) -> bool:
    """Whether a host name or address (``::1`` or ``[::1]``) means this machine's loopback interface."""
    host = host.strip("[]").rstrip(".").lower()
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def host_name(header: str) -> str:
    """The name part of a Host header: ``[::1]:8322`` -> ``[::1]``, ``localhost:80`` -> ``localhost``."""
    header = header.strip().lower()
    if header.startswith("["):
        return header[: header.find("]") + 1] if "]" in header else header
    name, colon, port = header.rpartition(":")
    return name if colon and port.isdigit() else header


SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


def cross_site(headers: dict[bytes, bytes], host: str, trusted: set[str] | frozenset[str] = frozenset()) -> bool:
    """Whether a browser sent this request from a page of another origin than ``host`` (the Host header)
    or the ``trusted`` host names (the operator's ``--allow-host`` names, e.g. behind a proxy)."""
    if headers.get(b"sec-fetch-site", b"").decode("latin-1").lower() == "cross-site":
        return True
    origin = headers.get(b"origin")
    if origin is None:
        return False  # not a browser, or a same-origin GET-like request of an old one
    parts = urlsplit(origin.decode("latin-1").strip())
    # "null" (a sandboxed frame, a file:// page) has no host: never the server's own origin.
    if not parts.netloc:
        return True
    return parts.netloc.lower() != host.strip().lower() and host_name(parts.netloc) not in trusted


class LoopbackHostOnly:
    """400 for requests whose Host header is neither a loopback name nor one of ``extra_hosts``; 403 for a
    browser's cross-site request that would change something."""

    def __init__(self, app: ASGIApp, extra_hosts: list[str] | None = None) -> None:
        self.app = app
        self.extra = {host_name(host) for host in extra_hosts or []}

    def allowed(self, header: str | None) -> bool:
        if not header:
            return False
        name = host_name(header)
        return is_loopback(name) or name in self.extra

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":  # lifespan; the service has no websocket routes
            await self.app(scope, receive, send)
            return
        header = next((value.decode("latin-1") for key, value in scope.get("headers", []) if key == b"host"), None)
        if not self.allowed(header):
            await _refuse(send, 400, f"host {header!r} not accepted: a server without API keys answers only "
                                     "requests addressed to localhost, 127.0.0.1 or [::1]", "HostNotAllowed")
            return
        if scope.get("method", "GET") not in SAFE_METHODS and cross_site(dict(scope.get("headers", [])), header or "",
                                                                             self.extra):
            await _refuse(send, 403, "cross-site request refused: a server without API keys accepts changes only "
                                     "from its own pages and from programs, not from other web sites",
                          "CrossSiteRequest")
            return
        await self.app(scope, receive, send)


async def _refuse(send: Send, status: int, message: str, kind: str) -> None:
    body = json.dumps(error_body(status, message, kind)).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})
