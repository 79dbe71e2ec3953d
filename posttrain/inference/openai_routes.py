"""OpenAI ``/v1/completions`` and ``/v1/chat/completions`` over the inference engine: plain and streamed
(server-sent ``data:`` chunks ending with ``data: [DONE]``, as OpenAI's SDK reads them), with logprobs.

Which engine and adapter serve a request's ``model`` is the app's to say (``app.state.resolve_model``):
the online-RL server has one engine and its adapters by name, the serving worker a pool of models.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse

from posttrain.inference.engine import InferenceEngine, RequestFuture, TokenEvent
from posttrain.inference.generation import GenerationResult, SamplingParams
from posttrain.inference.openai_protocol import (
    DEFAULT_COMPLETION_TOKENS,
    ChatCompletionRequest,
    CompletionRequest,
    RequestError,
    SamplingFields,
)

router = APIRouter()
# (request, the body's model) -> the engine and adapter that serve it; may load a model (call it in a thread).
ModelResolver = Callable[[Request, str | None], tuple[InferenceEngine, str | None]]


def engine_of(request: Request) -> InferenceEngine:
    return request.app.state.engine


def resolve_adapter(engine: InferenceEngine, model: str | None) -> str | None:
    """None (the engine's default) for the base model's name or no name; an adapter's own name as is."""
    if model is None or model == engine.model_name:
        return None
    if model in engine.adapters:
        return model
    raise RequestError(f"model {model!r} does not exist; GET /v1/models lists the served models", status=404,
                       param="model", code="model_not_found")


async def resolve_model(request: Request, model: str | None) -> tuple[InferenceEngine, str | None]:
    resolver: ModelResolver = request.app.state.resolve_model
    return await asyncio.to_thread(resolver, request, model)


def sampling(body: SamplingFields, max_tokens: int, logprobs: int | None) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=body.temperature, top_p=body.top_p, top_k=body.top_k,
                          n=body.n, stop=body.stops, logprobs=logprobs, seed=body.seed, ignore_eos=body.ignore_eos)


def _usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def _prompts(engine: InferenceEngine, prompt: str | list[str] | list[int] | list[list[int]]) -> list[list[int]]:
    if isinstance(prompt, str):
        prompt = [prompt]
    if all(isinstance(p, int) for p in prompt):
        return [list(prompt)]  # type: ignore[arg-type]
    return [engine.tokenizer(p).input_ids if isinstance(p, str) else list(p) for p in prompt]  # type: ignore[union-attr]


def chat_prompt(engine: InferenceEngine, body: ChatCompletionRequest) -> list[int]:
    """The messages through the model's own chat template, ending with the assistant's turn opened."""
    messages = [m.for_template() for m in body.messages]
    try:
        text = engine.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    except Exception as exc:  # jinja errors (e.g. a template that refuses a role) are the request's fault
        raise RequestError(f"cannot apply the chat template to these messages: {exc}", param="messages") from None
    return engine.tokenizer(text, add_special_tokens=False).input_ids


def _check_context(engine: InferenceEngine, prompt: list[int], max_tokens: int, what: str) -> None:
    if len(prompt) + max_tokens > engine.max_model_len:
        raise RequestError(
            f"This model's maximum context length is {engine.max_model_len} tokens. However, you requested "
            f"{len(prompt) + max_tokens} tokens ({len(prompt)} in the {what}, {max_tokens} in the completion). "
            f"Please reduce the length of the {what} or the completion.",
            param=what, code="context_length_exceeded")


def _submit(engine: InferenceEngine, prompts: list[list[int]], params: SamplingParams, adapter: str | None,
            listener: Callable[[int], Any] | None = None) -> list[RequestFuture]:
    futures: list[RequestFuture] = []
    try:
        for i, prompt in enumerate(prompts):
            futures.append(engine.submit(prompt, params, adapter, listener(i) if listener else None))
    except BaseException:
        for future in futures:
            future.cancel()
        raise
    return futures


