"""Typed Python client of the posttrain job service; the only code that knows its REST paths.

    from posttrain.client import Client
    client = Client("http://127.0.0.1:8322", api_key="...")   # or POSTTRAIN_SERVER / POSTTRAIN_API_KEY
    job = client.submit({"training": {"max_steps": 10}})
    job = client.wait(job.id)
    client.download(job.id, "final/adapter_model.safetensors", "adapter.safetensors")

Every failure the server reports (4xx/5xx) or a server that cannot be reached raises ``ServiceError``
with the server's message.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Collection, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx

from posttrain.job.directory import TERMINAL_STATES
from posttrain.service.schemas import (
    ArtifactList,
    EvalReport,
    FileInfo,
    FileList,
    JobInfo,
    JobPage,
    LogTail,
    MetricsResponse,
)

DEFAULT_SERVER = "http://127.0.0.1:8322"
TERMINAL = TERMINAL_STATES


class ServiceError(Exception):
    """The service answered with an error (``status_code``) or could not be reached (status_code 0)."""

    def __init__(self, status_code: int, message: str) -> None:
        super().__init__(f"{message} (HTTP {status_code})" if status_code else message)
        self.status_code = status_code
        self.message = message


class Client:
    def __init__(self, server: str | None = None, api_key: str | None = None, timeout: float = 60.0) -> None:
        self.server = (server or os.environ.get("POSTTRAIN_SERVER") or DEFAULT_SERVER).rstrip("/")
        api_key = api_key if api_key is not None else os.environ.get("POSTTRAIN_API_KEY")
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._http = httpx.Client(base_url=self.server, headers=headers, timeout=timeout)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    # -- transport ----------------------------------------------------------------------------------
    def _request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        try:
            response = self._http.request(method, path, **kwargs)
        except httpx.TransportError as exc:
            raise ServiceError(0, f"cannot reach the posttrain service at {self.server}: {exc}") from None
        _raise_for_error(response)
        return response

    # -- health -------------------------------------------------------------------------------------
    def health(self) -> bool:
        return self._request("GET", "/healthz").json().get("status") == "ok"

    def ready(self) -> bool:
        try:
            return self._request("GET", "/readyz").json().get("status") == "ok"
        except ServiceError:
            return False

    # -- jobs ---------------------------------------------------------------------------------------
    def submit(
        self, spec: dict[str, Any] | None = None, *, yaml: str | None = None, overrides: list[str] | None = None,
        priority: int = 0,
    ) -> JobInfo:
        """Submit a JobSpec (a dict or JobSpec.model_dump()) or YAML text; returns the queued job."""
        body: dict[str, Any] = {"overrides": list(overrides or []), "priority": priority}
        if yaml is not None:
            body["yaml"] = yaml
        else:
            body["spec"] = spec or {}
        return JobInfo.model_validate(self._request("POST", "/v1/jobs", json=body).json())

    def list_jobs(self, state: list[str] | str | None = None, limit: int = 50, offset: int = 0) -> JobPage:
        params: dict[str, Any] = {"limit": limit, "offset": offset}
        if state:
            params["state"] = [state] if isinstance(state, str) else list(state)
        return JobPage.model_validate(self._request("GET", "/v1/jobs", params=params).json())

    def get_job(self, job_id: str) -> JobInfo:
        return JobInfo.model_validate(self._request("GET", f"/v1/jobs/{_seg(job_id)}").json())

    def cancel(self, job_id: str) -> JobInfo:
        return JobInfo.model_validate(self._request("POST", f"/v1/jobs/{_seg(job_id)}/cancel").json())

    def pause(self, job_id: str) -> JobInfo:
        """Pause a queued or running job (a running one stops at its next step, with a checkpoint; wait for
        ``paused`` with ``wait(job_id, states={"paused"})``). ServiceError 409 if it cannot be paused."""
        return JobInfo.model_validate(self._request("POST", f"/v1/jobs/{_seg(job_id)}/pause").json())

    def resume(self, job_id: str) -> JobInfo:
        """Queue a paused job again; it continues from its newest complete checkpoint."""
        return JobInfo.model_validate(self._request("POST", f"/v1/jobs/{_seg(job_id)}/resume").json())

    def delete(self, job_id: str) -> None:
        self._request("DELETE", f"/v1/jobs/{_seg(job_id)}")

    def wait(self, job_id: str, timeout: float | None = None, poll: float = 0.5,
             states: Collection[str] = TERMINAL) -> JobInfo:
        """Poll until the job is in one of ``states`` (by default: succeeded, failed or cancelled; a paused
        job waits for its resume); ServiceError(408) on timeout."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            job = self.get_job(job_id)
            if job.state in states:
                return job
            if deadline is not None and time.monotonic() > deadline:
                raise ServiceError(408, f"job {job_id} still {job.state} after {timeout:.0f}s")
            time.sleep(poll)

    def logs(self, job_id: str, tail: int = 200) -> list[str]:
        response = self._request("GET", f"/v1/jobs/{_seg(job_id)}/logs", params={"tail": tail})
        return LogTail.model_validate(response.json()).lines

    def follow_logs(self, job_id: str, tail: int = 200) -> Iterator[str]:
        """Yield log lines as the worker writes them, until the job ends (server-sent events)."""
        params = {"tail": tail, "follow": "true"}
        try:
            with self._http.stream("GET", f"/v1/jobs/{_seg(job_id)}/logs", params=params,
                                   timeout=httpx.Timeout(self._http.timeout.connect, read=None)) as response:
                if response.is_error:
                    response.read()
                    _raise_for_error(response)
                event = None
                data: list[str] = []
                for line in response.iter_lines():
                    if line.startswith("event:"):
                        event = line[6:].strip()
                    elif line.startswith("data:"):
                        data.append(line[5:].removeprefix(" "))
                    elif line == "":
                        if event == "end":
                            return
                        if data:
                            yield "\n".join(data)
                        event, data = None, []
        except httpx.TransportError as exc:
            raise ServiceError(0, f"lost the log stream from {self.server}: {exc}") from None

    def metrics(self, job_id: str, since_step: int | None = None, limit: int | None = None) -> list[dict[str, Any]]:
        """The job's metrics records logged after ``since_step``: every one (fetched page by page), or the
        first ``limit``."""
        records: list[dict[str, Any]] = []
        while True:
            params: dict[str, Any] = {"since_step": since_step} if since_step is not None else {}
            if limit is not None:
                params["limit"] = min(limit - len(records), 10_000)
            response = self._request("GET", f"/v1/jobs/{_seg(job_id)}/metrics", params=params)
            page = MetricsResponse.model_validate(response.json())
            records.extend(page.metrics)
            last_step = page.metrics[-1].get("step") if page.metrics else None
            if not page.more or (limit is not None and len(records) >= limit) or not isinstance(last_step, int):
                return records
            since_step = last_step

    def evaluation(self, job_id: str, step: int | None = None) -> EvalReport:
        """The job's latest and best evaluation, and the answers of one evaluation (default: the latest)."""
        params = {"step": step} if step is not None else {}
        return EvalReport.model_validate(self._request("GET", f"/v1/jobs/{_seg(job_id)}/eval", params=params).json())

    def artifacts(self, job_id: str) -> ArtifactList:
        return ArtifactList.model_validate(self._request("GET", f"/v1/jobs/{_seg(job_id)}/artifacts").json())

    def download(self, job_id: str, path: str, dest: str | os.PathLike[str]) -> Path:
        """Download one file of the job (``path`` as listed by ``artifacts``) to ``dest``."""
        dest = Path(dest)
        url = f"/v1/jobs/{_seg(job_id)}/artifacts/{quote(path, safe='/')}"
        try:
            with self._http.stream("GET", url) as response:
                if response.is_error:
                    response.read()
                    _raise_for_error(response)
                dest.parent.mkdir(parents=True, exist_ok=True)
                partial = dest.with_name(dest.name + ".part")
                with open(partial, "wb") as out:
                    for chunk in response.iter_bytes():
                        out.write(chunk)
                partial.replace(dest)
        except httpx.TransportError as exc:
            raise ServiceError(0, f"download from {self.server} failed: {exc}") from None
        return dest

    # -- files --------------------------------------------------------------------------------------
    def upload(self, path: str | os.PathLike[str]) -> FileInfo:
        """Upload a dataset file; put the returned ``.source`` into ``data.source`` of a JobSpec."""
        path = Path(path)
        with open(path, "rb") as handle:
            response = self._request("POST", "/v1/files", files={"file": (path.name, handle)})
        return FileInfo.model_validate(response.json())

    def list_files(self, limit: int = 100, after: str | None = None) -> FileList:
        """The caller's uploads, newest first; ``has_more`` means ask again with ``after`` = the last id."""
        params: dict[str, Any] = {"limit": limit, **({"after": after} if after else {})}
        return FileList.model_validate(self._request("GET", "/v1/files", params=params).json())

    def get_file(self, file_id: str) -> FileInfo:
        return FileInfo.model_validate(self._request("GET", f"/v1/files/{_seg(file_id)}").json())

    def delete_file(self, file_id: str) -> None:
        self._request("DELETE", f"/v1/files/{_seg(file_id)}")

    # -- served models (OpenAI's inference API) -----------------------------------------------------
    def list_models(self) -> list[dict[str, Any]]:
        """The base models and the caller's fine-tuned models and checkpoints the server serves."""
        return self._request("GET", "/v1/models").json()["data"]

    def get_model(self, model_id: str) -> dict[str, Any]:
        return self._request("GET", f"/v1/models/{quote(model_id, safe='/')}").json()

    def delete_model(self, model_id: str) -> None:
        """Stop serving a fine-tuned model or checkpoint and delete its weights (the job stays)."""
        self._request("DELETE", f"/v1/models/{quote(model_id, safe='/')}")

    def chat(self, model: str, messages: list[dict[str, str]], **sampling: Any) -> Iterator[str]:
        """Stream the answer to ``messages`` (OpenAI chat messages) from ``model``, piece by piece.
        ``sampling``: more fields of the request (max_tokens, temperature, seed, ...)."""
        body = {"model": model, "messages": messages, "stream": True,
                **{key: value for key, value in sampling.items() if value is not None}}
        try:
            with self._http.stream("POST", "/v1/chat/completions", json=body,
                                   timeout=httpx.Timeout(self._http.timeout.connect, read=None)) as response:
                if response.is_error:
                    response.read()
                    _raise_for_error(response)
                for line in response.iter_lines():
                    data = line.removeprefix("data:").strip() if line.startswith("data:") else None
                    if not data:
                        continue
                    if data == "[DONE]":
                        return
                    chunk = json.loads(data)
                    if "error" in chunk:
                        raise ServiceError(500, chunk["error"].get("message", "generation failed"))
                    for choice in chunk.get("choices", []):
                        if choice.get("delta", {}).get("content"):
                            yield choice["delta"]["content"]
        except httpx.TransportError as exc:
            raise ServiceError(0, f"lost the answer stream from {self.server}: {exc}") from None


