"""The job service's inference worker: started on the first inference request, supervised, restarted.

Generation never runs in the API process (it imports no torch): the service starts
``python -m posttrain.inference.serving`` on a free loopback port with a key of its own, and sends each
OpenAI request to it over HTTP (httpx), streams included, with the weights' location the catalog resolved
(``X-Posttrain-Model``). A supervisor thread owns the process: it starts it when first wanted, restarts it
when it dies (a crash, an out-of-memory kill), backing off when it keeps dying, and stops it with the
service. The worker is started from that long-lived thread because the kernel ties the worker's
parent-death signal to the thread that forked it (see inference/parent_watch.py).

It runs beside the training slots, not in one: a serving load never keeps a queued job from starting.
``--inference-threads`` and ``--inference-device`` say what it may use.

No FastAPI here: the HTTP routes (routes/inference.py) and the Llama Stack inline provider both call
:meth:`InferenceBackend.send` and shape its answer for their own callers.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import httpx

from posttrain.inference.model_source import SOURCE_HEADER, ModelSource
from posttrain.inference.process import API_KEY_VARIABLE, InferenceServerProcess, ServerProcessError, tail
from posttrain.ports import free_port
from posttrain.service.errors import InvalidRequest
from posttrain.service.settings import ServiceSettings

log = logging.getLogger("posttrain.service")
logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per forwarded request is noise in the log
QUICK_DEATH_S = 60.0  # a worker that dies sooner than this after starting counts towards backing off
MAX_BACKOFF_S = 30.0


class InferenceBackend(Protocol):
    """What the inference routes (and the Llama Stack inline provider) need from whatever generates: this
    module's worker, or ``vllm serve`` on a GPU (vllm_backend.py) behind the same methods."""

    async def send(self, path: str, body: bytes, source: ModelSource) -> httpx.Response:
        """POST an OpenAI request body (``/v1/chat/completions``, ``/v1/completions``) for the model at
        ``source``; the answer with its body not read yet (a stream is read as it comes; close it after).
        InferenceUnavailable while nothing can answer."""
        ...

    async def evict(self, source: ModelSource) -> None: ...

    def state(self) -> dict[str, Any]: ...

    def close(self) -> None: ...

    async def aclose(self) -> None: ...


class InferenceUnavailable(InvalidRequest):
    def __init__(self, message: str) -> None:
        super().__init__(message, status_code=503, headers={"Retry-After": "5"})


def worker_command(settings: ServiceSettings, port: int) -> list[str]:
    if settings.inference_command:
        return [*settings.inference_command, "--port", str(port)]
    command = [settings.worker_python, "-m", "posttrain.inference.serving", "--port", str(port),
               "--memory-mb", str(settings.inference_memory_mb), "--device", settings.inference_device_kind,
               "--dtype", settings.inference_dtype,
               "--max-batch-size", str(settings.inference_max_batch_size)]
    if settings.inference_threads:
        command += ["--threads", str(settings.inference_threads)]
    return command


