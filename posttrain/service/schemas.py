"""Request and response bodies of the REST API (separate from the storage models in ``store.py``).

Only pydantic is imported here: ``posttrain.client`` parses responses with these same models.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from posttrain.job.directory import JobState as JobStateName

UPLOAD_PREFIX = "upload:"  # data.source: "upload:<file id>" refers to a file sent to POST /v1/files
RESULTS_PREFIX = "file-results-"  # a fine-tuning job's results file (purpose fine-tune-results)
# Bounds of the API's integers (query parameters and bodies): each fits a 64-bit database column.
MAX_OFFSET = 10**9
MAX_STEP = 2**62


class SubmitJobRequest(BaseModel):
    """Either a JobSpec as JSON (``spec``) or YAML text, plus optional ``a.b=c`` overrides."""

    model_config = ConfigDict(extra="forbid")

    spec: dict[str, Any] | None = Field(None, description="The JobSpec as a JSON object.")
    yaml: str | None = Field(None, description="The JobSpec as YAML text (what `posttrain train` reads).")
    overrides: list[str] = Field(default_factory=list, max_length=1000,
                                 description="Dotted overrides, e.g. training.max_steps=10.")
    priority: int = Field(0, ge=-1000, le=1000, description="Higher runs first; equal priorities run in order.")

    @model_validator(mode="after")
    def _one_source(self) -> SubmitJobRequest:
        if self.spec is not None and self.yaml is not None:
            raise ValueError("give either 'spec' or 'yaml', not both")
        return self


class StageInfo(BaseModel):
    """One stage of a pipeline job: a JobSpec run in its own job directory inside the job's."""

    name: str
    method: str
    state: JobStateName
    step: int = 0
    total_steps: int | None = None
    error: str | None = None
    dir: str = Field(description="The stage's job directory (spec.json, status.json, metrics.jsonl, final/).")


class JobInfo(BaseModel):
    id: str
    name: str | None = None
    method: str
    model: str | None = Field(None, description="The spec's model.name_or_path.")
    state: JobStateName
    priority: int = 0
    step: int = 0
    total_steps: int | None = None
    metrics: dict[str, Any] | None = Field(None, description="The latest training metrics record.")
    eval: dict[str, Any] | None = Field(None, description="The latest evaluation: step, final, metrics (by name).")
    best: dict[str, Any] | None = Field(None, description="With eval.select_best: the best evaluation so far and "
                                                          "its checkpoint (best.json).")
    warnings: list[str] | None = Field(None, description="What the run warned of (the reward-hacking guard).")
    error: str | None = None
    attempt: int = Field(0, description="How many times a worker was started for this job.")
    retries: int = Field(0, description="Requeues after a worker died (killed, out of memory, restart).")
    cancel_requested: bool = False
    pause_requested: bool = Field(False, description="A pause is pending: the worker stops at its next step "
                                                     "boundary, with a checkpoint, and the job becomes paused.")
    stage: str | None = Field(None, description="A pipeline job: the stage running now.")
    stages: list[StageInfo] | None = Field(None, description="A pipeline job: every stage, in order, with its "
                                                             "progress (steps of the job count on over them).")
    created_at: float
    launched_at: float | None = Field(None, description="When the service started the worker process.")
    started_at: float | None = Field(None, description="When the worker reported it was running.")
    finished_at: float | None = None
    updated_at: float


class JobPage(BaseModel):
    jobs: list[JobInfo]
    total: int
    limit: int
    offset: int


class LogTail(BaseModel):
    job_id: str
    lines: list[str]


class EvalReport(BaseModel):
    job_id: str
    eval: dict[str, Any] | None = Field(None, description="The latest evaluation: step, final, metrics.")
    best: dict[str, Any] | None = Field(None, description="The best evaluation and its checkpoint (best.json).")
    steps: list[int] = Field(default_factory=list, description="Evaluations whose answers are kept.")
    step: int | None = Field(None, description="The evaluation the answers are of.")
    answers: list[dict[str, Any]] = Field(
        default_factory=list, description="Its answers (set, prompt, reference, answer, scores); at most 2000.")


class MetricsResponse(BaseModel):
    job_id: str
    metrics: list[dict[str, Any]]
    more: bool = Field(False, description="More records follow: ask again with since_step = the last step here.")


class Artifact(BaseModel):
    path: str = Field(description="Relative to the job directory; download it from .../artifacts/{path}.")
    size: int


class ArtifactList(BaseModel):
    job_id: str
    checkpoints: list[str] = Field(description="Complete checkpoints, oldest first.")
    final: bool = Field(description="Whether final/ (the trained adapter or model) exists.")
    artifacts: list[Artifact]
    total_size: int


class FileInfo(BaseModel):
    """An uploaded file: OpenAI's file object (id, object, bytes, created_at, filename, purpose, status)
    plus posttrain's own fields (size, sha256, source)."""

    id: str
    object: Literal["file"] = "file"
    filename: str
    bytes: int = Field(0, description="Size in bytes (OpenAI's name for size).")
    size: int
    sha256: str
    created_at: int = Field(description="Unix time in seconds.")
    purpose: str = "fine-tune"
    status: Literal["uploaded", "processed", "error"] = "processed"
    status_details: str | None = None
    expires_at: int | None = None
    source: str = Field(description="Put this in data.source (or data.validation.source) of a JobSpec.")


class FileList(BaseModel):
    object: Literal["list"] = "list"
    data: list[FileInfo]
    has_more: bool = Field(False, description="More files follow: ask again with after = the last id here.")
    first_id: str | None = None
    last_id: str | None = None


class FileDeleted(BaseModel):
    id: str
    object: Literal["file"] = "file"
    deleted: bool = True


class OpenAIError(BaseModel):
    message: str
    type: str = Field(description="invalid_request_error, authentication_error, permission_error, "
                                  "not_found_error, conflict_error, rate_limit_error or server_error.")
    param: str | None = Field(None, description="The request field at fault, when there is one.")
    code: str | None = None


class ErrorBody(BaseModel):
    detail: str = Field(description="What went wrong, and where.")
    type: str | None = Field(None, description="Error class, e.g. ConfigError, DatasetError.")
    error: OpenAIError | None = Field(None, description="The same error in OpenAI's shape (its SDK reads it).")


class Health(BaseModel):
    status: Literal["ok", "unavailable"]
    detail: str | None = None
