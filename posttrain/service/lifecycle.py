"""State changes users ask for: cancel, pause and resume a job.

Every door calls these (the native ``/v1/jobs`` routes, and the OpenAI-compatible ones), so the rules
live in one place. Each change is a conditional UPDATE in the store (see ``store.py``); a job with a
worker is flagged for the scheduler, which signals the worker and records how it stopped. A transition
that makes no sense (resuming a running job, pausing a finished one) raises ``JobConflict`` (HTTP 409)
naming the job, its state and what can be done instead.

    queued  --pause-->  paused              running --pause--> (SIGUSR1, checkpoint) --> paused
    paused  --resume--> queued (resume=True: the worker continues from the newest complete checkpoint)
    queued | paused --cancel--> cancelled  running --cancel--> (SIGTERM, SIGKILL after the grace) --> cancelled
"""

from __future__ import annotations

from pathlib import Path

from posttrain.errors import PosttrainError
from posttrain.job.directory import JobDir
from posttrain.service.scheduler import Scheduler, note_status
from posttrain.service.settings import ServiceSettings
from posttrain.service.store import JobRecord, JobStore


class JobConflict(PosttrainError):
    """The job is in no state for what was asked (e.g. resuming a running job)."""

    status_code = 409


def check_run_here(job: JobRecord, settings: ServiceSettings, action: str) -> None:
    """Servers sharing one database each run the jobs under their own data dir; only that server may
    change one (its scheduler is the one that would act on it)."""
    if not Path(job.job_dir).is_relative_to(settings.jobs_dir):
        raise JobConflict(f"job {job.id} is run by another server sharing this database; {action} it there")


def cancel_job(store: JobStore, scheduler: Scheduler, settings: ServiceSettings, job: JobRecord) -> JobRecord:
    """Queued or paused: cancelled at once. Running: flagged; the scheduler sends SIGTERM to the worker's
    group (SIGKILL after the grace period), also when a pause is pending (a cancel always wins)."""
    check_run_here(job, settings, "cancel")
    outcome = store.cancel(job.id)
    if outcome == "cancelled":
        note_status(JobDir(job.job_dir), job.id, state="cancelled", pid=None)
    elif outcome == "running":
        scheduler.wake()
    else:
        raise JobConflict(f"job {job.id} already finished ({_current(store, job).state}); nothing to cancel")
    return _current(store, job)


def pause_job(store: JobStore, scheduler: Scheduler, settings: ServiceSettings, job: JobRecord) -> JobRecord:
    """Queued: paused at once. Running: flagged (``pause_requested``); the scheduler sends the worker
    SIGUSR1, and the worker saves a complete checkpoint at the next step boundary and exits; the job is
    then ``paused``. Pausing a running job again while its pause is pending changes nothing."""
    check_run_here(job, settings, "pause")
    outcome = store.pause(job.id)
    if outcome == "paused":
        note_status(JobDir(job.job_dir), job.id, state="paused")
    elif outcome == "running":
        scheduler.wake()
    else:
        current = _current(store, job)
        if current.state == "paused":
            raise JobConflict(f"job {job.id} is already paused; resume it with POST /v1/jobs/{job.id}/resume")
        if current.cancel_requested and current.state == "running":
            raise JobConflict(f"job {job.id} is being cancelled; a cancelled job cannot be paused")
        raise JobConflict(f"job {job.id} already finished ({current.state}); only a queued or running job "
                          "can be paused")
    return _current(store, job)


def resume_job(store: JobStore, scheduler: Scheduler, settings: ServiceSettings, job: JobRecord) -> JobRecord:
    """Paused: queued again with ``resume=True``, so its next worker continues from the newest complete
    checkpoint (step, optimizer, scheduler and data position). Any other state is a conflict."""
    check_run_here(job, settings, "resume")
    if store.resume(job.id):
        # Only while status.json still says paused: once the scheduler has claimed the job, its worker may
        # already have recorded "running" with its pid, which the scheduler needs to signal a later pause.
        job_dir = JobDir(job.job_dir)
        status = job_dir.read_status()
        if status is None or status.state == "paused":
            note_status(job_dir, job.id, state="queued", error=None)
        scheduler.wake()
        return _current(store, job)
    current = _current(store, job)
    if current.state == "running" and current.pause_requested:
        reason = "is still pausing (its worker is saving a checkpoint); resume it once it is paused"
    elif current.state in ("queued", "running"):
        reason = f"is {current.state}, not paused; only a paused job can be resumed"
    else:
        reason = f"already finished ({current.state}); only a paused job can be resumed"
    raise JobConflict(f"job {job.id} {reason}")


def _current(store: JobStore, job: JobRecord) -> JobRecord:
    return store.get_job(job.id) or job
