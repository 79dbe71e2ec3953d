"""``posttrain eval``: several models scored on the same held-out rows, side by side.

A model is named as a user would point at it: a base model (an embedded name such as ``posttrain:tiny``, a
model folder or a hub id), a job directory (its ``final/``, else its newest complete checkpoint), a checkpoint
folder, a LoRA adapter folder, or ``server:<model id>`` for a model an OpenAI-compatible server serves
(``--server``). Local models answer through the inference engine serving uses
(:class:`~posttrain.inference.engine.InferenceEngine`, batched); a LoRA adapter is merged into its base first.
Every model gets the same rows, graders and sampling settings, and every answer is kept.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel

from posttrain.data.eval_rows import EvalRow
from posttrain.errors import ModelError
from posttrain.eval.answers import (
    Answerer,
    EngineModel,
    ServerModel,
    answer_records,
    grade,
    regression_grader,
    scorers,
)
from posttrain.eval.metrics import pairwise_scores, preference_scores, reply_scores
from posttrain.job.directory import JobDir

log = logging.getLogger(__name__)

SERVER_PREFIX = "server:"
ModelKind = Literal["causal_lm", "reward", "server"]


@dataclass
class Target:
    """What a model name points at: the weights to load (or the served id), the base a LoRA adapter goes on."""

    name: str
    kind: ModelKind
    path: str  # a model or adapter folder, an embedded name or hub id; the model id for a server
    base: str | None = None  # the base model of a LoRA adapter


@dataclass
class ModelReport:
    model: str
    loaded: str
    metrics: dict[str, float] = field(default_factory=dict)
    answers: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0


@dataclass
class EvalSettings:
    graders: list[BaseModel]
    max_new_tokens: int = 64
    temperature: float = 0.0
    batch_size: int = 16
    max_length: int = 1024
    seed: int = 0
    device: str = "cpu"
    server_url: str = "http://127.0.0.1:8322"
    api_key: str | None = None


def _job_weights(job_dir: Path) -> Path:
    jd = JobDir(job_dir)
    if jd.final_dir.is_dir():
        return jd.final_dir
    latest = jd.latest_checkpoint()
    if latest is None:
        raise ModelError(f"{job_dir} is a job directory with no final/ and no complete checkpoint yet")
    return _checkpoint_weights(latest)


def _checkpoint_weights(checkpoint: Path) -> Path:
    # The RL trainers keep the model in checkpoint-N/model/; the TRL trainers write it at the top.
    return checkpoint / "model" if (checkpoint / "model").is_dir() else checkpoint


def _job_spec(folder: Path) -> dict[str, Any]:
    for candidate in (folder, *folder.parents[:3]):
        spec_path = candidate / "spec.json"
        if spec_path.is_file():
            try:
                spec = json.loads(spec_path.read_text())
            except ValueError:
                return {}
            return spec if isinstance(spec, dict) and "method" in spec else {}
    return {}


def resolve_target(name: str) -> Target:
    """Where the model ``name`` is (see the module doc)."""
    from posttrain.modeling import is_adapter_dir, resolve_model_path

    if name.startswith(SERVER_PREFIX):
        model_id = name[len(SERVER_PREFIX):]
        if not model_id:
            raise ModelError(f"{name!r}: name the served model after 'server:'")
        return Target(name, "server", model_id)
    folder = Path(name).expanduser()
    if not folder.is_dir():
        return Target(name, "causal_lm", resolve_model_path(name))
    spec = _job_spec(folder)
    if (folder / "spec.json").is_file():
        weights = _job_weights(folder)
    elif folder.name.startswith("checkpoint-"):
        weights = _checkpoint_weights(folder)
    else:
        weights = folder
    method = spec.get("method", {}).get("name") if isinstance(spec.get("method"), dict) else None
    kind: ModelKind = "reward" if method == "reward" else "causal_lm"
    base = None
    if is_adapter_dir(weights):
        config = json.loads((weights / "adapter_config.json").read_text())
        base = (spec.get("model") or {}).get("name_or_path") or config.get("base_model_name_or_path")
        if not base:
            raise ModelError(f"{weights}/adapter_config.json names no base model")
        base = resolve_model_path(base)
    elif not (weights / "config.json").is_file():
        raise ModelError(f"{name!r} is a folder but not a model, adapter, checkpoint or job directory")
    return Target(name, kind, str(weights), base)


def load_target(target: Target, device: str = "cpu") -> tuple[Any, Any]:
    """The model (a LoRA adapter merged into its base) and tokenizer of a local target, in eval mode."""
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    model_class = AutoModelForSequenceClassification if target.kind == "reward" else AutoModelForCausalLM
    source = target.base or target.path
    try:
        model = model_class.from_pretrained(source, dtype=torch.float32)
        if target.base is not None:
            from peft import PeftModel

            model = PeftModel.from_pretrained(model, target.path).merge_and_unload()
        tokenizer_source = target.path if (Path(target.path) / "tokenizer_config.json").is_file() else source
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_source)
    except (OSError, ValueError) as exc:
        raise ModelError(f"cannot load {target.name!r}: {exc}") from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if target.kind == "reward":
        model.config.pad_token_id = tokenizer.pad_token_id
    return model.to(device).eval(), tokenizer


def _describe(target: Target) -> str:
    if target.kind == "server":
        return f"served model {target.path}"
    return f"{target.path}" + (f" (LoRA on {target.base})" if target.base else "")


def evaluate_model(target: Target, rows: list[EvalRow], regression: list[EvalRow],
                   settings: EvalSettings) -> ModelReport:
    """One model's metrics on ``rows`` (and the regression set) and every answer it gave."""
    started = time.perf_counter()
    report = ModelReport(target.name, _describe(target))
    engine = None
    answerer: Answerer | None = None
    try:
        if target.kind == "server":
            answerer = ServerModel(settings.server_url, target.path, settings.api_key)
        else:
            from posttrain.inference.engine import InferenceEngine
            from posttrain.modeling import ensure_chat_template

            model, tokenizer = load_target(target, settings.device)
            if any(isinstance(row.prompt, list) for row in [*rows, *regression]):
                ensure_chat_template(tokenizer)
            length, batch = settings.max_length, settings.batch_size
            if target.kind == "reward":
                report.metrics.update(pairwise_scores(model, tokenizer, rows, length, batch))
            else:
                report.metrics.update(reply_scores(model, tokenizer, rows, length, batch))
                report.metrics.update(preference_scores(model, tokenizer, rows, length, batch))
                engine = InferenceEngine(model, tokenizer, target.name, max_batch_size=batch)
                answerer = EngineModel(engine)
        if answerer is not None:
            _answer_and_grade(answerer, rows, regression, settings, report)
    finally:
        if engine is not None:
            engine.close()
        if isinstance(answerer, ServerModel):
            answerer.close()
    report.seconds = time.perf_counter() - started
    return report


