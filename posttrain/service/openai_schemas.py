"""Bodies of the OpenAI fine-tuning door (``/v1/fine_tuning/jobs``), field for field as OpenAI's API and
its Python SDK (``openai.types.fine_tuning``) name them. Requests forbid unknown fields, so a typo is a 400
naming the field rather than a setting silently ignored."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from posttrain.spec import MAX_SEED

Auto = Literal["auto"]
BatchSize = Auto | Annotated[int, Field(ge=1, le=65536)]
Epochs = Auto | Annotated[int, Field(ge=1, le=1000)]
Multiplier = Auto | Annotated[float, Field(gt=0, le=1000)]


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, protected_namespaces=())


class SupervisedHyperparameters(_Request):
    batch_size: BatchSize | None = Field(None, description="Rows per optimizer step (auto: 8).")
    learning_rate_multiplier: Multiplier | None = Field(None, description="Times posttrain's learning rate "
                                                                          "(2e-4; auto: 1).")
    n_epochs: Epochs | None = Field(None, description="Passes over the training file (auto: 1).")


class DpoHyperparameters(SupervisedHyperparameters):
    beta: Multiplier | None = Field(None, description="DPO's KL penalty strength (auto: 0.1).")


class ReinforcementHyperparameters(SupervisedHyperparameters):
    compute_multiplier: Multiplier | None = Field(None, description="Scales the completions sampled per prompt "
                                                                    "(auto: 1, i.e. 4).")
    eval_interval: Auto | Annotated[int, Field(ge=1, le=10**9)] | None = Field(
        None, description="Steps between evaluations on the validation file (auto: every 10 steps).")
    eval_samples: Auto | Annotated[int, Field(ge=1, le=10**6)] | None = Field(
        None, description="Validation rows answered and graded at each evaluation (auto: all of them).")
    reasoning_effort: Literal["default", "low", "medium", "high"] | None = Field(None, description="Only default.")


class SupervisedMethod(_Request):
    hyperparameters: SupervisedHyperparameters | None = None


class DpoMethod(_Request):
    hyperparameters: DpoHyperparameters | None = None


class ReinforcementMethod(_Request):
    grader: dict[str, Any] = Field(description="string_check, text_similarity, python or multi (see docs/openai.md).")
    hyperparameters: ReinforcementHyperparameters | None = None


class Method(_Request):
    type: Literal["supervised", "dpo", "reinforcement"]
    supervised: SupervisedMethod | None = None
    dpo: DpoMethod | None = None
    reinforcement: ReinforcementMethod | None = None

    @model_validator(mode="after")
    def _one_section(self) -> Method:
        for kind in ("supervised", "dpo", "reinforcement"):
            if kind != self.type and getattr(self, kind) is not None:
                raise ValueError(f"method.{kind} is given but method.type is {self.type!r}")
        return self


class CreateFineTuningJob(_Request):
    model: str = Field(min_length=1, max_length=1024, description="posttrain:tiny, posttrain:smollm2 or a model "
                                                                  "folder on the server.")
    training_file: str = Field(min_length=1, max_length=64, description="Id of an uploaded file.")
    validation_file: str | None = Field(None, min_length=1, max_length=64)
    suffix: str | None = Field(None, min_length=1, max_length=64, description="Part of fine_tuned_model's name.")
    seed: int | None = Field(None, ge=0, le=MAX_SEED)
    metadata: dict[Annotated[str, Field(max_length=64)], Annotated[str, Field(max_length=512)]] | None = Field(
        None, max_length=16)
    method: Method | None = Field(None, description="Default: supervised.")
    hyperparameters: SupervisedHyperparameters | None = Field(None, description="Deprecated: use method.")
    integrations: list[dict[str, Any]] | None = Field(None, max_length=0, description="Not supported: only empty.")


class JobError(BaseModel):
    code: str
    message: str
    param: str | None = None


class FineTuningJob(BaseModel):
    model_config = ConfigDict(protected_namespaces=())

    id: str
    object: Literal["fine_tuning.job"] = "fine_tuning.job"
    created_at: int
    error: JobError | None = None
    fine_tuned_model: str | None = None
    finished_at: int | None = None
    hyperparameters: dict[str, Any]
    model: str
    organization_id: str
    result_files: list[str] = Field(default_factory=list)
    seed: int
    status: str = Field(description="validating_files, queued, running, paused, succeeded, failed or cancelled.")
    trained_tokens: int | None = None
    training_file: str
    validation_file: str | None = None
    estimated_finish: int | None = None
    integrations: list[dict[str, Any]] | None = None
    metadata: dict[str, str] | None = None
    method: dict[str, Any] | None = None


class FineTuningJobList(BaseModel):
    object: Literal["list"] = "list"
    data: list[FineTuningJob]
    has_more: bool


class FineTuningJobEvent(BaseModel):
    id: str
    object: Literal["fine_tuning.job.event"] = "fine_tuning.job.event"
    created_at: int
    level: Literal["info", "warn", "error"]
    message: str
    data: dict[str, Any] | None = None
    type: Literal["message", "metrics"] = "message"


class FineTuningJobEventList(BaseModel):
    object: Literal["list"] = "list"
    data: list[FineTuningJobEvent]
    has_more: bool


class CheckpointMetrics(BaseModel):
    step: float | None = None
    train_loss: float | None = None
    train_mean_token_accuracy: float | None = None
    valid_loss: float | None = None
    valid_mean_token_accuracy: float | None = None
    full_valid_loss: float | None = None
    full_valid_mean_token_accuracy: float | None = None


class FineTuningJobCheckpoint(BaseModel):
    id: str
    object: Literal["fine_tuning.job.checkpoint"] = "fine_tuning.job.checkpoint"
    created_at: int
    fine_tuned_model_checkpoint: str
    fine_tuning_job_id: str
    metrics: CheckpointMetrics
    step_number: int


class FineTuningJobCheckpointList(BaseModel):
    object: Literal["list"] = "list"
    data: list[FineTuningJobCheckpoint]
    has_more: bool
    first_id: str | None = None
    last_id: str | None = None
