"""Submitting a job: request body -> validated JobSpec -> user-code and path policy -> bounded preflight ->
job directory -> store.

Everything that can be wrong with a job and can be found cheaply is found here, before anything is
queued, and raised as a PosttrainError (the API answers 422, or 403 for what this server does not allow).
The API process never imports user code or loads a model: rewards are checked by name, models by their
config.json, and the data by a bounded sample (the worker checks every row before it trains).
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

from posttrain.data.sources import is_local_path
from posttrain.errors import ConfigError, PosttrainError
from posttrain.graders import runs_user_code
from posttrain.job.directory import JobDir, JobStatus
from posttrain.job_paths import bind_job_dir, path_fields
from posttrain.pipeline import Pipeline, is_pipeline_document, plan_pipeline
from posttrain.preflight import DataBudget, preflight
from posttrain.rewards import is_user_reward
from posttrain.service.auth import Principal
from posttrain.service.ids import new_job_id
from posttrain.service.job_reach import check_job_reach
from posttrain.service.schemas import SubmitJobRequest
from posttrain.service.settings import ServiceSettings
from posttrain.service.store import JobRecord, JobStore
from posttrain.service.uploads import resolve_upload_references
from posttrain.spec import JobSpec, load_yaml, spec_from_dict, spec_to_json

SUBMIT_BUDGET = DataBudget()


class UserCodeRefused(PosttrainError):
    """The spec would run code it brings along, and this (keyed) server was not started to allow that."""

    status_code = 403


def request_document(body: SubmitJobRequest) -> dict:
    """The submitted document: a JobSpec, or a pipeline (a ``stages:`` list)."""
    return body.spec if body.spec is not None else load_yaml(body.yaml or "", "yaml")


def build_spec(body: SubmitJobRequest) -> JobSpec:
    spec = spec_from_dict(request_document(body), body.overrides)
    if spec.output.dir is not None:
        raise ConfigError(
            f"the service places every job in its own directory under its data dir; remove output.dir "
            f"(got {spec.output.dir!r})",
            "output.dir",
        )
    return spec


def local_paths(spec: JobSpec) -> dict[str, str]:
    """The spec's fields that name files or folders on the server, by dotted key."""
    return {key: value for key, value in path_fields(spec).items() if value and is_local_path(value)}


def user_code(spec: JobSpec) -> dict[str, str]:
    """What in the spec would run code from outside posttrain, by dotted key."""
    found = {}
    if spec.model.trust_remote_code:
        found["model.trust_remote_code"] = "true (runs the model repository's own Python code)"
    if spec.method.name == "grpo":
        custom = [name for name in spec.method.reward_functions if is_user_reward(name)]
        if custom:
            found["method.reward_functions"] = ", ".join(custom) + " (imports and runs that module)"
        coded = [grader.name for grader in spec.method.graders if runs_user_code(grader)]
        if coded:
            found["method.graders"] = ", ".join(coded) + " (python and multi graders run the code they bring)"
    coded = [grader.name for grader in spec.eval.graders if runs_user_code(grader)]
    if coded:
        found["eval.graders"] = ", ".join(coded) + " (python and multi graders run the code they bring)"
    return found


def check_user_code(spec: JobSpec, settings: ServiceSettings) -> None:
    if settings.runs_user_code:
        return
    found = user_code(spec)
    if found:
        key, what = next(iter(found.items()))
        raise UserCodeRefused(
            f"{key}: {what} is not allowed on this server: a job may run only posttrain's own code unless "
            "the server was started with --allow-user-code (use a built-in reward, or ask its operator)"
        )


def check_local_paths(spec: JobSpec, settings: ServiceSettings, own_dir: Path | None = None) -> None:
    """On a shared (keyed) server, a spec may read only uploads and the folders given with --allow-path
    (and a pipeline stage the outputs of earlier stages, in ``own_dir``: the pipeline job's directory)."""
    if not settings.restricts_local_paths:
        return
    roots = [settings.files_dir, *settings.allowed_paths, *([own_dir] if own_dir else [])]
    for key, value in local_paths(spec).items():
        path = Path(value).expanduser().resolve()
        if not any(path.is_relative_to(root) for root in roots):
            raise ConfigError(
                f"{value!r} is a path on the server outside the folders jobs may read; upload the file "
                "(POST /v1/files, or 'posttrain jobs submit --upload') or start the server with "
                "--allow-path FOLDER",
                key,
            )


