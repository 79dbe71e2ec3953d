"""Configuration of the posttrain Llama Stack providers (the ``config:`` of their run.yaml entries).

Plain pydantic: Llama Stack validates the run.yaml section with these classes, and the mapping reads the
training defaults from them.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

DEFAULT_SERVICE_URL = "http://localhost:8322"
DEFAULT_DATA_DIR = "~/.llama/posttrain"


class TrainingDefaults(BaseModel):
    """What a Llama Stack request does not say and posttrain needs: shared by both providers."""

    model_config = ConfigDict(extra="forbid")

    device: Literal["auto", "cpu", "cuda", "mps"] = Field("auto", description="Device the worker trains on.")
    dtype: Literal["auto", "bf16", "fp16", "fp32"] | None = Field(
        None, description="Weights dtype; overrides the request's training_config.dtype when set.")
    max_seq_length: int = Field(1024, gt=0, description="Truncate tokenized rows to this many tokens.")
    gradient_checkpointing: Literal["auto", True, False] = Field(
        "auto", description="Recompute activations (efficiency_config.enable_activation_checkpointing wins).")
    dpo_beta: float = Field(0.1, gt=0, description="DPO beta when the request's algorithm_config has none.")
    dpo_loss_type: Literal["sigmoid", "hinge", "ipo"] = Field(
        "sigmoid", description="DPO loss when the request's algorithm_config has none.")
    use_reference_model: bool = Field(
        True, description="DPO: keep a frozen reference model (false: the base with the adapter disabled).")
    validation_split: float = Field(
        0.2, ge=0, lt=1,
        description="Share of the training rows held out for validation_loss/perplexity when the request "
        "names no validation_dataset_id (capped at max_validation_steps batches); 0: validation metrics are "
        "computed on training rows instead.")
    seed: int = Field(42, ge=0, description="training.seed of every job (data order, split, initialisation).")


class InlineProviderConfig(TrainingDefaults):
    """``inline::posttrain``: jobs run on the Llama Stack machine, one worker process per job."""

    data_dir: str = Field(
        DEFAULT_DATA_DIR,
        description="Job store (SQLite) and job directories; jobs here outlive Llama Stack restarts.")
    worker_python: str = Field(
        sys.executable,
        description="Interpreter that runs `python -m posttrain.worker` (posttrain with torch installed); the "
        "Llama Stack environment itself needs no torch.")
    launcher: Literal["local", "torchrun", "kfp"] = Field(
        "local", description="How workers start: local (one process per job) or kfp (each job runs as a Kubeflow "
        "pipeline, prepare data -> train -> export, under kfp.local with worker_python; needs posttrain[kfp] there); "
        "torchrun is not available here yet.")
    slots: int = Field(1, ge=1, description="Jobs training at once.")
    cancel_grace_s: float = Field(30.0, gt=0, description="Seconds between SIGTERM and SIGKILL on cancel.")
    warm_workers: bool = Field(
        True, description="Fork each job's worker from a template process (under worker_python) that has "
        "imported torch/transformers/TRL already: a job starts in well under a second instead of seconds. "
        "Off: a fresh worker process per job.")
    # The inference worker that answers the inline inference provider (started on its first request, under
    # worker_python, beside the training slots): the same settings as `posttrain serve --inference-*`.
    inference_device: str = Field(
        "auto", description="Device of the inference worker: auto, cpu, cuda, cuda:N (only GPU N) or mps.")
    inference_threads: int | None = Field(
        None, ge=1, description="torch threads of the inference worker (default 1 on CPU).")
    inference_memory_mb: int = Field(
        4096, ge=1, description="Memory the inference worker's loaded models may take (least recently used "
        "unloaded first).")
    inference_dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="Weights dtype of served models (auto: bfloat16 on GPUs and CPUs with native bf16).")

    def resolved_data_dir(self) -> Path:
        return Path(os.path.expanduser(self.data_dir)).resolve()

    @classmethod
    def sample_run_config(cls, __distro_dir__: str = "", **_kwargs: Any) -> dict[str, Any]:
        return {
            "data_dir": "${env.POSTTRAIN_DATA_DIR:=" + DEFAULT_DATA_DIR + "}",
            "worker_python": "${env.POSTTRAIN_WORKER_PYTHON:=python3}",
            "device": "${env.POSTTRAIN_DEVICE:=auto}",
        }


class InlineInferenceConfig(BaseModel):
    """``inline::posttrain`` inference: serves what the ``inline::posttrain`` post_training provider trains,
    with that provider's data dir and inference settings (one ServiceCore owns both)."""

    model_config = ConfigDict(extra="forbid")

    @classmethod
    def sample_run_config(cls, __distro_dir__: str = "", **_kwargs: Any) -> dict[str, Any]:
        return {}


class RemoteInferenceConfig(BaseModel):
    """``remote::posttrain`` inference: serves what the ``remote::posttrain`` post_training provider trains,
    from the same service with the same key."""

    model_config = ConfigDict(extra="forbid")

    @classmethod
    def sample_run_config(cls, __distro_dir__: str = "", **_kwargs: Any) -> dict[str, Any]:
        return {}


class RemoteProviderConfig(TrainingDefaults):
    """``remote::posttrain``: jobs go to a posttrain job service (``posttrain serve``)."""

    url: str = Field(DEFAULT_SERVICE_URL, description="The posttrain service's base URL.")
    api_key: str | None = Field(None, description="Bearer key of the service (default: $POSTTRAIN_API_KEY).")
    timeout_s: float = Field(60.0, gt=0, description="HTTP timeout of one call to the service.")

    def resolved_api_key(self) -> str | None:
        return self.api_key or os.environ.get("POSTTRAIN_API_KEY") or None

    @classmethod
    def sample_run_config(cls, __distro_dir__: str = "", **_kwargs: Any) -> dict[str, Any]:
        return {
            "url": "${env.POSTTRAIN_SERVER:=" + DEFAULT_SERVICE_URL + "}",
            "api_key": "${env.POSTTRAIN_API_KEY:=}",
        }
