"""The ``Inference`` implementation both posttrain inference providers share: Llama Stack's OpenAI-shaped
requests go to posttrain's OpenAI routes as they are (``served.py`` picks where), and the answers come back
as Llama Stack's models (a stream: one chunk per server-sent event).

Models: ``list_models`` gives Llama Stack every model there is to call (the base models and each trained
model and checkpoint, by its Checkpoint identifier), so ``models.list`` shows them as
``posttrain/<identifier>`` once Llama Stack refreshes its registry (at start-up, then every few minutes);
until then the same name is callable anyway (Llama Stack routes ``<provider id>/<name>`` to the provider),
and ``models.register`` with ``provider_model_id=<identifier>`` lists it at once.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import httpx
from llama_stack_api import (
    Model,
    ModelType,
    OpenAIChatCompletion,
    OpenAIChatCompletionChunk,
    OpenAIChatCompletionRequestWithExtraBody,
    OpenAICompletion,
    OpenAICompletionRequestWithExtraBody,
    OpenAIEmbeddingsRequestWithExtraBody,
    OpenAIEmbeddingsResponse,
)
from pydantic import BaseModel

from posttrain.errors import UnsupportedError
from posttrain.llama_stack.served import CHAT, COMPLETIONS, ServedModelError, ServedModels


def _body(params: BaseModel) -> dict[str, Any]:
    """The request as posttrain's routes take it (unset fields left out, Llama Stack's extra body kept)."""
    return params.model_dump(mode="json", exclude_none=True)


async def _events(response: httpx.Response, shape: type[BaseModel]) -> AsyncIterator[Any]:
    """The server-sent events of an OpenAI stream as ``shape`` objects, until ``[DONE]``."""
    try:
        async for line in response.aiter_lines():
            if not line.startswith("data:"):
                continue
            data = line[len("data:"):].strip()
            if data == "[DONE]":
                return
            event = json.loads(data)
            if "error" in event:  # the worker stopped mid-answer
                raise ServedModelError(event["error"].get("message", "generation failed"), 500)
            yield shape.model_validate(event)
    finally:
        await response.aclose()


class PosttrainInference:
    def __init__(self, models: ServedModels) -> None:
        self.models = models

    async def initialize(self) -> None:
        pass

    async def shutdown(self) -> None:
        await self.models.aclose()

    # -- generation ----------------------------------------------------------------------------------
    async def openai_chat_completion(
        self, params: OpenAIChatCompletionRequestWithExtraBody,
    ) -> OpenAIChatCompletion | AsyncIterator[OpenAIChatCompletionChunk]:
        response = await self.models.send(CHAT, params.model, _body(params))
        if params.stream:
            return _events(response, OpenAIChatCompletionChunk)
        try:
            return OpenAIChatCompletion.model_validate_json(await response.aread())
        finally:
            await response.aclose()

    async def openai_completion(
        self, params: OpenAICompletionRequestWithExtraBody,
    ) -> OpenAICompletion | AsyncIterator[OpenAICompletion]:
        response = await self.models.send(COMPLETIONS, params.model, _body(params))
        if params.stream:
            return _events(response, OpenAICompletion)
        try:
            return OpenAICompletion.model_validate_json(await response.aread())
        finally:
            await response.aclose()

    async def openai_embeddings(self, params: OpenAIEmbeddingsRequestWithExtraBody) -> OpenAIEmbeddingsResponse:
        raise UnsupportedError(f"{params.model}: posttrain serves generative models; it makes no embeddings")

    # -- models (Llama Stack's ModelsProtocolPrivate) ------------------------------------------------
    async def list_models(self) -> list[Model]:
        listed = await asyncio.to_thread(self.models.listed)
        provider_id = self.__provider_id__  # type: ignore[attr-defined]  # set by Llama Stack's resolver
        return [Model(identifier=name, provider_resource_id=name, provider_id=provider_id, model_type=ModelType.llm,
                      metadata={key: model[key] for key in ("id", "kind", "job_id", "root") if model.get(key)})
                for name, model in listed]

    async def should_refresh_models(self) -> bool:
        return True  # models appear as jobs finish and go when they are deleted

    async def register_model(self, model: Model) -> Model:
        """A name for a model posttrain serves (ServedModelError 404 for one it does not)."""
        await asyncio.to_thread(self.models.check, model.provider_resource_id or model.identifier)
        return model

    async def unregister_model(self, model_id: str) -> None:
        pass
