"""``posttrain chat MODEL``: talk to a model, answers streamed as they are generated.

MODEL is a base model (``posttrain:smollm2``, a model folder), a job directory, its ``final/`` or a
checkpoint folder, loaded here through the same inference engine the server uses; with ``--server``, it
is a model id of that server (``posttrain jobs models`` lists them), answered by the server.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from typing import Annotated

import typer

from posttrain.commands.common import fail
from posttrain.commands.jobs import ApiKey
from posttrain.errors import PosttrainError

DEFAULT_MAX_TOKENS = 256
Answer = Callable[[list[dict[str, str]]], Iterator[str]]


def local_answerer(model: str, max_tokens: int, temperature: float, seed: int | None) -> Answer:
    """Answers from ``model`` loaded in this process (the serving worker's pool and engine)."""
    import queue

    from posttrain.inference.engine import TokenEvent
    from posttrain.inference.model_source import local_source
    from posttrain.inference.openai_protocol import ChatCompletionRequest
    from posttrain.inference.openai_routes import chat_prompt, sampling
    from posttrain.inference.pool import ModelPool, PoolOptions
    from posttrain.modeling import apply_threads, resolve_device

    apply_threads(None, resolve_device("auto"))
    engine, adapter = ModelPool(PoolOptions(memory_bytes=1 << 62)).resolve(local_source(model))

    def answer(messages: list[dict[str, str]]) -> Iterator[str]:
        body = ChatCompletionRequest.model_validate({"messages": messages, "temperature": temperature, "seed": seed})
        prompt = chat_prompt(engine, body)
        params = sampling(body, max(1, min(max_tokens, engine.max_model_len - len(prompt))), None)
        pieces: queue.Queue[str | None] = queue.Queue()

        def listen(events: list[TokenEvent]) -> None:
            for event in events:
                pieces.put(event.text)

        future = engine.submit(prompt, params, adapter, listen)
        future.add_done_callback(lambda _f: pieces.put(None))
        try:
            while (piece := pieces.get()) is not None:
                yield piece
            future.result()  # raises what failed the generation
        finally:
            future.cancel()

    return answer


def server_answerer(model: str, server: str | None, api_key: str | None, max_tokens: int, temperature: float,
                    seed: int | None) -> Answer:
    from posttrain.client import Client

    client = Client(server, api_key)
    client.get_model(model)  # a model the server does not know fails now, not after the first question

    def answer(messages: list[dict[str, str]]) -> Iterator[str]:
        yield from client.chat(model, messages, max_tokens=max_tokens, temperature=temperature, seed=seed)

    return answer


def chat(
    model: Annotated[str, typer.Argument(help="A base model (posttrain:smollm2, a folder), a job directory, its "
                                              "final/ or a checkpoint; with --server, a model id of the server.")],
    prompt: Annotated[str | None, typer.Option("--prompt", "-p", help="Ask this once, print the answer, exit.")] = None,
    system: Annotated[str | None, typer.Option(help="A system message before the conversation.")] = None,
    server: Annotated[str | None, typer.Option(
        "--server", envvar="POSTTRAIN_CHAT_SERVER",
        help="A posttrain server's URL: MODEL is one of its model ids (posttrain jobs models).")] = None,
    api_key: ApiKey = None,
    max_tokens: Annotated[int, typer.Option(help="Most tokens in one answer.")] = DEFAULT_MAX_TOKENS,
    temperature: Annotated[float, typer.Option(help="0: greedy (the same answer every time).")] = 0.7,
    seed: Annotated[int | None, typer.Option(help="Sampling seed: the same seed and question, the same answer.")] = None,
) -> None:
    """Chat with a model: an interactive prompt (Ctrl-D or 'exit' to leave), or one answer with --prompt."""
    from posttrain.client import ServiceError

    if max_tokens < 1 or not 0 <= temperature <= 2:
        fail("--max-tokens must be at least 1 and --temperature within 0..2")
    try:
        answer = (server_answerer(model, server, api_key, max_tokens, temperature, seed) if server
                  else local_answerer(model, max_tokens, temperature, seed))
        messages = [{"role": "system", "content": system}] if system else []
        questions = [prompt] if prompt is not None else _questions()
        for question in questions:
            messages.append({"role": "user", "content": question})
            reply = []
            for piece in answer(messages):
                reply.append(piece)
                sys.stdout.write(piece)
                sys.stdout.flush()
            sys.stdout.write("\n")
            messages.append({"role": "assistant", "content": "".join(reply)})
    except (PosttrainError, ServiceError) as exc:
        fail(exc)


def _questions() -> Iterator[str]:
    interactive = sys.stdin.isatty()
    while True:
        try:
            line = input("> " if interactive else "")
        except (EOFError, KeyboardInterrupt):
            return
        if line.strip() in ("exit", "quit"):
            return
        if line.strip():
            yield line
