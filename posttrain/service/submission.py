"""Submitting a job: request body -> validated JobSpec -> allowed paths -> preflight -> job directory -> store.

Everything that can be wrong with a job is found here, before anything is queued, and raised as a
PosttrainError (the API answers 422 with its message).
"""

from __future__ import annotations

import os
import secrets
import shutil
import time
from pathlib import Path

from posttrain.data.sources import looks_like_local_path
from posttrain.errors import ConfigError
from posttrain.jobdir import JobDir, JobStatus
from posttrain.preflight import preflight
from posttrain.service.schemas import SubmitJobRequest
from posttrain.service.settings import ServiceSettings
from posttrain.service.store import JobRecord, JobStore
from posttrain.service.uploads import resolve_upload_references
from posttrain.spec import JobSpec, load_yaml, spec_from_dict, spec_to_json


def new_job_id() -> str:
    return "job-" + secrets.token_hex(6)


def build_spec(body: SubmitJobRequest) -> JobSpec:
    data = body.spec if body.spec is not None else load_yaml(body.yaml or "", "yaml")
    spec = spec_from_dict(data, body.overrides)
    if spec.output.dir is not None:
        raise ConfigError(
            f"the service places every job in its own directory under its data dir; remove output.dir "
            f"(got {spec.output.dir!r})",
            "output.dir",
        )
    return spec


def absolutize_local_paths(spec: JobSpec) -> None:
    """Relative paths in a spec mean the server's working directory (where preflight reads them); the
    worker runs in the job directory, so hand it absolute paths."""

    def absolute(value: str | None) -> str | None:
        if value and not os.path.isabs(value) and ":" not in value.split("/", 1)[0] and Path(value).exists():
            return str(Path(value).resolve())
        return value

    spec.data.source = absolute(spec.data.source) or spec.data.source
    spec.data.validation.source = absolute(spec.data.validation.source)
    spec.model.name_or_path = absolute(spec.model.name_or_path) or spec.model.name_or_path
    if spec.method.name == "dpo":
        spec.method.reference_model = absolute(spec.method.reference_model)


def local_paths(spec: JobSpec) -> dict[str, str]:
    """The spec's fields that name files or folders on the server, by dotted key."""
    fields = {"data.source": spec.data.source, "data.validation.source": spec.data.validation.source,
              "model.name_or_path": spec.model.name_or_path}
    if spec.method.name == "dpo":
        fields["method.reference_model"] = spec.method.reference_model
    return {key: value for key, value in fields.items()
            if value and (os.path.isabs(value) or looks_like_local_path(value) or Path(value).exists())}


def check_local_paths(spec: JobSpec, settings: ServiceSettings) -> None:
    """On a shared (keyed) server, a spec may read only uploads and the folders given with --allow-path."""
    if not settings.restricts_local_paths:
        return
    roots = [settings.files_dir, *settings.allowed_paths]
    for key, value in local_paths(spec).items():
        path = Path(value).expanduser().resolve()
        if not any(path.is_relative_to(root) for root in roots):
            raise ConfigError(
                f"{value!r} is a path on the server outside the folders jobs may read; upload the file "
                "(POST /v1/files, or 'posttrain jobs submit --upload') or start the server with "
                "--allow-path FOLDER",
                key,
            )


def submit_job(body: SubmitJobRequest, store: JobStore, settings: ServiceSettings) -> JobRecord:
    spec = build_spec(body)
    resolve_upload_references(spec, store)
    absolutize_local_paths(spec)
    job_id = new_job_id()
    root = settings.jobs_dir / job_id
    spec.output.dir = str(root)
    if spec.name is None:
        spec.name = job_id
    check_local_paths(spec, settings)
    preflight(spec)

    now = time.time()
    job_dir = JobDir(root).create()
    try:
        job_dir.write_spec(spec_to_json(spec))
        job_dir.write_status(JobStatus(state="queued", created_at=now))
        record = JobRecord(
            id=job_id, name=spec.name, method=spec.method.name, state="queued", priority=body.priority,
            job_dir=str(root), spec_json=spec_to_json(spec), step=0, total_steps=None, error=None,
            attempt=0, retries=0, resume=False, cancel_requested=False, created_at=now, updated_at=now,
        )
        return store.add_job(record)
    except BaseException:
        shutil.rmtree(root, ignore_errors=True)  # nothing half-submitted is left behind
        raise
