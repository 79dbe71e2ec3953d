"""What routes get from the request: the caller, the app's store/scheduler/settings, the caller's job."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, HTTPException, Request

from posttrain.service.auth import Principal, require_api_key
from posttrain.service.ids import is_id
from posttrain.service.job_reads import RecentJobs
from posttrain.service.scheduler import Scheduler
from posttrain.service.settings import ServiceSettings
from posttrain.service.store import FileRecord, JobRecord, JobStore

Caller = Annotated[Principal, Depends(require_api_key)]
AUTH = [Depends(require_api_key)]


def store_of(request: Request) -> JobStore:
    return request.app.state.store


def recent_jobs_of(request: Request) -> RecentJobs:
    return request.app.state.recent_jobs


def scheduler_of(request: Request) -> Scheduler:
    return request.app.state.scheduler


def settings_of(request: Request) -> ServiceSettings:
    return request.app.state.settings


def owner_filter(caller: Principal) -> str | None:
    """The owner a caller's queries are limited to; None (everyone's) for admins."""
    return None if caller.admin else caller.owner


def find_job(store: JobStore, job_id: str, caller: Principal) -> JobRecord:
    """The caller's job, or 404: another owner's job is answered exactly like one that does not exist."""
    record = store.get_job(job_id, owner_filter(caller)) if is_id(job_id) else None
    if record is None:
        raise HTTPException(404, f"no job {job_id!r}")
    return record


def find_file(store: JobStore, file_id: str, caller: Principal) -> FileRecord:
    record = store.get_owned_file(file_id, owner_filter(caller)) if is_id(file_id) else None
    if record is None:
        raise HTTPException(404, f"no uploaded file {file_id!r}")
    return record


def _callers_job(job_id: str, request: Request, caller: Caller) -> JobRecord:
    return find_job(store_of(request), job_id, caller)


Job = Annotated[JobRecord, Depends(_callers_job)]
