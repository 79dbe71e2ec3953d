"""The inference server: FastAPI over the engine, in vLLM's shapes so Atropos environments use it unchanged.

Routes: ``/health``, ``/v1/models``, vLLM's native ``POST /generate``, OpenAI completions and chat
(openai_routes.py), vLLM's LoRA endpoints plus the Atropos example server's ``/lora/load``, and the
server side of weight sync under ``/weights/`` (shared-memory layout, pause/resume, broadcast).
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse
from pydantic import BaseModel, ConfigDict, Field

from posttrain.inference import weight_broadcast
from posttrain.inference.engine import InferenceEngine, RequestError
from posttrain.inference.generation import MAX_SEED, SamplingParams
from posttrain.inference.openai_routes import engine_of, resolve_adapter
from posttrain.inference.openai_routes import router as openai_router
from posttrain.inference.shared_weights import SharedLayout, dtype_name

log = logging.getLogger(__name__)
router = APIRouter()
health_router = APIRouter()  # the one route answered without the API key (process supervisors poll it)


def require_api_key(request: Request) -> None:
    """With --api-key, every route but /health needs ``Authorization: Bearer KEY`` (vLLM's convention, so
    OpenAI and atroposlib clients configured with api_key just work)."""
    key: str | None = request.app.state.api_key
    if key is None:
        return
    scheme, _, given = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), key.encode()):
        raise RequestError("missing or wrong API key: send Authorization: Bearer <the server's --api-key>", 401)


@dataclass
class WeightState:
    """The server side of weight sync: the shared buffer (shared_vllm) or the broadcast group."""

    shared_layout: SharedLayout | None = None
    shared_buffer: torch.Tensor | None = None
    broadcast_group: Any = None
    broadcast_store: Any = None
    lock: threading.Lock = field(default_factory=threading.Lock)


class TokenPrompt(BaseModel):
    model_config = ConfigDict(extra="forbid")
    prompt_token_ids: list[int] = Field(min_length=1)


class GenerateRequest(BaseModel):
    """vLLM's native /generate body: a prompt plus SamplingParams fields."""

    model_config = ConfigDict(extra="forbid")

    prompt: TokenPrompt | str
    model: str | None = None
    n: int = Field(1, ge=1, le=64)
    max_tokens: int = Field(16, ge=1)
    temperature: float = Field(1.0, ge=0)
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = -1
    stop: str | list[str] | None = None
    logprobs: int | None = Field(None, ge=0, le=20)
    prompt_logprobs: int | None = Field(None, ge=0, le=20)
    seed: int | None = Field(None, ge=0, le=MAX_SEED)
    ignore_eos: bool = False
    stream: bool = False


@health_router.get("/health")
def health() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/v1/models")
def models(request: Request) -> dict[str, Any]:
    engine = engine_of(request)
    data = [{"id": engine.model_name, "object": "model", "owned_by": "posttrain", "root": engine.model_name,
             "parent": None, "max_model_len": engine.max_model_len}]
    data += [{"id": name, "object": "model", "owned_by": "posttrain", "root": path, "parent": engine.model_name}
             for name, path in engine.adapters.items()]
    return {"object": "list", "data": data}


@router.post("/generate")
async def generate(body: GenerateRequest, request: Request) -> dict[str, Any]:
    engine = engine_of(request)
    if body.stream:
        raise RequestError("stream=true is not supported by this server")
    if isinstance(body.prompt, str):
        prompt = engine.tokenizer(body.prompt).input_ids
    else:
        prompt = body.prompt.prompt_token_ids
    stop = (body.stop,) if isinstance(body.stop, str) else tuple(body.stop or ())
    params = SamplingParams(max_tokens=body.max_tokens, temperature=body.temperature, top_p=body.top_p,
                            top_k=body.top_k, n=body.n, stop=stop, logprobs=body.logprobs,
                            prompt_logprobs=body.prompt_logprobs, ignore_eos=body.ignore_eos, seed=body.seed)
    adapter = resolve_adapter(engine, body.model)
    result = await asyncio.wrap_future(engine.submit(prompt, params, adapter))
    completions = result.completions
    response: dict[str, Any] = {
        "text": [c.text for c in completions],
        "prompt": engine.tokenizer.decode(prompt),
        "prompt_token_ids": prompt,
        "token_ids": [c.token_ids for c in completions],
        "finish_reasons": [c.finish_reason for c in completions],
    }
    if body.logprobs is not None:
        # vLLM's shape: per completion, per token, a one-element list holding {token id: logprob}.
        response["logprobs"] = [[[{str(k): v for k, v in entry.items()}] for entry in c.logprobs]
                                for c in completions]
    if body.prompt_logprobs is not None and result.prompt_logprobs is not None:
        response["prompt_logprobs"] = [None if e is None else {str(k): v for k, v in e.items()}
                                       for e in result.prompt_logprobs]
    return response


