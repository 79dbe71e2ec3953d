"""Liveness and readiness: the only routes that need no key (load balancers and probes call them)."""

from __future__ import annotations

import logging

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from posttrain.service.routes.deps import scheduler_of, store_of
from posttrain.service.schemas import Health

log = logging.getLogger("posttrain.service")
router = APIRouter(tags=["health"])


@router.get("/healthz", response_model=Health)
async def healthz() -> Health:  # async: answered in the event loop, no thread-pool hop
    return Health(status="ok")


@router.get("/readyz", response_model=Health)
def readyz(request: Request) -> JSONResponse:
    try:
        store_of(request).ping()
    except Exception:  # the reason is logged, never shown: this route needs no key
        log.exception("readiness check: database unreachable")
        return JSONResponse({"status": "unavailable", "detail": "database unreachable (see the server log)"}, 503)
    if not scheduler_of(request).alive:
        return JSONResponse({"status": "unavailable", "detail": "scheduler is not running"}, 503)
    return JSONResponse({"status": "ok", **scheduler_of(request).launcher.state(),
                         **request.app.state.inference.state()})
