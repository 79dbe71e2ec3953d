"""``posttrain serve --inference-backend vllm``: the OpenAI inference routes answered by ``vllm serve``.

One ``vllm serve --enable-lora`` per base model (an embedded name, a model folder, a full fine-tune's
folder), started on its first request and supervised like posttrain's own worker (an InferenceWorker each:
restarted when it dies, stopped with the service). It is started through ``posttrain rl serve-inference
--backend vllm`` under the workers' Python, which resolves posttrain's model names (``posttrain:tiny`` is
built into a folder there, with torch) and then execs ``vllm serve`` (inference/launch.py). A fine-tuned
LoRA model is loaded into its base's server through vLLM's own adapter route (``/v1/load_lora_adapter``,
named by its folder) before its first request, so every adapter of a base shares one server and its
batches; the request's ``model`` is rewritten to the adapter's (or the base's) vLLM name, and the answer's
back to the name the caller used.

Each server takes vLLM's default share of its GPU's memory (``--gpu-memory-utilization`` 0.9): one base model
per GPU (``--inference-device cuda:N``), with as many adapters over it as requests name.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx

from posttrain.errors import UnsupportedError
from posttrain.inference.model_source import ModelSource
from posttrain.service.errors import InvalidRequest
from posttrain.service.inference_worker import InferenceWorker
from posttrain.service.settings import ServiceSettings

MAX_LORA_RANK = 64  # the largest adapter rank every server accepts (vLLM preallocates for it)


def find_vllm(python: str) -> str | None:
    """The ``vllm`` executable the workers' Python would run: beside it (its environment), else on PATH."""
    beside = Path(python).parent / "vllm"
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    return shutil.which("vllm")


def check_vllm(settings: ServiceSettings) -> None:
    """Fail at start-up, not at the first request, when vLLM cannot run."""
    if find_vllm(settings.worker_python) is None:
        example = " ".join(vllm_command(settings, ModelSource(base="posttrain:smollm2"), 8000))
        raise UnsupportedError(
            f"--inference-backend vllm needs vLLM installed where {settings.worker_python} finds it (beside it or "
            f"on PATH): pip install vllm, on a machine with a CUDA GPU. Without it, leave --inference-backend at "
            f"posttrain. Each base model would be served by: {example}")


def vllm_command(settings: ServiceSettings, source: ModelSource, port: int) -> list[str]:
    """The command that serves ``source``'s base model on ``port`` (its key comes in the environment)."""
    command = [settings.worker_python, "-m", "posttrain.cli", "rl", "serve-inference", "--backend", "vllm",
               "--model", source.base, "--served-model-name", source.base, "--port", str(port),
               "--enable-lora", "--max-lora-rank", str(MAX_LORA_RANK), "--dtype", settings.inference_dtype]
    if source.tokenizer:
        command += ["--tokenizer", source.tokenizer]
    return command


def renamed(body: bytes, name: str) -> bytes:
    """A JSON answer (a completion or one streamed chunk) with its ``model`` set to ``name``."""
    try:
        parsed = json.loads(body)
    except ValueError:
        return body
    if not isinstance(parsed, dict) or "model" not in parsed:
        return body
    parsed["model"] = name
    return json.dumps(parsed, separators=(",", ":")).encode()


def renamed_event(event: bytes, name: str) -> bytes:
    """One server-sent event; ``data: [DONE]`` and anything but a JSON chunk pass as they are."""
    if not event.startswith(b"data: "):
        return event
    return b"data: " + renamed(event[len(b"data: "):], name)


class _RenamedStream(httpx.AsyncByteStream):
    """vLLM's stream with each event's ``model`` renamed; closing it closes vLLM's answer."""

    def __init__(self, response: httpx.Response, name: str) -> None:
        self.response = response
        self.name = name

    async def __aiter__(self) -> AsyncIterator[bytes]:
        buffer = b""
        async for chunk in self.response.aiter_raw():
            buffer += chunk
            while b"\n\n" in buffer:
                event, buffer = buffer.split(b"\n\n", 1)
                yield renamed_event(event, self.name) + b"\n\n"
        if buffer:
            yield buffer

    async def aclose(self) -> None:
        await self.response.aclose()


