"""The FastAPI app: the routers of ``routes/`` over the store, the scheduler and the job directories.

Paths (``posttrain/client.py`` and the dashboard's ``api.js`` are the only other places that know them):
``/v1/jobs`` (POST submit, GET list), ``/v1/jobs/{id}`` (GET, DELETE), ``/v1/jobs/{id}/cancel|pause|resume``,
``/v1/jobs/{id}/logs``, ``/v1/jobs/{id}/metrics``, ``/v1/jobs/{id}/artifacts[/{path}]``, ``/v1/files``,
``/v1/fine_tuning/jobs...`` (the OpenAI door), ``/v1/models``, ``/v1/chat/completions``, ``/v1/completions``
(OpenAI inference, routes/inference.py), ``/healthz``, ``/readyz``, ``/`` (the dashboard). Every error body is JSON
``{"detail": "<message>", "type": ..., "error": {"message", "type", "param", "code"}}`` (the last in
OpenAI's shape); an unexpected error is logged with a request id and answered 500 with only that id.
"""

from __future__ import annotations

import logging
import secrets
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from posttrain import __version__
from posttrain.errors import PosttrainError
from posttrain.launchers import Launcher
from posttrain.service.assembly import ServiceCore
from posttrain.service.errors import error_body
from posttrain.service.hosts import LoopbackHostOnly
from posttrain.service.job_reads import RecentJobs
from posttrain.service.limits import BodySizeLimit
from posttrain.service.routes import ROUTERS
from posttrain.service.schemas import ErrorBody
from posttrain.service.settings import ServiceSettings

log = logging.getLogger("posttrain.service")
ERRORS = {code: {"model": ErrorBody} for code in (400, 401, 403, 404, 409, 413, 422, 429, 500)}
OPENAI_PREFIXES = ("/v1/fine_tuning/", "/v1/files", "/v1/models", "/v1/chat/", "/v1/completions")


def create_app(settings: ServiceSettings, launcher: Launcher | None = None) -> FastAPI:
    core = ServiceCore.open(settings, launcher)

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        core.start()
        threading.Thread(target=_warm_imports, name="posttrain-warm-imports", daemon=True).start()
        try:
            yield
        finally:
            await core.inference.aclose()
            core.close()

    app = FastAPI(title="posttrain job service", version=__version__, lifespan=lifespan, responses=ERRORS)
    app.state.settings = settings
    app.state.store = core.store
    app.state.recent_jobs = RecentJobs(core.store)
    app.state.scheduler = core.scheduler
    app.state.inference = core.inference
    app.state.log_followers = 0
    app.add_middleware(BodySizeLimit, body_limit=settings.max_body_bytes, upload_limit=settings.max_upload_bytes)
    if not settings.keyed:
        app.add_middleware(LoopbackHostOnly, extra_hosts=settings.allowed_hosts)
    _add_error_handlers(app)
    for router in ROUTERS:
        app.include_router(router)
    return app


def _warm_imports() -> None:
    """Import what the submit-time preflight needs (torch, datasets) in the background, so the first
    submission does not wait seconds for it. Only posttrain's own modules: never user code."""
    import importlib

    for module in ("posttrain.preflight", "posttrain.data", "posttrain.modeling"):
        try:
            importlib.import_module(module)
        except Exception:  # reported properly by the submission that needs it
            log.debug("could not pre-import %s", module, exc_info=True)


def _add_error_handlers(app: FastAPI) -> None:
    # Every body is error_body(): posttrain's detail/type beside OpenAI's {"error": {...}}.
    @app.exception_handler(PosttrainError)
    async def user_error(_request: Request, exc: PosttrainError) -> JSONResponse:
        status = getattr(exc, "status_code", 422)
        param = getattr(exc, "param", None) or getattr(exc, "path", None)
        return JSONResponse(error_body(status, exc.message, type(exc).__name__, param, getattr(exc, "code", None)),
                            status)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_request: Request, exc: StarletteHTTPException) -> JSONResponse:
        body = error_body(exc.status_code, str(exc.detail), "HTTPError", getattr(exc, "param", None),
                          getattr(exc, "code", None))
        return JSONResponse(body, exc.status_code, headers=getattr(exc, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def request_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        if any(err.get("type") == "json_invalid" for err in errors):
            err = next(err for err in errors if err.get("type") == "json_invalid")
            where = err.get("loc", ("body", 0))[-1]
            reason = (err.get("ctx") or {}).get("error", "invalid JSON")
            return JSONResponse(error_body(400, f"request body is not valid JSON: {reason} at character {where}",
                                           "InvalidJSON"), 400)
        messages = []
        for err in errors:
            loc = [str(part) for part in err.get("loc", ()) if part != "body"]
            where = ".".join(loc) or "body"
            text = "unknown field" if err.get("type") == "extra_forbidden" else err.get("msg", "invalid")
            messages.append(f"{where}: {text}")
        first = [str(part) for part in errors[0].get("loc", ()) if part not in ("body", "query", "path")] if errors else []
        # OpenAI answers a malformed request 400 (its SDK: BadRequestError); posttrain's own routes keep 422.
        status = 400 if request.url.path.startswith(OPENAI_PREFIXES) else 422
        return JSONResponse(error_body(status, "invalid request: " + "; ".join(messages), "RequestValidationError",
                                       ".".join(first) or None,
                                       errors=[{"loc": list(e.get("loc", ())), "msg": e.get("msg")} for e in errors]),
                            status)

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        # The details stay in the server log: exception text can hold paths, SQL or other callers' data.
        request_id = secrets.token_hex(8)
        log.error("unhandled error in %s %s (request id %s)", request.method, request.url.path, request_id,
                  exc_info=exc)
        message = f"internal server error (request id {request_id}; the server log has the details)"
        return JSONResponse(error_body(500, message, "InternalError", request_id=request_id), 500,
                            headers={"X-Request-ID": request_id})
