"""Check a JobSpec, its model and its dataset without training: `posttrain validate` and the service's
submit-time check. Raises the same typed errors the worker would, before any work is queued."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from posttrain.errors import ConfigError, ModelError, UnsupportedError
from posttrain.spec import JobSpec


@dataclass
class PreflightReport:
    method: str
    model: str
    model_location: str  # local folder | hub (not downloaded) | embedded
    device: str
    dtype: str
    data_source: str
    data_format: str
    train_rows: int
    eval_rows: int | None
    skipped_rows: int
    steps_per_epoch: int
    total_steps: int
    warnings: list[str] = field(default_factory=list)

    def as_dict(self) -> dict:
        return dict(self.__dict__)


def _check_model(spec: JobSpec) -> str:
    from posttrain.data.sources import looks_like_local_path
    from posttrain.embedded import EMBEDDED_MODEL_NAMES, SMOLLM2_MODEL_NAME, smollm2_gguf_path
    from posttrain.modeling import resolve_model_path

    name = spec.model.name_or_path
    if name in EMBEDDED_MODEL_NAMES:
        if name == SMOLLM2_MODEL_NAME:
            smollm2_gguf_path()  # names the missing package; the conversion itself waits for the worker
        return "embedded"
    path = Path(name).expanduser()
    if path.exists() or looks_like_local_path(name):
        resolve_model_path(name)
        try:
            config = json.loads((path / "config.json").read_text()) if (path / "config.json").exists() else {}
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ModelError(f"{path}/config.json is not valid JSON ({exc})") from None
        if not config.get("model_type") and not (path / "adapter_config.json").exists():
            raise ModelError(f"{path}/config.json has no model_type: not a transformers model folder")
        return "local folder"
    return "hub (downloaded when training starts)"


def check_tracking(spec: JobSpec) -> None:
    import importlib.util

    for tracker in spec.tracking.report_to:
        if importlib.util.find_spec(tracker) is None:
            raise UnsupportedError(
                f"tracking.report_to includes {tracker} but the {tracker} package is not installed: "
                f"pip install 'posttrain[{tracker}]' (or remove it; tensorboard is the default)"
            )


def check_options(spec: JobSpec, warnings: list[str]) -> None:
    """Checks that need neither the model nor the data: the worker runs them before loading anything."""
    check_tracking(spec)
    method = spec.method
    training = spec.training
    if method.name == "grpo":
        from posttrain.rewards import resolve_reward_functions

        resolve_reward_functions(method.reward_functions)
        batch = training.per_device_train_batch_size * training.gradient_accumulation_steps
        if batch % method.num_generations:
            raise ConfigError(
                f"per_device_train_batch_size x gradient_accumulation_steps = {batch} must be a multiple of "
                f"method.num_generations = {method.num_generations} (each prompt's group is sampled together)",
                "training.per_device_train_batch_size",
            )
    if method.name == "dpo" and method.reference_model:
        from posttrain.data.sources import looks_like_local_path

        if looks_like_local_path(method.reference_model) and not Path(method.reference_model).expanduser().is_dir():
            raise ModelError(f"method.reference_model {method.reference_model!r} does not exist")
        if not method.use_reference_model:
            warnings.append("method.reference_model is ignored because method.use_reference_model is false")
    if spec.training.eval_steps and spec.data.validation.split_ratio is None and spec.data.validation.source is None:
        warnings.append("training.eval_steps is set but there is no validation data; no evaluation will run")


def _check_quantization(spec: JobSpec, device: str) -> None:
    if not spec.quantization.load_in_4bit:
        return
    try:
        import bitsandbytes  # noqa: F401
    except ImportError as exc:
        raise UnsupportedError(f"peft.type=qlora needs bitsandbytes, which cannot be imported: {exc}") from None
    if device == "mps":
        raise UnsupportedError("QLoRA (bitsandbytes 4-bit) does not run on MPS; use peft.type=lora")


def preflight(spec: JobSpec) -> PreflightReport:
    """Validate everything that can be checked without training. Raises PosttrainError subclasses."""
    from posttrain.data import load_training_data
    from posttrain.modeling import resolve_placement

    warnings: list[str] = []
    placement = resolve_placement(spec.model)
    _check_quantization(spec, placement.device)
    location = _check_model(spec)
    check_options(spec, warnings)
    data = load_training_data(spec.data, spec.method.name, seed=spec.training.seed)
    if len(data.train) == 0:
        raise ConfigError(f"{data.source}: no training rows left", "data.source")
    if data.skipped:
        warnings.append(f"{data.skipped} malformed rows will be skipped (data.on_bad_row=skip)")
    batch = spec.training.per_device_train_batch_size * spec.training.gradient_accumulation_steps
    steps_per_epoch = max(1, -(-len(data.train) // batch))
    total = spec.training.max_steps if spec.training.max_steps > 0 else int(
        steps_per_epoch * spec.training.num_train_epochs + 0.999
    )
    return PreflightReport(
        method=spec.method.name,
        model=spec.model.name_or_path,
        model_location=location,
        device=placement.device,
        dtype=str(placement.dtype).removeprefix("torch."),
        data_source=data.source,
        data_format=data.format,
        train_rows=len(data.train),
        eval_rows=len(data.eval) if data.eval is not None else None,
        skipped_rows=data.skipped,
        steps_per_epoch=steps_per_epoch,
        total_steps=total,
        warnings=warnings,
    )