class InferenceWorker:
    """One supervised inference server process. ``command(port)``: how to start it (default: posttrain's
    worker); vllm_backend.py runs one of these per ``vllm serve``."""

    def __init__(self, settings: ServiceSettings, command: Callable[[int], list[str]] | None = None,
                 log_path: Path | None = None, environment: dict[str, str] | None = None) -> None:
        self.settings = settings
        self.command = command or (lambda port: worker_command(settings, port))
        self.environment = {**settings.inference_environment, **(environment or {})}
        self.key = secrets.token_urlsafe(24)
        self.log_path = log_path or settings.data_dir / "inference-worker.log"
        self.restarts = 0
        self.last_error: str | None = None
        self._process: InferenceServerProcess | None = None
        self._url: str | None = None
        self._wanted = threading.Event()
        self._ready = threading.Event()
        self._start_failed = threading.Event()
        self._started_at = 0.0
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._client: httpx.AsyncClient | None = None

    # -- supervision ------------------------------------------------------------------------------------------
    def wait_ready(self, timeout: float) -> str:
        """The worker's URL once it answers; starts it on first use. InferenceUnavailable otherwise."""
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._supervise, name="posttrain-inference-worker",
                                                daemon=True)
                self._thread.start()
        self._wanted.set()
        self._wake.set()
        deadline = time.monotonic() + timeout
        while not self._ready.wait(0.1):
            if self._start_failed.is_set() or time.monotonic() > deadline:
                why = f": {self.last_error}" if self.last_error else " in time"
                raise InferenceUnavailable(f"the inference worker is not ready{why} (its log: {self.log_path})")
        assert self._url is not None
        return self._url

    def _supervise(self) -> None:
        backoff = 0.0
        while not self._stop.is_set():
            process = self._process
            if process is not None and not process.running:
                code = process.process.returncode if process.process is not None else None
                self._ready.clear()
                self.restarts += 1
                self.last_error = f"it exited with code {code}"
                log.warning("inference worker exited with code %s; restarting it\n%s", code, tail(self.log_path, 10))
                lived = time.monotonic() - self._started_at
                backoff = min(MAX_BACKOFF_S, max(1.0, backoff * 2)) if lived < QUICK_DEATH_S else 0.0
                self._process = process = None
            if self._wanted.is_set() and process is None:
                if backoff and self._stop.wait(backoff):
                    return
                if not self._start():
                    backoff = min(MAX_BACKOFF_S, max(1.0, backoff * 2))
            self._wake.wait(1.0)
            self._wake.clear()

    def _start(self) -> bool:
        self._start_failed.clear()
        port = free_port()
        env = {API_KEY_VARIABLE: self.key, **self.environment}
        # In the data dir, not wherever the service was started: `python -m` puts its working directory first on
        # sys.path, and a folder named posttrain there (Llama Stack's data dir has one) would shadow the package.
        process = InferenceServerProcess(self.command(port), f"http://127.0.0.1:{port}",
                                         log_path=self.log_path, env=env, cwd=self.settings.data_dir,
                                         startup_timeout=self.settings.inference_startup_timeout_s)
        self._started_at = time.monotonic()
        try:
            process.start()
        except ServerProcessError as exc:
            process.stop(grace=5)
            self.last_error = exc.message
            self._start_failed.set()
            log.error("inference worker did not start: %s", exc.message)
            return False
        self._process, self._url = process, process.url
        self.last_error = None
        self._ready.set()
        log.info("inference worker ready at %s (pid %s)", process.url, process.process.pid if process.process else None)
        return True

    def state(self) -> dict[str, Any]:
        running = self._process is not None and self._process.running
        return {"inference_worker": "ready" if running and self._ready.is_set() else
                "starting" if self._wanted.is_set() else "not started", "inference_restarts": self.restarts}

    def close(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        if self._process is not None:
            self._process.stop(grace=10)
            self._process = None

    # -- requests ---------------------------------------------------------------------------------------------
    def _http(self) -> httpx.AsyncClient:
        if self._client is None:
            # No read timeout: a long answer streams for as long as it takes; a dead worker closes the socket.
            self._client = httpx.AsyncClient(timeout=httpx.Timeout(30.0, read=None), headers={
                "Authorization": f"Bearer {self.key}"})
        return self._client

    async def post(self, path: str, body: bytes, headers: dict[str, str] | None = None) -> httpx.Response:
        """POST ``body`` to the worker's ``path`` (started on first use); its answer, body not read yet."""
        url = await asyncio.to_thread(self.wait_ready, self.settings.inference_startup_timeout_s)
        client = self._http()
        request = client.build_request("POST", url + path, content=body, headers={
            "Content-Type": "application/json", **(headers or {})})
        try:
            return await client.send(request, stream=True)
        except httpx.HTTPError as exc:
            self._wake.set()  # let the supervisor notice a dead worker now
            raise InferenceUnavailable(f"the inference worker did not answer ({exc}); it is being restarted, "
                                       "try again") from None

    async def send(self, path: str, body: bytes, source: ModelSource) -> httpx.Response:
        return await self.post(path, body, {SOURCE_HEADER: source.to_header()})

    async def evict(self, source: ModelSource) -> None:
        """Unload what serves ``source`` in a running worker (best effort: a stopped one has nothing loaded)."""
        if self._url is None or not self._ready.is_set():
            return
        with contextlib.suppress(httpx.HTTPError):
            await self._http().post(self._url + "/v1/models/evict", json={"base": source.base,
                                                                        "adapter": source.adapter})

    async def aclose(self) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = None