def _answer_and_grade(answerer: Answerer, rows: list[EvalRow], regression: list[EvalRow], settings: EvalSettings,
                      report: ModelReport) -> None:
    prompted = [row for row in rows if row.prompt is not None]
    if settings.graders and prompted:
        answers = answerer.answer([row.prompt for row in prompted], settings.max_new_tokens,  # type: ignore[misc]
                                  settings.temperature, settings.seed)
        grades = grade(scorers(settings.graders), answers, prompted)
        report.metrics.update({name: sum(values) / len(values) for name, values in grades.items()})
        report.answers += answer_records("held_out", prompted, answers, grades)
    if regression:
        answers = answerer.answer([row.prompt for row in regression], settings.max_new_tokens,  # type: ignore[misc]
                                  settings.temperature, settings.seed)
        right = next(iter(grade(scorers([regression_grader()]), answers, regression).values()))
        report.metrics["regression_accuracy"] = sum(right) / len(right)
        report.metrics["regression_forgotten"] = float(sum(1 for value in right if value < 1))
        report.answers += answer_records("regression", regression, answers, {"right": right})


def compare(names: list[str], rows: list[EvalRow], regression: list[EvalRow], settings: EvalSettings
            ) -> list[ModelReport]:
    """Every model's report, in the order given (each loaded, scored and released before the next)."""
    targets = [resolve_target(name) for name in names]  # every name checked before any model loads
    return [evaluate_model(target, rows, regression, settings) for target in targets]


def results_json(reports: list[ModelReport], data: str, rows: int, settings: EvalSettings) -> dict[str, Any]:
    return {"data": data, "rows": rows, "graders": [getattr(g, "name", "") for g in settings.graders],
            "max_new_tokens": settings.max_new_tokens, "temperature": settings.temperature,
            "models": [asdict(report) for report in reports]}
