"""OpenAI ``/v1/completions`` and ``/v1/chat/completions`` over the inference engine, with logprobs."""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any, Literal

from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict, Field

from posttrain.inference.engine import InferenceEngine, RequestError
from posttrain.inference.generation import MAX_SEED, GenerationResult, SamplingParams

router = APIRouter()


class SamplingFields(BaseModel):
    """Fields shared by both OpenAI routes; unknown fields are refused (a typo would silently do nothing)."""

    model_config = ConfigDict(extra="forbid")

    model: str | None = None
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0)
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = -1
    n: int = Field(1, ge=1, le=64)
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=0, le=MAX_SEED)
    stream: bool = False
    user: str | None = None
    # Accepted at their neutral values only, so clients that always send them keep working.
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0

    def sampling(self, max_tokens: int | None, logprobs: int | None) -> SamplingParams:
        if self.stream:
            raise RequestError("stream=true is not supported by this server")
        if self.presence_penalty or self.frequency_penalty:
            raise RequestError("presence_penalty and frequency_penalty are not supported (must be 0)")
        stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())
        return SamplingParams(max_tokens=max_tokens or self.max_tokens or 16, temperature=self.temperature,
                              top_p=self.top_p, top_k=self.top_k, n=self.n, stop=stop, logprobs=logprobs,
                              seed=self.seed)


class CompletionRequest(SamplingFields):
    prompt: str | list[str] | list[int] | list[list[int]]
    logprobs: int | None = Field(None, ge=0, le=20)
    echo: bool = False


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str | None = ""


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)


def engine_of(request: Request) -> InferenceEngine:
    return request.app.state.engine


def resolve_adapter(engine: InferenceEngine, model: str | None) -> str | None:
    """None (serve the newest adapter) for the base model's name or no name; an adapter's own name as is."""
    if model is None or model == engine.model_name or model in engine.adapters:
        return None if model is None or model == engine.model_name else model
    raise RequestError(f"model {model!r} does not exist; GET /v1/models lists the served models", status=404)


async def run(engine: InferenceEngine, prompts: list[list[int]], params: SamplingParams,
              adapter: str | None) -> list[GenerationResult]:
    futures = [engine.submit(prompt, params, adapter) for prompt in prompts]
    return list(await asyncio.gather(*(asyncio.wrap_future(f) for f in futures)))


def _prompts(engine: InferenceEngine, prompt: str | list[str] | list[int] | list[list[int]]) -> list[list[int]]:
    if isinstance(prompt, str):
        prompt = [prompt]
    if not prompt:
        raise RequestError("prompt is empty")
    if all(isinstance(p, int) for p in prompt):
        return [list(prompt)]  # type: ignore[arg-type]
    return [engine.tokenizer(p).input_ids if isinstance(p, str) else list(p) for p in prompt]  # type: ignore[union-attr]


def _usage(results: list[GenerationResult]) -> dict[str, int]:
    prompt = sum(len(r.prompt_token_ids) for r in results)
    completion = sum(len(c.token_ids) for r in results for c in r.completions)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


@router.post("/v1/completions")
async def completions(body: CompletionRequest, request: Request) -> dict[str, Any]:
    engine = engine_of(request)
    if body.echo:
        raise RequestError("echo=true is not supported by this server")
    params = body.sampling(None, body.logprobs)
    adapter = resolve_adapter(engine, body.model)
    results = await run(engine, _prompts(engine, body.prompt), params, adapter)
    choices = []
    for result in results:
        for completion in result.completions:
            choice: dict[str, Any] = {"index": len(choices), "text": completion.text,
                                      "finish_reason": completion.finish_reason, "logprobs": None}
            if body.logprobs is not None:
                choice["logprobs"] = _completion_logprobs(engine, completion.token_ids, completion.logprobs)
            choices.append(choice)
    return {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
            "model": body.model or engine.model_name, "choices": choices, "usage": _usage(results)}


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


@router.post("/v1/chat/completions")
async def chat_completions(body: ChatCompletionRequest, request: Request) -> dict[str, Any]:
    engine = engine_of(request)
    top = body.top_logprobs if body.logprobs else None
    params = body.sampling(body.max_completion_tokens, (top or 0) if body.logprobs else None)
    adapter = resolve_adapter(engine, body.model)
    messages = [m.model_dump(exclude_none=True) for m in body.messages]
    try:
        text = engine.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    except Exception as exc:  # jinja errors (e.g. a template that refuses a role) are the request's fault
        raise RequestError(f"cannot apply the chat template to these messages: {exc}") from None
    prompt = engine.tokenizer(text, add_special_tokens=False).input_ids
    results = await run(engine, [prompt], params, adapter)
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
            "model": body.model or engine.model_name, "choices": choices, "usage": _usage(results)}


def _chat_token(engine: InferenceEngine, token_id: int, entry: dict[int, float], top: int) -> dict[str, Any]:
    decode = engine.tokenizer.decode

    def item(tid: int, logprob: float) -> dict[str, Any]:
        text = decode([tid])
        return {"token": text, "logprob": logprob, "bytes": list(text.encode())}

    tops = sorted(entry.items(), key=lambda kv: kv[1], reverse=True)[:top]
    return {**item(token_id, entry[token_id]), "top_logprobs": [item(t, lp) for t, lp in tops]}