# -- LoRA ---------------------------------------------------------------------------------------------------------
class LoadLoraRequest(BaseModel):
    lora_name: str = Field(min_length=1)
    lora_path: str = Field(min_length=1)
    load_inplace: bool = False


class UnloadLoraRequest(BaseModel):
    lora_name: str = Field(min_length=1)
    lora_int_id: int | None = None


class SeedLoraLoadRequest(BaseModel):
    """The Atropos example server's /lora/load body."""

    adapter_path: str = Field(min_length=1)
    adapter_name: str | None = None


@router.post("/v1/load_lora_adapter")
def load_lora_adapter(body: LoadLoraRequest, request: Request) -> PlainTextResponse:
    engine = engine_of(request)
    if body.lora_name == engine.model_name:
        raise RequestError(f"lora_name {body.lora_name!r} is the base model's name")
    engine.load_adapter(body.lora_name, body.lora_path, inplace=body.load_inplace)
    return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' added successfully.")


@router.post("/v1/unload_lora_adapter")
def unload_lora_adapter(body: UnloadLoraRequest, request: Request) -> PlainTextResponse:
    engine_of(request).unload_adapter(body.lora_name)
    return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' removed successfully.")


@router.post("/lora/load")
def seed_lora_load(body: SeedLoraLoadRequest, request: Request) -> dict[str, Any]:
    engine = engine_of(request)
    name = body.adapter_name or "default_adapter"
    engine.load_adapter(name, body.adapter_path, inplace=True)
    return {"status": "ok", "adapter_name": name, "adapter_path": body.adapter_path,
            "version": engine.weights_version}


@router.get("/lora/status")
def seed_lora_status(request: Request) -> dict[str, Any]:
    engine = engine_of(request)
    newest = next(reversed(engine.adapters)) if engine.adapters else None
    return {"lora_available": engine.enable_lora, "active_adapter_name": newest,
            "active_adapter_path": engine.adapters.get(newest) if newest else None,
            "available_adapters": list(engine.adapters)}


# -- weight sync (server side) ------------------------------------------------------------------------------------
def weights_of(request: Request) -> WeightState:
    return request.app.state.weights


class PauseRequest(BaseModel):
    timeout_s: float = Field(60.0, gt=0, le=3600)


class BroadcastInitRequest(BaseModel):
    master_address: str = Field(min_length=1)
    master_port: int = Field(ge=1, le=65535)
    rank: int = Field(1, ge=1)
    world_size: int = Field(2, ge=2)
    timeout_s: float = Field(60.0, gt=0)


class BroadcastUpdateRequest(BaseModel):
    version: int | None = None


@router.get("/weights/info")
def weights_info(request: Request) -> dict[str, Any]:
    engine, weights = engine_of(request), weights_of(request)
    return {"model": engine.model_name, "version": engine.weights_version, "paused": engine.weights_lock.paused,
            "shared": weights.shared_layout.to_json() if weights.shared_layout else None,
            "broadcast_ready": weights.broadcast_group is not None, "pending_requests": engine.pending,
            "largest_batch": engine.largest_batch, "generated_tokens": engine.generated_tokens,
            "device": str(next(engine.base_model.parameters()).device)}


@router.post("/weights/pause")
async def weights_pause(body: PauseRequest, request: Request) -> dict[str, Any]:
    """Block until the batch in flight ends, then hold generation until /weights/resume (or the timeout).

    Async with a non-blocking first try: an idle server pauses without a thread hop (this is on the
    trainer's critical path every step); only a busy one waits in a worker thread.
    """
    engine = engine_of(request)
    if not engine.weights_lock.pause(body.timeout_s, blocking=False):
        await asyncio.to_thread(engine.weights_lock.pause, body.timeout_s)
    return {"paused": True, "version": engine.weights_version}


