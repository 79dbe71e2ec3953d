"""``/v1/fine_tuning/jobs``: OpenAI's fine-tuning API over posttrain's jobs (see ``openai_door.py``).

Create, list (cursor paging with ``after``), retrieve, cancel, pause, resume, events and checkpoints. A job
made here is an ordinary job: ``/v1/jobs`` and ``posttrain jobs`` show it, and its cancel, pause and resume
are the native ones (``lifecycle.py``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated

from fastapi import APIRouter, HTTPException, Query, Request

from posttrain.service.errors import InvalidRequest
from posttrain.service.ids import is_id
from posttrain.service.lifecycle import cancel_job, pause_job, resume_job
from posttrain.service.openai_door import create_job, door_fields, fine_tuned_model, fine_tuning_job
from posttrain.service.openai_events import job_checkpoints, job_events, page
from posttrain.service.openai_schemas import (
    CreateFineTuningJob,
    FineTuningJob,
    FineTuningJobCheckpointList,
    FineTuningJobEventList,
    FineTuningJobList,
)
from posttrain.service.routes.deps import AUTH, Caller, owner_filter, scheduler_of, settings_of, store_of
from posttrain.service.store import JobRecord

router = APIRouter(prefix="/v1/fine_tuning/jobs", tags=["openai"], dependencies=AUTH)
Cursor = Annotated[str | None, Query(max_length=128, description="The last id of the previous page.")]


def _openai_job(job_id: str, request: Request, caller: Caller) -> JobRecord:
    """The caller's job made through this door, or 404 (OpenAI's SDK raises NotFoundError)."""
    record = store_of(request).get_job(job_id, owner_filter(caller)) if is_id(job_id) else None
    if record is None or record.openai_json is None:
        raise HTTPException(404, f"no fine-tuning job {job_id!r}")
    return record


@router.post("", response_model=FineTuningJob)
def create(body: CreateFineTuningJob, request: Request, caller: Caller) -> FineTuningJob:
    store = store_of(request)
    record = create_job(body, store, settings_of(request), caller)
    scheduler_of(request).wake()
    return fine_tuning_job(record, store, settings_of(request).files_dir)


@router.get("", response_model=FineTuningJobList)
def list_jobs(request: Request, caller: Caller, after: Cursor = None,
              limit: Annotated[int, Query(ge=1, le=100)] = 20) -> FineTuningJobList:
    if any(key.startswith("metadata") for key in request.query_params):
        raise InvalidRequest("listing fine-tuning jobs by metadata is not supported by posttrain; each job "
                             "shows its metadata", param="metadata")
    store = store_of(request)
    records, more = store.list_openai_jobs(owner_filter(caller), after, limit)
    files_dir = settings_of(request).files_dir
    return FineTuningJobList(data=[fine_tuning_job(r, store, files_dir) for r in records], has_more=more)


@router.get("/{job_id}", response_model=FineTuningJob)
def retrieve(job_id: str, request: Request, caller: Caller) -> FineTuningJob:
    return fine_tuning_job(_openai_job(job_id, request, caller), store_of(request), settings_of(request).files_dir)


def _change(job_id: str, request: Request, caller: Caller, change: Callable[..., JobRecord]) -> FineTuningJob:
    """Cancel, pause or resume through the same lifecycle rules as the native routes (409 when the job's
    state does not allow it, which the SDK raises as ConflictError)."""
    store = store_of(request)
    record = change(store, scheduler_of(request), settings_of(request), _openai_job(job_id, request, caller))
    return fine_tuning_job(record, store, settings_of(request).files_dir)


@router.post("/{job_id}/cancel", response_model=FineTuningJob)
def cancel(job_id: str, request: Request, caller: Caller) -> FineTuningJob:
    return _change(job_id, request, caller, cancel_job)


@router.post("/{job_id}/pause", response_model=FineTuningJob)
def pause(job_id: str, request: Request, caller: Caller) -> FineTuningJob:
    """A running job stops at its next step boundary with a complete checkpoint, then shows ``paused``."""
    return _change(job_id, request, caller, pause_job)


@router.post("/{job_id}/resume", response_model=FineTuningJob)
def resume(job_id: str, request: Request, caller: Caller) -> FineTuningJob:
    """A paused job is queued again and continues from its newest complete checkpoint."""
    return _change(job_id, request, caller, resume_job)


@router.get("/{job_id}/events", response_model=FineTuningJobEventList)
def events(job_id: str, request: Request, caller: Caller, after: Cursor = None,
           limit: Annotated[int, Query(ge=1, le=1000)] = 20) -> FineTuningJobEventList:
    record = _openai_job(job_id, request, caller)
    model = fine_tuned_model(record, door_fields(record)) if record.state == "succeeded" else None
    chosen, more = page(job_events(record, model), after, limit)
    return FineTuningJobEventList(data=chosen, has_more=more)


@router.get("/{job_id}/checkpoints", response_model=FineTuningJobCheckpointList)
def checkpoints(job_id: str, request: Request, caller: Caller, after: Cursor = None,
                limit: Annotated[int, Query(ge=1, le=1000)] = 10) -> FineTuningJobCheckpointList:
    record = _openai_job(job_id, request, caller)
    chosen, more = page(job_checkpoints(record, fine_tuned_model(record, door_fields(record))), after, limit)
    return FineTuningJobCheckpointList(data=chosen, has_more=more, first_id=chosen[0].id if chosen else None,
                                       last_id=chosen[-1].id if chosen else None)