async def _results(futures: list[RequestFuture]) -> list[GenerationResult]:
    try:
        return list(await asyncio.gather(*(asyncio.wrap_future(f) for f in futures)))
    finally:  # a client that went away stops its generation
        for future in futures:
            future.cancel()


# -- /v1/completions ------------------------------------------------------------------------------------------
@router.post("/v1/completions", response_model=None)
async def completions(body: CompletionRequest, request: Request) -> dict[str, Any] | StreamingResponse:
    body.check()
    engine, adapter = await resolve_model(request, body.model)
    prompts = _prompts(engine, body.prompt)
    max_tokens = body.max_tokens or DEFAULT_COMPLETION_TOKENS
    for prompt in prompts:
        _check_context(engine, prompt, max_tokens, "prompt")
    params = sampling(body, max_tokens, body.logprobs)
    model = body.model or engine.model_name
    if body.stream:
        return _stream(engine, prompts, params, adapter, lambda choice, event, logprobs: {
            "index": choice, "text": event.text, "finish_reason": event.finish_reason,
            "logprobs": logprobs}, "cmpl", "text_completion", model, body.include_usage,
            (lambda e: _completion_logprobs(engine, [e.token_id], [e.logprobs or {}])) if body.logprobs is not None
            else None)
    results = await _results(_submit(engine, prompts, params, adapter))
    choices = []
    for result in results:
        for completion in result.completions:
            choice: dict[str, Any] = {"index": len(choices), "text": completion.text,
                                      "finish_reason": completion.finish_reason, "logprobs": None}
            if body.logprobs is not None:
                choice["logprobs"] = _completion_logprobs(engine, completion.token_ids, completion.logprobs)
            choices.append(choice)
    return {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
            "model": model, "choices": choices, "usage": _result_usage(results)}


def _result_usage(results: list[GenerationResult]) -> dict[str, int]:
    return _usage(sum(len(r.prompt_token_ids) for r in results),
                  sum(len(c.token_ids) for r in results for c in r.completions))


def _completion_logprobs(engine: InferenceEngine, token_ids: list[int], logprobs: list[dict[int, float]]) -> dict:
    decode = engine.tokenizer.decode
    tokens = [decode([t]) for t in token_ids]
    offsets, offset = [], 0
    for token in tokens:
        offsets.append(offset)
        offset += len(token)
    return {"tokens": tokens, "token_logprobs": [entry[t] for t, entry in zip(token_ids, logprobs, strict=True)],
            "top_logprobs": [{decode([k]): v for k, v in entry.items()} for entry in logprobs],
            "text_offset": offsets}


# -- /v1/chat/completions -------------------------------------------------------------------------------------
@router.post("/v1/chat/completions", response_model=None)
async def chat_completions(body: ChatCompletionRequest, request: Request) -> dict[str, Any] | StreamingResponse:
    body.check()
    engine, adapter = await resolve_model(request, body.model)
    prompt = chat_prompt(engine, body)
    asked = body.max_completion_tokens or body.max_tokens
    # Unset: up to the end of the context, as OpenAI does.
    max_tokens = asked or max(1, engine.max_model_len - len(prompt))
    _check_context(engine, prompt, max_tokens, "messages")
    top = (body.top_logprobs or 0) if body.logprobs else None
    params = sampling(body, max_tokens, top)
    model = body.model or engine.model_name
    if body.stream:
        return _stream(engine, [prompt], params, adapter, lambda choice, event, logprobs: {
            "index": choice, "delta": {"content": event.text} if event.text else {},
            "finish_reason": event.finish_reason, "logprobs": logprobs}, "chatcmpl", "chat.completion.chunk", model,
            body.include_usage,
            (lambda e: {"content": [_chat_token(engine, e.token_id, e.logprobs or {}, top or 0)]}) if body.logprobs
            else None,
            first_delta={"role": "assistant", "content": ""})
    results = await _results(_submit(engine, [prompt], params, adapter))
    choices = []
    for completion in results[0].completions:
        choice: dict[str, Any] = {"index": len(choices), "message": {"role": "assistant", "content": completion.text},
                                  "finish_reason": completion.finish_reason, "logprobs": None}
        if body.logprobs:
            choice["logprobs"] = {"content": [_chat_token(engine, t, entry, top or 0)
                                              for t, entry in zip(completion.token_ids, completion.logprobs,
                                                                  strict=True)]}
        choices.append(choice)
    return {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()),
            "model": model, "choices": choices, "usage": _result_usage(results)}


