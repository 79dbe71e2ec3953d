"""The FastAPI app: thin routes over the store, the scheduler and the job directories.

Paths (the client in ``posttrain/client.py`` is the only other place that knows them):
``/v1/jobs`` (POST submit, GET list), ``/v1/jobs/{id}`` (GET, DELETE), ``/v1/jobs/{id}/cancel``,
``/v1/jobs/{id}/logs``, ``/v1/jobs/{id}/metrics``, ``/v1/jobs/{id}/artifacts[/{path}]``, ``/v1/files``,
``/healthz``, ``/readyz``. Every error body is JSON ``{"detail": "<message>", "type": ...}``.
"""

from __future__ import annotations

import fcntl
import importlib
import logging
import os
import re
import shutil
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import IO, Annotated

from fastapi import Depends, FastAPI, File, HTTPException, Query, Request, UploadFile
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from posttrain import __version__
from posttrain.errors import PosttrainError
from posttrain.jobdir import TERMINAL_STATES, JobDir
from posttrain.launchers import Launcher
from posttrain.launchers.local import LocalLauncher
from posttrain.service.auth import require_api_key
from posttrain.service.limits import BodySizeLimit
from posttrain.service.scheduler import Scheduler
from posttrain.service.schemas import (
    ArtifactList,
    ErrorBody,
    FileInfo,
    Health,
    JobInfo,
    JobPage,
    JobStateName,
    LogTail,
    MetricsResponse,
    SubmitJobRequest,
)
from posttrain.service.settings import ServiceSettings
from posttrain.service.store import JobRecord, JobStore
from posttrain.service.submission import submit_job
from posttrain.service.uploads import UploadTooLarge, file_info, save_upload
from posttrain.service.views import (
    UnsafePath,
    artifact_list,
    follow_log,
    job_info,
    resolve_artifact,
    tail_lines,
)

log = logging.getLogger("posttrain.service")
_ID = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
ERRORS = {code: {"model": ErrorBody} for code in (400, 401, 403, 404, 409, 413, 422)}


def find_job(store: JobStore, job_id: str) -> JobRecord:
    record = store.get_job(job_id) if _ID.match(job_id) else None
    if record is None:
        raise HTTPException(404, f"no job {job_id!r}")
    return record


def _job_record(job_id: str, request: Request) -> JobRecord:
    return find_job(request.app.state.store, job_id)


# Module level: FastAPI resolves these (string) annotations in the module's namespace.
Job = Annotated[JobRecord, Depends(_job_record)]


