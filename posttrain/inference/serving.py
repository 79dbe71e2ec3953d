"""The serving worker: OpenAI completions and chat over a :class:`ModelPool`, in its own process.

The job service starts it (``python -m posttrain.inference.serving``), supervises it and restarts it
when it dies; an out-of-memory or a crash here never takes the API down. The service has already decided
who may call which model: each request carries the model's weights location in the ``X-Posttrain-Model``
header (see model_source.py), and the worker answers only callers with its key (the service's, handed
over in ``POSTTRAIN_INFERENCE_API_KEY``), on loopback. Without the header, ``model`` is taken as a base
model name or folder, which is what a benchmark or a person talking to the worker directly sends.

Routes: ``/health``; ``/v1/completions``, ``/v1/chat/completions`` (openai_routes.py); ``/v1/models``
(what is loaded now, with its memory); ``POST /v1/models/evict`` (unload a model or adapter).
"""

from __future__ import annotations

import argparse
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field

from posttrain.errors import PosttrainError
from posttrain.inference.engine import InferenceEngine
from posttrain.inference.model_source import SOURCE_HEADER, ModelSource
from posttrain.inference.openai_protocol import RequestError
from posttrain.inference.openai_routes import router as openai_router
from posttrain.inference.pool import ModelPool, PoolOptions
from posttrain.inference.process import API_KEY_VARIABLE
from posttrain.inference.server import add_request_error_handler, health_router, require_api_key

MiB = 1024 * 1024


def source_of(request: Request, model: str | None) -> ModelSource:
    header = request.headers.get(SOURCE_HEADER)
    if header:
        try:
            return ModelSource.from_header(header)
        except ValueError as exc:
            raise RequestError(str(exc)) from None
    if not model:
        raise RequestError("model is required", param="model")
    return ModelSource(base=model)


def pool_of(request: Request) -> ModelPool:
    return request.app.state.pool


class EvictRequest(BaseModel):
    base: str = Field(min_length=1)
    adapter: str | None = None


def create_serving_app(pool: ModelPool, api_key: str | None = None) -> FastAPI:
    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        yield
        pool.close()

    app = FastAPI(title="posttrain serving worker", lifespan=lifespan)
    app.state.pool = pool
    app.state.api_key = api_key or None

    def resolve(request: Request, model: str | None) -> tuple[InferenceEngine, str | None]:
        return pool.resolve(source_of(request, model))

    app.state.resolve_model = resolve
    app.include_router(health_router)
    app.include_router(openai_router, dependencies=[Depends(require_api_key)])

    @app.get("/v1/models", dependencies=[Depends(require_api_key)])
    def loaded(request: Request) -> dict[str, Any]:
        pool = pool_of(request)
        return {"object": "list", "data": pool.loaded(), "used_bytes": pool.used_bytes,
                "budget_bytes": pool.options.memory_bytes, "loads": pool.loads}

    @app.post("/v1/models/evict", dependencies=[Depends(require_api_key)])
    def evict(body: EvictRequest, request: Request) -> dict[str, bool]:
        return {"evicted": pool_of(request).evict(ModelSource(base=body.base, adapter=body.adapter))}

    add_request_error_handler(app)

    @app.exception_handler(PosttrainError)
    async def model_error(_request: Request, exc: PosttrainError) -> JSONResponse:
        # A model that cannot be loaded (its folder gone since the service resolved it, a broken file).
        return JSONResponse({"error": {"message": exc.message, "type": "invalid_request_error", "param": "model",
                                       "code": None}, "detail": exc.message}, status_code=400)

    return app


def main(argv: list[str] | None = None) -> None:
    import uvicorn

    from posttrain.inference.parent_watch import watch_parent
    from posttrain.modeling import apply_threads, resolve_device

    parser = argparse.ArgumentParser(prog="python -m posttrain.inference.serving",
                                     description="posttrain's serving worker (started by posttrain serve)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: 1 on CPU)")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | mps")
    parser.add_argument("--dtype", default="auto", help="auto | float32 | bfloat16 | float16")
    parser.add_argument("--memory-mb", type=int, default=8192, help="memory budget of the loaded weights")
    parser.add_argument("--max-batch-size", type=int, default=64, help="most completions generated together")
    args = parser.parse_args(argv)
    apply_threads(args.threads, resolve_device(args.device))
    pool = ModelPool(PoolOptions(memory_bytes=args.memory_mb * MiB, device=args.device, dtype=args.dtype,
                                 max_batch_size=args.max_batch_size))
    app = create_serving_app(pool, os.environ.get(API_KEY_VARIABLE))
    watch_parent()
    print(f"posttrain serving worker on http://{args.host}:{args.port}", flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning", timeout_graceful_shutdown=10)


if __name__ == "__main__":
    main()
