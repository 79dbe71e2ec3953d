"""The OpenAI fine-tuning door: an OpenAI job request in, a JobSpec submitted through the one submission
path out; a job record (plus its job directory) back into OpenAI's ``fine_tuning.job`` object.

What only this door knows (file ids, suffix, metadata, the method with its hyperparameters as resolved)
is kept with the job in the store's ``openai_json`` column; the JobSpec, the job directory and the store
stay the truth about the run, so the job is an ordinary posttrain job in ``/v1/jobs`` too.

"auto" hyperparameters resolve to posttrain's defaults: batch_size 8 (reinforcement: 2 prompts), n_epochs 1,
learning_rate_multiplier 1 (of posttrain's learning rate, 2e-4), beta 0.1, compute_multiplier 1 (4
completions per prompt).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import secrets
import time
from pathlib import Path
from typing import Any

from sqlalchemy.exc import IntegrityError

from posttrain.embedded import EMBEDDED_MODEL_NAMES
from posttrain.errors import ConfigError, DatasetError, ModelError, PosttrainError
from posttrain.job.directory import JobDir, atomic_write_text
from posttrain.service.auth import Principal
from posttrain.service.errors import InvalidRequest
from posttrain.service.ids import is_id
from posttrain.service.openai_schemas import (
    CreateFineTuningJob,
    DpoHyperparameters,
    FineTuningJob,
    JobError,
    ReinforcementHyperparameters,
    SupervisedHyperparameters,
)
from posttrain.service.schemas import RESULTS_PREFIX, UPLOAD_PREFIX, SubmitJobRequest
from posttrain.service.settings import ServiceSettings
from posttrain.service.store import FileRecord, JobRecord, JobStore
from posttrain.service.submission import submit_job
from posttrain.service.views import last_metrics, model_name
from posttrain.spec import GRPOMethod, TrainingSpec

METHODS = {"supervised": "sft", "dpo": "dpo", "reinforcement": "grpo"}
HYPERPARAMETERS = {"supervised": SupervisedHyperparameters, "dpo": DpoHyperparameters,
                   "reinforcement": ReinforcementHyperparameters}
BASE_LEARNING_RATE = TrainingSpec.model_fields["learning_rate"].default
AUTO = {"batch_size": 8, "n_epochs": 1, "learning_rate_multiplier": 1.0, "beta": 0.1, "compute_multiplier": 1.0,
        "eval_interval": "auto", "eval_samples": "auto", "reasoning_effort": "default"}
AUTO_PROMPTS_PER_BATCH = 2  # reinforcement: prompts per step, each sampled num_generations times
BASE_GENERATIONS = GRPOMethod.model_fields["num_generations"].default
# Where a JobSpec key that failed came from in the OpenAI request (OpenAI's ``param``).
PARAMS = {"data.source": "training_file", "data.validation.source": "validation_file",
          "model.name_or_path": "model", "method.graders": "method.reinforcement.grader",
          "method": "method", "training.seed": "seed"}


# ---------------------------------------------------------------------------------------------------
# Request -> JobSpec


def resolved_hyperparameters(request: CreateFineTuningJob) -> tuple[str, dict[str, Any], dict[str, Any]]:
    """(OpenAI method type, its hyperparameters with every "auto" resolved, the method's other settings)."""
    method = request.method
    kind = method.type if method else "supervised"
    section = getattr(method, kind, None) if method else None
    given = section.hyperparameters if section is not None and section.hyperparameters is not None else None
    if given is None and request.hyperparameters is not None and kind == "supervised":
        given = request.hyperparameters  # the deprecated top-level form
    if kind == "reinforcement" and (section is None or not getattr(section, "grader", None)):
        raise InvalidRequest("method.reinforcement.grader is required for a reinforcement job",
                             param="method.reinforcement.grader")
    values = given.model_dump(exclude_none=True) if given is not None else {}
    resolved = {}
    for name in HYPERPARAMETERS[kind].model_fields:
        value = values.get(name, "auto")
        if value == "auto" and kind == "reinforcement" and name == "batch_size":
            value = AUTO_PROMPTS_PER_BATCH
        resolved[name] = AUTO[name] if value == "auto" else value
    for name, default in (("reasoning_effort", "default"),):
        if name in resolved and resolved[name] != default:
            raise InvalidRequest(f"method.{kind}.hyperparameters.{name}={resolved[name]!r} is not supported by "
                                 f"posttrain (only {default!r})", param=f"method.{kind}.hyperparameters.{name}")
    extra = {"grader": section.grader} if kind == "reinforcement" and section is not None else {}
    return kind, resolved, extra


def check_model(name: str) -> None:
    """The door fine-tunes only models this server has: no hub downloads behind an OpenAI call."""
    from posttrain.data.sources import written_as_path

    if name in EMBEDDED_MODEL_NAMES or written_as_path(name):
        return
    raise InvalidRequest(
        f"model {name!r} is not available for fine-tuning on this server; use "
        f"{' or '.join(EMBEDDED_MODEL_NAMES)}, or the path of a model folder on the server",
        param="model", code="model_not_available")


def find_upload(store: JobStore, file_id: str, caller: Principal, param: str) -> FileRecord:
    record = store.get_owned_file(file_id, None if caller.admin else caller.owner) if is_id(file_id) else None
    if record is None:
        raise InvalidRequest(f"invalid {param}: no file {file_id!r} (upload it with POST /v1/files)", param=param,
                             code=f"invalid_{param}")
    return record


def job_spec(request: CreateFineTuningJob, kind: str, hyper: dict[str, Any], extra: dict[str, Any],
             seed: int) -> dict[str, Any]:
    generations = max(2, round(BASE_GENERATIONS * hyper.get("compute_multiplier", 1.0)))
    method: dict[str, Any] = {"name": METHODS[kind]}
    batch = hyper["batch_size"]
    if kind == "dpo":
        method["beta"] = hyper["beta"]
    if kind == "reinforcement":
        method.update(reward_functions=[], graders=[extra["grader"]], num_generations=generations)
        batch = hyper["batch_size"] * generations  # TRL counts completions per batch
    training: dict[str, Any] = {"per_device_train_batch_size": batch, "num_train_epochs": hyper["n_epochs"],
                                "learning_rate": BASE_LEARNING_RATE * hyper["learning_rate_multiplier"],
                                "seed": seed}
    data: dict[str, Any] = {"source": UPLOAD_PREFIX + request.training_file}
    evaluation: dict[str, Any] = {}
    if request.validation_file:
        data["validation"] = {"source": UPLOAD_PREFIX + request.validation_file}
        # The validation file is scored at every eval_interval steps and at the end (valid_*, full_valid_*);
        # a reinforcement job's answers to it are graded by its grader, eval_samples of them each time.
        if hyper.get("eval_interval", "auto") != "auto":
            evaluation["every_steps"] = hyper["eval_interval"]
        if kind == "reinforcement":
            evaluation.update(graders=[extra["grader"]], max_new_tokens=GRPOMethod.model_fields[
                "max_completion_length"].default)
            if hyper.get("eval_samples", "auto") != "auto":
                evaluation["max_samples"] = hyper["eval_samples"]
    spec = {"model": {"name_or_path": request.model}, "method": method, "data": data, "training": training}
    if evaluation:
        spec["eval"] = evaluation
    if request.suffix:
        spec["name"] = request.suffix
    return spec


def _param(error: PosttrainError) -> str | None:
    path = getattr(error, "path", None)
    for key, param in PARAMS.items():
        if path and (path == key or path.startswith(key + ".")):
            return param
    if path and path.startswith("training."):
        return "method"
    return None


def _public(message: str, files: dict[str, FileRecord]) -> str:
    """Name uploads by id, not by their path on the server."""
    for record in files.values():
        message = message.replace(record.path, f"{record.id} ({record.filename})")
    return message


def create_job(request: CreateFineTuningJob, store: JobStore, settings: ServiceSettings,
               caller: Principal) -> JobRecord:
    if request.integrations:
        raise InvalidRequest("integrations are not supported by posttrain", param="integrations")
    kind, hyper, extra = resolved_hyperparameters(request)
    check_model(request.model)
    files = {"training_file": find_upload(store, request.training_file, caller, "training_file")}
    if request.validation_file:
        files["validation_file"] = find_upload(store, request.validation_file, caller, "validation_file")
    seed = request.seed if request.seed is not None else secrets.randbelow(2**31)
    spec = job_spec(request, kind, hyper, extra, seed)
    method = {"type": kind, kind: {"hyperparameters": hyper, **extra}}
    door = {"model": request.model, "training_file": request.training_file,
            "validation_file": request.validation_file, "suffix": request.suffix, "seed": seed,
            "metadata": request.metadata, "method": method}
    try:
        return submit_job(SubmitJobRequest(spec=spec), store, settings, caller, openai_json=json.dumps(door))
    except PosttrainError as exc:
        status = getattr(exc, "status_code", 400)
        param = "model" if isinstance(exc, ModelError) else _param(exc)
        if isinstance(exc, DatasetError):
            source = exc.source or ""
            param = next((name for name, record in files.items() if record.path in source), param)
        code = f"invalid_{param}" if param in files or isinstance(exc, DatasetError) else None
        message = _public(exc.message, files)
        if isinstance(exc, ConfigError) and param and exc.path:
            message = message.removeprefix(f"{exc.path}: ")
        raise InvalidRequest(message, param=param, code=code, status_code=403 if status == 403 else 400) from None


# ---------------------------------------------------------------------------------------------------
# Job record -> fine_tuning.job


def door_fields(record: JobRecord) -> dict[str, Any]:
    return json.loads(record.openai_json or "{}")


def fine_tuned_model(record: JobRecord, door: dict[str, Any] | None = None) -> str:
    """OpenAI's naming, ``ft:<base>:<organization>:<suffix>:<job id>``; the weights are the job's final/.
    Every job is named so (a job submitted otherwise: its model and, as the suffix, its name), which is how
    ``/v1/models`` lists and serves it."""
    door = door_fields(record) if door is None else door
    if record.openai_json is not None:
        base, suffix = door.get("model") or "", door.get("suffix")
    else:
        # A job submitted without a name is named after its id: no need to say it twice.
        base, suffix = model_name(record.spec_json) or "", record.name if record.name != record.id else None
    return f"ft:{base}:{record.owner or 'posttrain'}:{suffix or ''}:{record.id}"


def result_file(record: JobRecord, store: JobStore, files_dir: Path) -> str | None:
    """The id of a succeeded job's results file (OpenAI's ``step_metrics.csv``: step, train_loss,
    train_mean_token_accuracy, valid_loss, valid_mean_token_accuracy), written from metrics.jsonl the
    first time the job is shown succeeded. Its id follows from the job's, so two requests racing to write
    it make one file."""
    file_id = RESULTS_PREFIX + record.id.removeprefix("job-")
    if store.get_file(file_id) is not None:
        return file_id
    metrics = [m for m in JobDir(record.job_dir).read_metrics() if isinstance(m, dict) and isinstance(m.get("step"), int)]
    keys = ("loss", "mean_token_accuracy", "eval_loss", "eval_mean_token_accuracy")
    steps: dict[int, dict[str, Any]] = {}
    for m in metrics:  # a step's training and evaluation records, merged into one row
        if "loss" in m or "eval_loss" in m:
            steps.setdefault(m["step"], {}).update({key: m[key] for key in keys if m.get(key) is not None})
    lines = ["step,train_loss,train_mean_token_accuracy,valid_loss,valid_mean_token_accuracy"]
    for step, row in sorted(steps.items()):
        lines.append(",".join([str(step)] + [str(row.get(key, "")) for key in keys]))
    text = "\n".join(lines) + "\n"
    content = text.encode()
    target = files_dir / file_id / "step_metrics.csv"
    atomic_write_text(target, text)
    upload = FileRecord(id=file_id, owner=record.owner, filename=target.name, path=str(target), size=len(content),
                        sha256=hashlib.sha256(content).hexdigest(), created_at=time.time())
    with contextlib.suppress(IntegrityError):  # another request recorded the same file first
        store.add_file(upload)
    return file_id


def fine_tuning_job(record: JobRecord, store: JobStore, files_dir: Path | None = None,
                    live: bool = True) -> FineTuningJob:
    door = door_fields(record)
    method = door.get("method") or {"type": "supervised", "supervised": {"hyperparameters": {}}}
    hyper = method.get(method["type"], {}).get("hyperparameters", {})
    job_dir = JobDir(record.job_dir)
    metrics = last_metrics(job_dir.metrics_path) if live else None
    error = None
    if record.state == "failed":
        error = _job_error(record, store, door)
    estimated = None
    status = job_dir.read_status() if live and record.state == "running" else None
    if status and status.started_at and status.step and status.total_steps:
        elapsed = time.time() - status.started_at
        estimated = int(status.started_at + elapsed * status.total_steps / status.step)
    return FineTuningJob(
        id=record.id, created_at=int(record.created_at), error=error,
        fine_tuned_model=fine_tuned_model(record, door) if record.state == "succeeded" else None,
        finished_at=int(record.finished_at) if record.finished_at and record.state in ("succeeded", "failed",
                                                                                         "cancelled") else None,
        hyperparameters={k: hyper[k] for k in ("batch_size", "learning_rate_multiplier", "n_epochs") if k in hyper},
        model=door.get("model", ""), organization_id=record.owner or "posttrain",
        result_files=[result_file(record, store, files_dir)] if files_dir and record.state == "succeeded" else [],
        seed=door.get("seed", 0), status=record.state,
        trained_tokens=(metrics or {}).get("num_tokens_seen") if record.state == "succeeded" else None,
        training_file=door.get("training_file", ""), validation_file=door.get("validation_file"),
        estimated_finish=estimated, metadata=door.get("metadata"), method=method,
    )


def _job_error(record: JobRecord, store: JobStore, door: dict[str, Any]) -> JobError:
    message = record.error or "the job failed"
    files = {}
    for param in ("training_file", "validation_file"):
        file_id = door.get(param)
        upload = store.get_file(file_id) if file_id and is_id(file_id) else None
        if upload is not None:
            files[param] = upload
    param = next((name for name, upload in files.items() if upload.path in message), None)
    return JobError(code=f"invalid_{param}" if param else "training_failed", message=_public(message, files),
                    param=param)
