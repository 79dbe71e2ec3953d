"""The request bodies of OpenAI's ``/v1/completions`` and ``/v1/chat/completions``, field for field as
OpenAI's API names them. No torch here: the job service validates requests with these in its API
process before it forwards them to an inference worker, which validates them again with the same models.

Unknown fields are refused (a typo must not silently do nothing): a 400 naming the field.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from posttrain.errors import PosttrainError
from posttrain.spec import MAX_SEED

DEFAULT_COMPLETION_TOKENS = 16  # OpenAI's legacy completions default


class RequestError(PosttrainError):
    """A request the server refuses, answered with ``status`` (4xx) in OpenAI's error shape: ``param`` names
    the field at fault and ``code`` is OpenAI's error code, when there is one."""

    def __init__(self, message: str, status: int = 400, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.param = param
        self.code = code

    @property
    def status_code(self) -> int:
        return self.status


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    include_usage: bool = False


class SamplingFields(BaseModel):
    """Fields shared by both routes."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, protected_namespaces=())

    model: str | None = Field(None, max_length=1024)
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = -1  # vLLM's extension
    ignore_eos: bool = False  # vLLM's extension: generate max_tokens whatever the model says (benchmarks)
    n: int = Field(1, ge=1, le=64)
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=0, le=MAX_SEED)
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    # Accepted at their neutral values only, so clients that always send them keep working.
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0

    @field_validator("presence_penalty", "frequency_penalty")
    @classmethod
    def _neutral(cls, value: float) -> float:
        if value:
            raise ValueError("not supported by this server (only 0)")
        return value

    @field_validator("stop")
    @classmethod
    def _stops(cls, value: str | list[str] | None) -> str | list[str] | None:
        stops = [value] if isinstance(value, str) else list(value or [])
        if len(stops) > 4 or any(not stop for stop in stops):
            raise ValueError("up to 4 non-empty strings")
        return value

    @property
    def stops(self) -> tuple[str, ...]:
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage


class CompletionRequest(SamplingFields):
    prompt: str | list[str] | list[int] | list[list[int]]
    logprobs: int | None = Field(None, ge=0, le=20)
    echo: bool = False

    def check(self) -> None:
        if self.echo:
            raise RequestError("echo=true is not supported by this server", param="echo")
        if isinstance(self.prompt, list) and not self.prompt:
            raise RequestError("prompt is empty", param="prompt")


class TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str | list[TextPart] | None = ""

    def for_template(self) -> dict[str, Any]:
        """The message as chat templates take it: content as one string (text parts joined)."""
        message = self.model_dump(exclude_none=True)
        if isinstance(self.content, list):
            message["content"] = "".join(part.text for part in self.content)
        if message.get("role") == "developer":
            message["role"] = "system"  # OpenAI's newer name for it; templates know "system"
        return message


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)

    def check(self) -> None:
        """What the field types cannot say, as a 400 naming the parameter."""
        if self.top_logprobs and not self.logprobs:
            raise RequestError("top_logprobs needs logprobs=true", param="top_logprobs")
