"""What ``/v1/models`` offers a caller, and which weights a model id means.

A caller sees the base models this server offers (the embedded ones) and its own jobs' models (an admin:
everyone's): each job's trained model under the OpenAI door's name ``ft:<base>:<owner>:<suffix>:<job id>``
(any job that succeeded and still has its final/), and each complete checkpoint as
``<that name>:ckpt-step-<N>`` (OpenAI's ``fine_tuned_model_checkpoint``). The same models answer to the
names the other doors use: the job id (``job-...``), ``job-.../final``, ``job-.../checkpoints/checkpoint-N``
(or ``job-.../checkpoint-N``), and their folders' paths on the server. Another owner's model reads
exactly like one that does not exist (404 ``model_not_found``).

Deleting a model deletes its weights: a fine-tuned model's final/ folder, a checkpoint's folder. The job
stays (its record, spec, metrics and logs), and so do its other checkpoints, which are models of their own.
"""

from __future__ import annotations

import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from posttrain.embedded import EMBEDDED_MODEL_NAMES
from posttrain.errors import ModelError
from posttrain.inference.model_source import (
    ModelSource,
    final_folder,
    folder_source,
    is_model_folder,
    local_source,
)
from posttrain.job.directory import COMPLETE_MARKER, TERMINAL_STATES, JobDir
from posttrain.service.auth import Principal
from posttrain.service.errors import InvalidRequest
from posttrain.service.ids import is_id
from posttrain.service.lifecycle import JobConflict, check_run_here
from posttrain.service.openai_door import fine_tuned_model
from posttrain.service.settings import ServiceSettings
from posttrain.service.store import JobRecord, JobStore
from posttrain.service.views import model_name

BASE_OWNER = "posttrain"
CHECKPOINT_SUFFIX = re.compile(r"^ckpt-step-(\d+)$")
CHECKPOINT_PATH = re.compile(r"^(?:checkpoints/)?checkpoint-(\d+)/?$")
NOT_GENERATIVE = {"reward"}  # a reward model scores text, it does not write it


@dataclass
class ServedModel:
    id: str
    owned_by: str
    created: int
    source: ModelSource
    job: JobRecord | None = None
    folder: Path | None = None  # the weights' folder (None: a base model)
    step: int | None = None  # a checkpoint's step

    def as_openai(self) -> dict[str, Any]:
        """OpenAI's model object, with where it comes from beside it."""
        # A checkpoint's parent is its job's model; a fine-tuned model's, the model its job started from.
        parent = None if self.job is None else (fine_tuned_model(self.job) if self.step is not None
                                                else model_name(self.job.spec_json))
        return {"id": self.id, "object": "model", "created": self.created, "owned_by": self.owned_by,
                "root": self.source.base, "parent": parent, "job_id": self.job.id if self.job else None,
                "kind": "base" if self.job is None else "checkpoint" if self.step is not None else "fine-tune",
                "adapter": self.source.adapter is not None}


def checkpoint_step(model_id: str) -> int | None:
    """The step of a checkpoint's model id (``<fine-tuned name>:ckpt-step-<N>``); None for any other id."""
    match = CHECKPOINT_SUFFIX.match(model_id.rpartition(":")[2])
    return int(match.group(1)) if match else None


def not_found(model_id: str) -> InvalidRequest:
    return InvalidRequest(f"The model '{model_id}' does not exist or you do not have access to it; GET /v1/models "
                          "lists yours", param="model", code="model_not_found", status_code=404)


def base_model(name: str) -> ServedModel:
    return ServedModel(id=name, owned_by=BASE_OWNER, created=0, source=ModelSource(base=name))


def final_model(job: JobRecord) -> ServedModel | None:
    """A job's trained model, if it succeeded and its final/ is there."""
    if job.state != "succeeded" or job.method in NOT_GENERATIVE:
        return None
    folder = final_folder(Path(job.job_dir))
    if not is_model_folder(folder):
        return None
    return ServedModel(id=fine_tuned_model(job), owned_by=job.owner or BASE_OWNER,
                       created=int(job.finished_at or job.created_at), source=folder_source(folder, folder.parent),
                       job=job, folder=folder)


def checkpoint_models(job: JobRecord) -> list[ServedModel]:
    """A job's complete checkpoints, oldest first."""
    if job.method in NOT_GENERATIVE:
        return []
    job_dir = JobDir(job.job_dir)
    models = []
    for folder in job_dir.checkpoints():
        if not is_model_folder(folder):
            continue
        step = JobDir.checkpoint_step(folder)
        try:
            created = int((folder / COMPLETE_MARKER).stat().st_mtime)
            source = folder_source(folder, job_dir.root)
        except (OSError, ModelError):  # rotated away (save_total_limit) while listed
            continue
        models.append(ServedModel(id=f"{fine_tuned_model(job)}:ckpt-step-{step}", owned_by=job.owner or BASE_OWNER,
                                  created=created, source=source, job=job, folder=folder, step=step))
    return models