def _seg(value: str) -> str:
    return quote(value, safe="")


class AsyncInference:
    """The service's OpenAI generation routes for asyncio code (the Llama Stack remote inference provider).
    Each call returns the answer with its body unread, so that a stream is read as it comes (close it after);
    an error answer is the caller's to read (OpenAI's error body). A server that cannot be reached raises
    ``ServiceError`` (status 0)."""

    def __init__(self, server: str | None = None, api_key: str | None = None, timeout: float = 60.0) -> None:
        self.server = (server or os.environ.get("POSTTRAIN_SERVER") or DEFAULT_SERVER).rstrip("/")
        api_key = api_key if api_key is not None else os.environ.get("POSTTRAIN_API_KEY")
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        # No read timeout: an answer streams for as long as it takes.
        self._http = httpx.AsyncClient(base_url=self.server, headers=headers,
                                       timeout=httpx.Timeout(timeout, read=None))

    async def _post(self, path: str, body: dict[str, Any]) -> httpx.Response:
        try:
            return await self._http.send(self._http.build_request("POST", path, json=body), stream=True)
        except httpx.TransportError as exc:
            raise ServiceError(0, f"cannot reach the posttrain service at {self.server}: {exc}") from None

    async def chat_completions(self, body: dict[str, Any]) -> httpx.Response:
        return await self._post("/v1/chat/completions", body)

    async def completions(self, body: dict[str, Any]) -> httpx.Response:
        return await self._post("/v1/completions", body)

    async def aclose(self) -> None:
        await self._http.aclose()


def _raise_for_error(response: httpx.Response) -> None:
    if not response.is_error:
        return
    try:
        body = response.json()
        message = body.get("detail") or body.get("message") or json.dumps(body)
        if not isinstance(message, str):
            message = json.dumps(message)
    except (json.JSONDecodeError, AttributeError, UnicodeDecodeError):
        message = response.text.strip() or response.reason_phrase
    raise ServiceError(response.status_code, message)