class VllmBackend:
    """An InferenceBackend (inference_worker.py) of ``vllm serve`` processes, one per base model."""

    def __init__(self, settings: ServiceSettings) -> None:
        self.settings = settings
        self._servers: dict[str, InferenceWorker] = {}
        self._started = 0  # servers made so far: each writes its own log
        self._adapters: dict[str, tuple[int, set[str]]] = {}  # base -> (its server's restarts, loaded adapters)
        self._locks: dict[str, asyncio.Lock] = {}

    def _server(self, source: ModelSource) -> InferenceWorker:
        server = self._servers.get(source.base)
        if server is None:
            self._started += 1
            # serve-inference finds `vllm` on PATH: put the workers' environment first, where pip put it.
            path = f"{Path(self.settings.worker_python).parent}{os.pathsep}{os.environ.get('PATH', '')}"
            server = InferenceWorker(self.settings, lambda port: vllm_command(self.settings, source, port),
                                     self.settings.data_dir / f"vllm-{self._started}.log", {"PATH": path})
            self._servers[source.base] = server
        return server

    async def _load_adapter(self, server: InferenceWorker, source: ModelSource) -> None:
        """Load ``source.adapter`` into its base's server once per server process (a restart forgets them)."""
        assert source.adapter is not None
        lock = self._locks.setdefault(source.base, asyncio.Lock())
        async with lock:
            restarts, loaded = self._adapters.get(source.base, (-1, set()))
            if restarts != server.restarts:
                restarts, loaded = server.restarts, set()
                self._adapters[source.base] = (restarts, loaded)
            if source.adapter in loaded:
                return
            body = json.dumps({"lora_name": source.adapter, "lora_path": source.adapter}).encode()
            response = await server.post("/v1/load_lora_adapter", body)
            text = (await response.aread()).decode(errors="replace")
            await response.aclose()
            if response.status_code != 200 and "already" not in text:
                raise InvalidRequest(f"vLLM could not load the adapter {source.adapter}: {text}", status_code=502)
            loaded.add(source.adapter)

    async def send(self, path: str, body: bytes, source: ModelSource) -> httpx.Response:
        server = self._server(source)
        if source.adapter is not None:
            await self._load_adapter(server, source)
        request: Any = json.loads(body)
        requested = request.get("model")
        request["model"] = source.adapter or source.base
        response = await server.post(path, json.dumps(request).encode())
        headers = {"content-type": response.headers.get("content-type", "application/json")}
        if not request.get("stream") or response.status_code != 200:
            content = await response.aread()
            await response.aclose()
            if response.status_code == 200:
                content = renamed(content, requested)
            return httpx.Response(response.status_code, headers=headers, content=content)
        return httpx.Response(200, headers=headers, stream=_RenamedStream(response, requested))

    async def evict(self, source: ModelSource) -> None:
        """An adapter leaves its base's server; a base (a full fine-tune) stops its server."""
        server = self._servers.get(source.base)
        if server is None:
            return
        if source.adapter is None:
            self._servers.pop(source.base)
            await server.aclose()
            await asyncio.to_thread(server.close)
            return
        _, loaded = self._adapters.get(source.base, (-1, set()))
        if source.adapter in loaded:
            loaded.discard(source.adapter)
            body = json.dumps({"lora_name": source.adapter}).encode()
            try:
                response = await server.post("/v1/unload_lora_adapter", body)
                await response.aclose()
            except InvalidRequest:  # the server is gone: so is the adapter
                pass

    def state(self) -> dict[str, Any]:
        states = {base: server.state() for base, server in self._servers.items()}
        ready = [base for base, state in states.items() if state["inference_worker"] == "ready"]
        return {"inference_worker": "ready" if ready else "starting" if states else "not started",
                "inference_backend": "vllm", "vllm_servers": {base: state["inference_worker"]
                                                              for base, state in states.items()},
                "inference_restarts": sum(server.restarts for server in self._servers.values())}

    def close(self) -> None:
        for server in self._servers.values():
            server.close()

    async def aclose(self) -> None:
        for server in self._servers.values():
            await server.aclose()