@router.post("/weights/resume")
async def weights_resume(request: Request) -> dict[str, Any]:
    engine = engine_of(request)
    if engine.weights_lock.paused:
        engine.weights_version += 1  # the trainer paused to change the weights
    resumed = engine.weights_lock.resume()
    return {"resumed": resumed, "version": engine.weights_version}


@router.post("/weights/broadcast/init")
def broadcast_init(body: BroadcastInitRequest, request: Request) -> dict[str, Any]:
    """Join the trainer's weight group (blocks until the trainer joins too); returns the order of tensors."""
    engine, weights = engine_of(request), weights_of(request)
    with weights.lock:
        if weights.broadcast_group is not None:
            # Only one trainer updates the weights; a new init means the previous one is gone (crashed or
            # restarted with --resume), so its group is dropped rather than blocking the new trainer.
            log.warning("a new trainer joins the weight broadcast: dropping the previous group")
            weights.broadcast_group = weights.broadcast_store = None
        try:
            group, store = weight_broadcast.join_group(body.master_address, body.master_port, body.rank,
                                                       body.world_size, body.timeout_s)
        except (RuntimeError, TimeoutError, ValueError) as exc:
            raise RequestError(f"cannot join the trainer's weight group at "
                               f"{body.master_address}:{body.master_port}: {exc}") from None
        weights.broadcast_group, weights.broadcast_store = group, store
    return {"params": [{"name": name, "dtype": dtype_name(p.dtype), "shape": list(p.shape)}
                       for name, p in engine.named_weights()]}


@router.post("/weights/broadcast/update")
def broadcast_update(body: BroadcastUpdateRequest, request: Request) -> dict[str, Any]:
    """Receive every tensor from the trainer into the served parameters, generation held meanwhile."""
    engine, weights = engine_of(request), weights_of(request)
    with weights.lock:
        if weights.broadcast_group is None:
            raise RequestError("no broadcast group; POST /weights/broadcast/init first", 409)
        with engine.weights_lock, torch.no_grad():
            try:
                weight_broadcast.broadcast_tensors(weights.broadcast_group,
                                                   [p.data for _, p in engine.named_weights()])
            except RuntimeError as exc:
                weights.broadcast_group = weights.broadcast_store = None
                raise RequestError(f"the weight broadcast failed, group closed: {exc}", 409) from None
            engine.weights_version = body.version if body.version is not None else engine.weights_version + 1
    return {"version": engine.weights_version}


@router.post("/weights/broadcast/close")
def broadcast_close(request: Request) -> dict[str, bool]:
    weights = weights_of(request)
    with weights.lock:
        closed = weights.broadcast_group is not None
        weights.broadcast_group = weights.broadcast_store = None
    return {"closed": closed}


def add_request_error_handler(app: FastAPI) -> None:
    """RequestError -> its status with OpenAI's error body (and ``detail``, as FastAPI's own errors have)."""

    @app.exception_handler(RequestError)
    async def request_error(_request: Request, exc: RequestError) -> JSONResponse:
        kind = {401: "authentication_error", 404: "not_found_error"}.get(exc.status, "invalid_request_error")
        return JSONResponse({"error": {"message": exc.message, "type": kind, "param": exc.param, "code": exc.code},
                             "detail": exc.message}, status_code=exc.status)


def create_app(engine: InferenceEngine, weights: WeightState | None = None, api_key: str | None = None) -> FastAPI:
    """``api_key``: required as a Bearer token on every route but /health (None: no authentication)."""
    weights = weights or WeightState()

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        # Runs on uvicorn's graceful shutdown (SIGTERM / Ctrl-C): uvicorn then re-raises the signal, so code
        # after uvicorn.run() would never run.
        yield
        engine.close()
        if weights.shared_layout is not None:
            # A trainer keeps its own mapping; the names in /dev/shm go with the server.
            for file in weights.shared_layout.files():
                file.unlink(missing_ok=True)

    app = FastAPI(title="posttrain inference server", lifespan=lifespan)
    app.state.engine = engine
    app.state.resolve_model = lambda _request, model: (engine, resolve_adapter(engine, model))
    app.state.weights = weights
    app.state.api_key = api_key or None
    app.include_router(health_router)
    app.include_router(router, dependencies=[Depends(require_api_key)])
    app.include_router(openai_router, dependencies=[Depends(require_api_key)])

    add_request_error_handler(app)

    return app