def create_app(settings: ServiceSettings, launcher: Launcher | None = None) -> FastAPI:
    settings.jobs_dir.mkdir(parents=True, exist_ok=True)
    settings.files_dir.mkdir(parents=True, exist_ok=True)
    lock = lock_data_dir(settings.data_dir)
    store = JobStore(settings.database_url)
    scheduler = Scheduler(store, launcher or LocalLauncher(settings.worker_command), settings)

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        scheduler.start()
        threading.Thread(target=_warm_imports, name="posttrain-warm-imports", daemon=True).start()
        try:
            yield
        finally:
            scheduler.stop()
            store.close()
            lock.close()

    app = FastAPI(title="posttrain job service", version=__version__, lifespan=lifespan, responses=ERRORS)
    app.state.settings = settings
    app.state.store = store
    app.state.scheduler = scheduler
    app.add_middleware(BodySizeLimit, body_limit=settings.max_body_bytes, upload_limit=settings.max_upload_bytes)
    _add_error_handlers(app)

    auth = [Depends(require_api_key)]

    @app.get("/healthz", response_model=Health, tags=["health"])
    def healthz() -> Health:
        return Health(status="ok")

    @app.get("/readyz", response_model=Health, tags=["health"])
    def readyz() -> JSONResponse:
        try:
            store.ping()
        except Exception as exc:
            return JSONResponse({"status": "unavailable", "detail": f"database unreachable: {exc}"}, 503)
        if not scheduler.alive:
            return JSONResponse({"status": "unavailable", "detail": "scheduler is not running"}, 503)
        return JSONResponse({"status": "ok"})

    @app.post("/v1/jobs", status_code=201, response_model=JobInfo, dependencies=auth, tags=["jobs"])
    def submit(body: SubmitJobRequest) -> JobInfo:
        record = submit_job(body, store, settings)
        scheduler.wake()
        return job_info(record)

    @app.get("/v1/jobs", response_model=JobPage, dependencies=auth, tags=["jobs"])
    def list_jobs(
        state: Annotated[list[JobStateName] | None, Query(description="Only jobs in these states.")] = None,
        limit: Annotated[int, Query(ge=1, le=500)] = 50,
        offset: Annotated[int, Query(ge=0)] = 0,
    ) -> JobPage:
        records, total = store.list_jobs(list(state) if state else None, limit, offset)
        return JobPage(jobs=[job_info(r) for r in records], total=total, limit=limit, offset=offset)

    @app.get("/v1/jobs/{job_id}", response_model=JobInfo, dependencies=auth, tags=["jobs"])
    def get_job_info(job_id: str) -> JobInfo:
        # The hot path of every poller: look the job up here rather than through the Job dependency,
        # which would cost a second hop through the thread pool.
        return job_info(find_job(store, job_id))

    @app.post("/v1/jobs/{job_id}/cancel", response_model=JobInfo, dependencies=auth, tags=["jobs"])
    def cancel(job: Job) -> JobInfo:
        if store.cancel_queued(job.id):
            JobDir(job.job_dir).update_status(state="cancelled")
        elif store.request_cancel(job.id):
            scheduler.wake()  # it sends SIGTERM, then SIGKILL after the grace period
        else:
            current = store.get_job(job.id) or job
            raise HTTPException(409, f"job {job.id} already finished ({current.state}); nothing to cancel")
        return job_info(store.get_job(job.id) or job)

    @app.delete("/v1/jobs/{job_id}", status_code=204, dependencies=auth, tags=["jobs"])
    def delete(job: Job) -> None:
        if job.state not in TERMINAL_STATES:
            raise HTTPException(409, f"job {job.id} is {job.state}; cancel it before deleting it")
        root = Path(job.job_dir)
        if root.resolve().is_relative_to(settings.jobs_dir):  # never delete outside our own data dir
            shutil.rmtree(root, ignore_errors=True)
        store.delete_job(job.id)

    @app.get("/v1/jobs/{job_id}/logs", dependencies=auth, tags=["jobs"],
             responses={200: {"model": LogTail, "content": {"text/event-stream": {}}}})
    async def logs(
        job: Job, request: Request,
        tail: Annotated[int, Query(ge=0, le=100_000, description="Lines from the end.")] = 200,
        follow: Annotated[bool, Query(description="Stream new lines as server-sent events.")] = False,
    ):
        path = JobDir(job.job_dir).log_path
        if not follow:
            lines, _ = await run_in_threadpool(tail_lines, path, tail)
            return LogTail(job_id=job.id, lines=lines)

        def state() -> str | None:
            current = store.get_job(job.id)
            return current.state if current else None

        stream = follow_log(path, tail, state, request.is_disconnected)
        return StreamingResponse(stream, media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    @app.get("/v1/jobs/{job_id}/metrics", response_model=MetricsResponse, dependencies=auth, tags=["jobs"])
    def metrics(job: Job, since_step: Annotated[int | None, Query(description="Only records after this step.")] = None
                ) -> MetricsResponse:
        records = JobDir(job.job_dir).read_metrics()
        if since_step is not None:
            records = [r for r in records if isinstance(r.get("step"), int | float) and r["step"] > since_step]
        return MetricsResponse(job_id=job.id, metrics=records)

    @app.get("/v1/jobs/{job_id}/artifacts", response_model=ArtifactList, dependencies=auth, tags=["jobs"])
    def artifacts(job: Job) -> ArtifactList:
        return artifact_list(job)

    @app.get("/v1/jobs/{job_id}/artifacts/{path:path}", dependencies=auth, tags=["jobs"],
             responses={200: {"content": {"application/octet-stream": {}}}})
    def download(job: Job, path: str) -> FileResponse:
        try:
            target = resolve_artifact(job, path)
        except UnsafePath as exc:
            raise HTTPException(400, str(exc)) from None
        if target is None:
            raise HTTPException(404, f"job {job.id} has no file {path!r}")
        return FileResponse(target, filename=target.name)

    @app.post("/v1/files", status_code=201, response_model=FileInfo, dependencies=auth, tags=["files"])
    def upload(file: Annotated[UploadFile, File(description="A dataset file (.jsonl, .json, .csv, .parquet).")]
               ) -> FileInfo:
        try:
            record = save_upload(file.file, file.filename, settings.files_dir, settings.max_upload_bytes, store)
        except UploadTooLarge as exc:
            raise HTTPException(413, str(exc)) from None
        return file_info(record)

    @app.get("/v1/files", response_model=list[FileInfo], dependencies=auth, tags=["files"])
    def list_files() -> list[FileInfo]:
        return [file_info(r) for r in store.list_files()]

    @app.get("/v1/files/{file_id}", response_model=FileInfo, dependencies=auth, tags=["files"])
    def get_file(file_id: str) -> FileInfo:
        record = store.get_file(file_id) if _ID.match(file_id) else None
        if record is None:
            raise HTTPException(404, f"no uploaded file {file_id!r}")
        return file_info(record)

    @app.delete("/v1/files/{file_id}", status_code=204, dependencies=auth, tags=["files"])
    def delete_file(file_id: str) -> None:
        record = store.get_file(file_id) if _ID.match(file_id) else None
        if record is None:
            raise HTTPException(404, f"no uploaded file {file_id!r}")
        folder = Path(record.path).parent
        if folder.resolve().is_relative_to(settings.files_dir):
            shutil.rmtree(folder, ignore_errors=True)
        store.delete_file(file_id)

    return app


def lock_data_dir(data_dir: Path) -> IO[str]:
    """Hold an exclusive lock on the data dir for the server's lifetime: two servers recovering the same
    jobs could each start a worker for one job. (Workers do not inherit it: Popen closes other fds.)"""
    handle = open(data_dir / "server.lock", "a+")  # noqa: SIM115 - held until shutdown
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        owner = handle.read().strip() or "unknown"
        handle.close()
        raise RuntimeError(f"another posttrain server (pid {owner}) is using data dir {data_dir}") from None
    handle.seek(0)
    handle.truncate()
    handle.write(f"{os.getpid()}\n")
    handle.flush()
    return handle


def _warm_imports() -> None:
    """Import what the submit-time preflight needs (torch, datasets) in the background, so the first
    submission does not wait seconds for it."""
    for module in ("posttrain.preflight", "posttrain.data", "posttrain.modeling"):
        try:
            importlib.import_module(module)
        except Exception:  # reported properly by the submission that needs it
            log.debug("could not pre-import %s", module, exc_info=True)


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(PosttrainError)
    async def user_error(_request: Request, exc: PosttrainError) -> JSONResponse:
        return JSONResponse({"detail": exc.message, "type": type(exc).__name__}, 422)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return JSONResponse({"detail": str(exc.detail), "type": "HTTPError"}, exc.status_code,
                            headers=getattr(exc, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def request_error(_request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        if any(err.get("type") == "json_invalid" for err in errors):
            err = next(err for err in errors if err.get("type") == "json_invalid")
            where = err.get("loc", ("body", 0))[-1]
            reason = (err.get("ctx") or {}).get("error", "invalid JSON")
            return JSONResponse({"detail": f"request body is not valid JSON: {reason} at character {where}",
                                 "type": "InvalidJSON"}, 400)
        messages = []
        for err in errors:
            loc = [str(part) for part in err.get("loc", ()) if part != "body"]
            where = ".".join(loc) or "body"
            text = "unknown field" if err.get("type") == "extra_forbidden" else err.get("msg", "invalid")
            messages.append(f"{where}: {text}")
        return JSONResponse({"detail": "invalid request: " + "; ".join(messages), "type": "RequestValidationError",
                             "errors": [{"loc": list(e.get("loc", ())), "msg": e.get("msg")} for e in errors]}, 422)

    @app.exception_handler(Exception)
    async def unexpected(_request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error")
        return JSONResponse({"detail": f"internal server error: {type(exc).__name__}: {exc}",
                             "type": "InternalError"}, 500)