def _chat_token(engine: InferenceEngine, token_id: int, entry: dict[int, float], top: int) -> dict[str, Any]:
    decode = engine.tokenizer.decode

    def item(tid: int, logprob: float) -> dict[str, Any]:
        text = decode([tid])
        return {"token": text, "logprob": logprob, "bytes": list(text.encode())}

    tops = sorted(entry.items(), key=lambda kv: kv[1], reverse=True)[:top]
    return {**item(token_id, entry[token_id]), "top_logprobs": [item(t, lp) for t, lp in tops]}


# -- streams ----------------------------------------------------------------------------------------------------
def _sse(data: dict[str, Any] | str) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data, separators=(',', ':'))}\n\n"


def _stream(engine: InferenceEngine, prompts: list[list[int]], params: SamplingParams, adapter: str | None,
            choice: Callable[[int, TokenEvent, Any], dict[str, Any]], id_prefix: str, kind: str, model: str,
            include_usage: bool, logprobs: Callable[[TokenEvent], Any] | None,
            first_delta: dict[str, Any] | None = None) -> StreamingResponse:
    """Submit now (so a refusal is an ordinary error response) and stream the events as chunks."""
    loop = asyncio.get_running_loop()
    events: asyncio.Queue[tuple[int, list[TokenEvent]] | BaseException] = asyncio.Queue()

    def listener(prompt_index: int) -> Callable[[list[TokenEvent]], None]:
        return lambda batch: loop.call_soon_threadsafe(events.put_nowait, (prompt_index, batch))

    def failed(future: RequestFuture) -> None:
        if not future.cancelled() and future.exception() is not None:
            loop.call_soon_threadsafe(events.put_nowait, future.exception())

    futures = _submit(engine, prompts, params, adapter, listener)
    for future in futures:
        future.add_done_callback(failed)
    head = {"id": f"{id_prefix}-{uuid.uuid4().hex}", "object": kind, "created": int(time.time()), "model": model}

    async def chunks() -> AsyncIterator[str]:
        remaining = len(prompts) * params.n
        generated = 0
        opened: set[int] = set()  # choices whose role chunk went out (with their first token, as vLLM does)
        try:
            while remaining:
                item = await events.get()
                if isinstance(item, BaseException):
                    status = item.status if isinstance(item, RequestError) else 500
                    yield _sse({"error": {"message": str(item) if status < 500 else "generation failed",
                                          "type": "server_error" if status >= 500 else "invalid_request_error",
                                          "param": None, "code": None}})
                    return
                prompt_index, batch = item
                for event in batch:
                    generated += 1
                    index = prompt_index * params.n + event.index
                    if first_delta is not None and index not in opened:
                        opened.add(index)
                        yield _sse({**head, "choices": [{"index": index, "delta": first_delta, "logprobs": None,
                                                         "finish_reason": None}]})
                    if event.text or event.finish_reason or logprobs is not None:
                        yield _sse({**head, "choices": [choice(index, event, logprobs(event) if logprobs else None)]})
                    if event.finish_reason:
                        remaining -= 1
            if include_usage:
                yield _sse({**head, "choices": [], "usage": _usage(sum(map(len, prompts)), generated)})
            yield _sse("[DONE]")
        finally:  # the client went away, or the stream ended: nothing keeps generating for it
            for future in futures:
                future.cancel()

    return StreamingResponse(chunks(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
