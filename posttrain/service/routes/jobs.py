"""``/v1/jobs``: submit, list, read, cancel, pause, resume and delete jobs; their logs, metrics and artifacts.

State changes go through ``posttrain.service.lifecycle``, which every door shares."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Annotated

from fastapi import APIRouter, HTTPException, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import FileResponse, StreamingResponse

from posttrain.job.directory import TERMINAL_STATES, JobDir
from posttrain.service.ids import is_id
from posttrain.service.lifecycle import JobConflict, cancel_job, check_run_here, pause_job, resume_job
from posttrain.service.routes.deps import (
    AUTH,
    Caller,
    Job,
    owner_filter,
    recent_jobs_of,
    scheduler_of,
    settings_of,
    store_of,
)
from posttrain.service.schemas import (
    MAX_OFFSET,
    MAX_STEP,
    ArtifactList,
    EvalReport,
    JobInfo,
    JobPage,
    JobStateName,
    LogTail,
    MetricsResponse,
    SubmitJobRequest,
)
from posttrain.service.submission import submit_job
from posttrain.service.views import (
    UnsafePath,
    artifact_list,
    eval_report,
    follow_log,
    job_info,
    metrics_page,
    resolve_artifact,
    tail_lines,
)

router = APIRouter(prefix="/v1/jobs", tags=["jobs"], dependencies=AUTH)


@router.post("", status_code=201, response_model=JobInfo)
def submit(body: SubmitJobRequest, request: Request, caller: Caller) -> JobInfo:
    record = submit_job(body, store_of(request), settings_of(request), caller)
    scheduler_of(request).wake()
    return job_info(record)


@router.get("", response_model=JobPage)
def list_jobs(
    request: Request, caller: Caller,
    state: Annotated[list[JobStateName] | None, Query(description="Only jobs in these states.")] = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
    offset: Annotated[int, Query(ge=0, le=MAX_OFFSET)] = 0,
) -> JobPage:
    """Newest first. Built from the database alone (step as last synced, no metrics or started_at):
    GET /v1/jobs/{id} reads a job's directory for the live values."""
    records, total = store_of(request).list_jobs(list(state) if state else None, limit, offset, owner_filter(caller))
    return JobPage(jobs=[job_info(r, live=False) for r in records], total=total, limit=limit, offset=offset)


@router.get("/{job_id}", response_model=JobInfo)
async def get_job_info(job_id: str, request: Request, caller: Caller) -> JobInfo:
    # The hot path of every poller. Served in the event loop from a record read moments ago (job_reads.py)
    # and the job directory's two small files; only a record not read recently costs a thread-pool hop.
    record = await recent_jobs_of(request).get(job_id) if is_id(job_id) else None
    if record is None or not caller.may_see(record.owner):
        raise HTTPException(404, f"no job {job_id!r}")  # another owner's job reads exactly like a missing one
    return job_info(record)


@router.post("/{job_id}/cancel", response_model=JobInfo)
def cancel(job: Job, request: Request) -> JobInfo:
    """Queued or paused: cancelled at once. Running: SIGTERM to its worker, SIGKILL after the grace period."""
    return job_info(cancel_job(store_of(request), scheduler_of(request), settings_of(request), job))


@router.post("/{job_id}/pause", response_model=JobInfo)
def pause(job: Job, request: Request) -> JobInfo:
    """Queued: paused at once. Running: its worker saves a complete checkpoint at the next step boundary
    and stops (the job shows pause_requested until it is paused). 409 for a paused or finished job."""
    return job_info(pause_job(store_of(request), scheduler_of(request), settings_of(request), job))


@router.post("/{job_id}/resume", response_model=JobInfo)
def resume(job: Job, request: Request) -> JobInfo:
    """A paused job is queued again and continues from its newest complete checkpoint. 409 otherwise."""
    return job_info(resume_job(store_of(request), scheduler_of(request), settings_of(request), job))


@router.delete("/{job_id}", status_code=204)
def delete(job: Job, request: Request) -> None:
    settings = settings_of(request)
    if job.state not in TERMINAL_STATES:
        raise JobConflict(f"job {job.id} is {job.state}; cancel it before deleting it")
    check_run_here(job, settings, "delete")
    root = Path(job.job_dir)
    if root.resolve().is_relative_to(settings.jobs_dir):  # never delete outside our own data dir
        shutil.rmtree(root, ignore_errors=True)
    store_of(request).delete_job(job.id)


@router.get("/{job_id}/logs", responses={200: {"model": LogTail, "content": {"text/event-stream": {}}}})
async def logs(
    job: Job, request: Request,
    tail: Annotated[int, Query(ge=0, le=10_000, description="Lines from the end.")] = 200,
    follow: Annotated[bool, Query(description="Stream new lines as server-sent events.")] = False,
):
    path = JobDir(job.job_dir).log_path
    if not follow:
        lines, _ = await run_in_threadpool(tail_lines, path, tail)
        return LogTail(job_id=job.id, lines=lines)
    state = request.app.state
    if state.log_followers >= settings_of(request).max_log_followers:
        raise HTTPException(429, "too many log streams open on this server; try again later or poll "
                                 "GET .../logs without follow", headers={"Retry-After": "5"})
    store = store_of(request)

    def job_state() -> str | None:
        current = store.get_job(job.id)
        return current.state if current else None

    async def counted():
        # Counted from here, in the event loop (no lock needed), until the stream ends or the client leaves.
        state.log_followers += 1
        try:
            async for event in follow_log(path, tail, job_state, request.is_disconnected):
                yield event
        finally:
            state.log_followers -= 1

    return StreamingResponse(counted(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


@router.get("/{job_id}/metrics", response_model=MetricsResponse)
def metrics(
    job: Job, request: Request,
    since_step: Annotated[int | None, Query(ge=-1, le=MAX_STEP, description="Only records after this step.")] = None,
    limit: Annotated[int, Query(ge=1, le=10_000, description="At most this many records; 'more' says if "
                                                               "there are others after them.")] = 1000,
) -> MetricsResponse:
    limit = min(limit, settings_of(request).max_metrics_records)
    records, more = metrics_page(JobDir(job.job_dir).metrics_path, since_step, limit)
    return MetricsResponse(job_id=job.id, metrics=records, more=more)


@router.get("/{job_id}/eval", response_model=EvalReport)
def evaluation(
    job: Job,
    step: Annotated[int | None, Query(ge=0, le=MAX_STEP, description="The evaluation whose answers to return "
                                                                       "(default: the latest).")] = None,
) -> EvalReport:
    return eval_report(job, step)


@router.get("/{job_id}/artifacts", response_model=ArtifactList)
def artifacts(job: Job) -> ArtifactList:
    return artifact_list(job)


@router.get("/{job_id}/artifacts/{path:path}", responses={200: {"content": {"application/octet-stream": {}}}})
def download(job: Job, path: str) -> FileResponse:
    try:
        target = resolve_artifact(job, path)
    except UnsafePath as exc:
        raise HTTPException(400, str(exc)) from None
    if target is None:
        raise HTTPException(404, f"job {job.id} has no file {path!r}")
    return FileResponse(target, filename=target.name)