def submit_job(body: SubmitJobRequest, store: JobStore, settings: ServiceSettings, caller: Principal,
               openai_json: str | None = None, check_data_and_model: bool = True) -> JobRecord:
    """Check and queue a job. ``openai_json``: what the OpenAI door keeps with a job it submits.
    ``check_data_and_model=False`` skips the preflight, which imports torch and datasets: for the Llama
    Stack inline provider, which runs without them and has checked its rows itself."""
    if is_pipeline_document(document := request_document(body)):
        return submit_pipeline(document, body, store, settings, caller, check_data_and_model)
    spec = build_spec(body)
    check_user_code(spec, settings)
    resolve_upload_references(spec, store, None if caller.admin else caller.owner)
    job_id = new_job_id()
    root = settings.jobs_dir / job_id
    # Relative paths mean the server's working directory (where preflight reads them); the worker runs in
    # the job directory, and the spec must stand on its own there.
    spec = bind_job_dir(spec, root)
    if spec.name is None:
        spec.name = job_id
    check_local_paths(spec, settings)
    check_job_reach(spec, settings, root)
    if check_data_and_model:
        preflight(spec, budget=SUBMIT_BUDGET)

    now = time.time()
    job_dir = JobDir(root).create()
    try:
        job_dir.write_spec(spec_to_json(spec))
        job_dir.write_status(JobStatus(state="queued", created_at=now))
        record = JobRecord(
            id=job_id, owner=caller.owner, name=spec.name, method=spec.method.name, state="queued",
            priority=body.priority, job_dir=str(root), spec_json=spec_to_json(spec), step=0, total_steps=None,
            error=None, attempt=0, retries=0, resume=False, cancel_requested=False, created_at=now, updated_at=now,
            openai_json=openai_json,
        )
        return store.add_job(record)
    except BaseException:
        shutil.rmtree(root, ignore_errors=True)  # nothing half-submitted is left behind
        raise


def submit_pipeline(document: dict, body: SubmitJobRequest, store: JobStore, settings: ServiceSettings,
                    caller: Principal, check_data_and_model: bool = True) -> JobRecord:
    """A pipeline is one job: every stage is checked here as a job would be, and one worker runs the plan
    (posttrain.pipeline), each stage in its own job directory inside the job's."""
    if document.get("output_dir") is not None:
        raise ConfigError("the service places every job in its own directory under its data dir; remove it "
                          f"(got {document['output_dir']!r})", "output_dir")
    job_id = new_job_id()
    root = settings.jobs_dir / job_id
    plan = plan_pipeline(document, body.overrides, root=root, name=job_id)
    for stage in plan.stages:
        try:
            check_user_code(stage.spec, settings)
            resolve_upload_references(stage.spec, store, None if caller.admin else caller.owner)
            check_local_paths(stage.spec, settings, own_dir=root)
            check_job_reach(stage.spec, settings, stage.job_dir.root)
            if check_data_and_model:
                preflight(preflight_stand_in(plan, stage.name), budget=SUBMIT_BUDGET)
        except PosttrainError as exc:
            exc.message, exc.args = f"stages.{stage.name}: {exc.message}", (f"stages.{stage.name}: {exc.message}",)
            if getattr(exc, "path", None):
                exc.path = f"stages.{stage.name}.{exc.path}"  # type: ignore[attr-defined]
            raise
    now = time.time()
    job_dir = JobDir(root).create()
    try:
        job_dir.write_spec(plan.plan_json())
        job_dir.write_status(JobStatus(state="queued", created_at=now))
        record = JobRecord(
            id=job_id, owner=caller.owner, name=plan.name, method="pipeline", state="queued",
            priority=body.priority, job_dir=str(root), spec_json=plan.plan_json(), step=0, total_steps=None,
            error=None, attempt=0, retries=0, resume=False, cancel_requested=False, created_at=now, updated_at=now,
        )
        return store.add_job(record)
    except BaseException:
        shutil.rmtree(root, ignore_errors=True)
        raise


def preflight_stand_in(plan: Pipeline, name: str) -> JobSpec:
    """A stage's spec as preflight can check it before the stages it uses exist: each earlier stage's output
    stands for the model that stage starts from (same tokenizer and architecture)."""
    by_name = {stage.name: stage for stage in plan.stages}

    def base_model(stage_name: str) -> str:
        model = by_name[stage_name].spec.model.name_or_path
        for earlier in by_name[stage_name].needs:
            if model.startswith(str(by_name[earlier].job_dir.root)):
                return base_model(earlier)
        return model

    text = by_name[name].spec.model_dump_json()
    for earlier in by_name[name].needs:
        for output in (str(by_name[earlier].job_dir.root / "final"), str(by_name[earlier].job_dir.root)):
            text = text.replace(json.dumps(output)[1:-1], json.dumps(base_model(earlier))[1:-1])
    return JobSpec.model_validate_json(text)