class ModelCatalog:
    """The models of one service, as each caller may see them."""

    def __init__(self, store: JobStore, settings: ServiceSettings) -> None:
        self.store = store
        self.settings = settings

    def list(self, caller: Principal) -> list[ServedModel]:
        models = [base_model(name) for name in EMBEDDED_MODEL_NAMES]
        jobs, _ = self.store.list_jobs(None, limit=100_000, owner=None if caller.admin else caller.owner)
        for job in reversed(jobs):  # oldest first, as OpenAI lists
            final = final_model(job)
            models += [final] if final is not None else []
            models += checkpoint_models(job)
        return models

    def find(self, model_id: str | None, caller: Principal) -> ServedModel:
        """The model ``model_id`` names for ``caller``, or 404 ``model_not_found``."""
        if not model_id:
            raise InvalidRequest("model is required", param="model")
        if model_id in EMBEDDED_MODEL_NAMES:
            return base_model(model_id)
        if model_id.startswith("ft:"):
            return self._by_name(model_id, caller)
        head, _, rest = model_id.partition("/")
        if is_id(head) and not model_id.startswith("/"):
            return self._in_job(self._job(head, model_id, caller), rest, model_id)
        return self._by_path(model_id, caller)

    def _job(self, job_id: str, model_id: str, caller: Principal) -> JobRecord:
        job = self.store.get_job(job_id, None if caller.admin else caller.owner) if is_id(job_id) else None
        if job is None:
            raise not_found(model_id)
        return job

    def _by_name(self, model_id: str, caller: Principal) -> ServedModel:
        parts = model_id.split(":")
        step = CHECKPOINT_SUFFIX.match(parts[-1])
        job = self._job(parts[-2] if step else parts[-1], model_id, caller)
        model = self._checkpoint(job, int(step.group(1))) if step else final_model(job)
        if model is None or model.id != model_id:
            raise not_found(model_id)
        return model

    def _in_job(self, job: JobRecord, rest: str, model_id: str) -> ServedModel:
        """``job-...`` or ``job-.../final``: its trained model; ``job-.../[checkpoints/]checkpoint-N``: that one."""
        if rest.strip("/") in ("", "final"):
            model = final_model(job)
            if model is None:
                raise InvalidRequest(f"job {job.id} has no trained model to serve (it is {job.state}"
                                     f"{'' if job.state != 'succeeded' else ', and its final/ is gone'})",
                                     param="model", code="model_not_found", status_code=404)
            return model
        match = CHECKPOINT_PATH.match(rest)
        model = self._checkpoint(job, int(match.group(1))) if match else None
        if model is None:
            raise not_found(model_id)
        return model

    def _checkpoint(self, job: JobRecord, step: int) -> ServedModel | None:
        return next((m for m in checkpoint_models(job) if m.step == step), None)

    def _by_path(self, model_id: str, caller: Principal) -> ServedModel:
        """A folder on the server: a job directory of the caller's or a model folder inside one, or (on a
        server without keys, or under --allow-path) any model folder."""
        path = Path(model_id).expanduser()
        if not path.is_absolute():
            raise not_found(model_id)
        path = path.resolve()
        jobs_dir = self.settings.jobs_dir
        if path.is_relative_to(jobs_dir) and path != jobs_dir:
            job_id = path.relative_to(jobs_dir).parts[0]
            job = self._job(job_id, model_id, caller)
            return self._in_job(job, str(path.relative_to(Path(job.job_dir).resolve())).removeprefix("."), model_id)
        allowed = not self.settings.restricts_local_paths or any(
            path.is_relative_to(root) for root in self.settings.allowed_paths)
        if not allowed or not path.is_dir():
            raise not_found(model_id)
        try:
            source = local_source(str(path))
        except ModelError as exc:
            raise InvalidRequest(exc.message, param="model", code="model_not_found", status_code=404) from None
        return ServedModel(id=model_id, owned_by=caller.owner, created=int(path.stat().st_mtime), source=source,
                           folder=path)

    def delete(self, model: ServedModel, caller: Principal) -> None:
        """Delete a fine-tuned model's or a checkpoint's weights (see the module docstring)."""
        if model.job is None or model.folder is None:
            raise InvalidRequest(f"{model.id} is a base model of this server; it cannot be deleted", status_code=403)
        job = model.job
        if not caller.may_see(job.owner):
            raise not_found(model.id)
        if job.state not in TERMINAL_STATES:
            raise JobConflict(f"job {job.id} is {job.state}; its checkpoints can be deleted once it has finished")
        check_run_here(job, self.settings, "delete models of")
        if not model.folder.resolve().is_relative_to(self.settings.jobs_dir):
            raise not_found(model.id)  # never delete outside our own data dir
        shutil.rmtree(model.folder, ignore_errors=True)
