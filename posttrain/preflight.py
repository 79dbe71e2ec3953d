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


def _check_model(spec: JobSpec) -> str:
    from posttrain.data.sources import is_local_path
    from posttrain.embedded import EMBEDDED_MODEL_NAMES, SMOLLM2_MODEL_NAME, smollm2_gguf_path
    from posttrain.modeling import resolve_model_path

    name = spec.model.name_or_path
    if name in EMBEDDED_MODEL_NAMES:
        if name == SMOLLM2_MODEL_NAME:
            smollm2_gguf_path()  # names the missing package; the conversion itself waits for the worker
        return "embedded"
    path = Path(name).expanduser()
    if is_local_path(name):
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


def check_options(spec: JobSpec, warnings: list[str], *, import_rewards: bool = False) -> None:
    """Checks that need neither the model nor the data: the worker runs them before loading anything
    (with ``import_rewards``, so a missing reward module fails before the model loads)."""
    check_tracking(spec)
    method = spec.method
    training = spec.training
    if method.name == "grpo":
        from posttrain.rewards import check_reward_names, resolve_reward_functions

        if not method.reward_functions and method.graders:
            pass  # graders alone are the rewards (checked with the spec)
        elif import_rewards:
            resolve_reward_functions(method.reward_functions)
        else:  # importing a 'module:function' reward runs its code
            check_reward_names(method.reward_functions)
        batch = training.per_device_train_batch_size * training.gradient_accumulation_steps
        if batch % method.num_generations:
            raise ConfigError(
                f"per_device_train_batch_size x gradient_accumulation_steps = {batch} must be a multiple of "
                f"method.num_generations = {method.num_generations} (each prompt's group is sampled together)",
                "training.per_device_train_batch_size",
            )
    if method.name == "dpo" and method.reference_model:
        from posttrain.data.sources import is_local_path

        if is_local_path(method.reference_model) and not Path(method.reference_model).expanduser().is_dir():
            raise ModelError(f"method.reference_model {method.reference_model!r} does not exist")
        if not method.use_reference_model:
            warnings.append("method.reference_model is ignored because method.use_reference_model is false")
    if training.tokens_per_batch is not None and method.name != "sft":
        raise ConfigError(
            f"token-budget batches are implemented for sft only, not {method.name} (its loss averages over "
            "pairs or groups, not tokens); set training.per_device_train_batch_size instead",
            "training.tokens_per_batch",
        )
    if training.tokens_per_batch is not None and training.max_steps <= 0:
        warnings.append("with training.tokens_per_batch an epoch's step count depends on the rows' lengths "
                        "(posttrain validate's estimate assumes per_device_train_batch_size rows per batch)")
    if method.name == "ppo":
        from posttrain.data.sources import is_local_path

        for key in ("reward_model", "critic_model"):
            name = getattr(method, key)
            if name and is_local_path(name) and not Path(name).expanduser().is_dir():
                raise ModelError(f"method.{key} {name!r} does not exist (expected a reward job's final/ or a "
                                 "sequence-classification model folder)")
    check_eval(spec, warnings)


def has_held_out_rows(spec: JobSpec) -> bool:
    """Whether the job has rows to evaluate on: eval.data, or data.validation (online_grpo reads no data.*)."""
    if spec.eval.data is not None:
        return True
    validation = spec.data.validation
    return spec.method.name != "online_grpo" and (validation.source is not None or validation.split_ratio is not None)


def check_eval(spec: JobSpec, warnings: list[str]) -> None:
    """The eval section asks only for what the job can evaluate (see posttrain.eval)."""
    evaluation = spec.eval
    held_out = has_held_out_rows(spec)
    if not held_out and evaluation.regression is None:
        asked = [key for key in ("graders", "select_best", "every_steps", "max_samples")
                 if key in evaluation.model_fields_set and getattr(evaluation, key)]
        if asked or evaluation.at_start or evaluation.stop_on_divergence:
            raise ConfigError("eval: there are no rows to evaluate on; set eval.data (or data.validation, or an "
                              "eval.regression set)", f"eval.{asked[0] if asked else 'data'}")
        if spec.training.eval_steps:
            warnings.append("training.eval_steps is set but there is no validation data; no evaluation will run")
        return
    if evaluation.regression is not None and not held_out and evaluation.graders:
        raise ConfigError("eval.graders score held-out rows, and there are none (only eval.regression); set "
                          "eval.data or data.validation", "eval.graders")
    if evaluation.stop_on_divergence and spec.method.name not in ("grpo", "online_grpo", "ppo"):
        raise ConfigError(f"eval.stop_on_divergence guards reinforcement methods (grpo, online_grpo, ppo), not "
                          f"{spec.method.name}", "eval.stop_on_divergence")
    if evaluation.stop_on_divergence and not evaluation.graders and evaluation.divergence_metric is None:
        raise ConfigError("eval.stop_on_divergence watches a held-out metric: add eval.graders independent of "
                          "the training reward (or set eval.divergence_metric)", "eval.stop_on_divergence")


def _check_quantization(spec: JobSpec, device: str) -> None:
    if not spec.quantization.load_in_4bit:
        return
    try:
        import bitsandbytes  # noqa: F401
    except ImportError as exc:
        raise UnsupportedError(f"peft.type=qlora needs bitsandbytes, which cannot be imported: {exc}") from None
    if device == "mps":
        raise UnsupportedError("QLoRA (bitsandbytes 4-bit) does not run on MPS; use peft.type=lora")


@dataclass(frozen=True)
class DataBudget:
    """How much of a dataset a bounded check may read (the service's submit-time check): the first
    ``rows`` rows of each local source, no hub downloads, and no ``.json`` list file over ``json_bytes``
    (a JSON list is parsed whole before its first row). What is not read here, the worker checks."""

    rows: int = 2000
    json_bytes: int = 32 * 1024 * 1024


def data_within_budget(source: str, budget: DataBudget) -> bool:
    """Whether a bounded check can read ``source``: bundled samples and local files and folders, except
    large ``.json`` list files; never a hub id (that would download it)."""
    from posttrain.data.sources import BUNDLED_PREFIX, is_local_path

    if source.startswith(BUNDLED_PREFIX):
        return True
    if not is_local_path(source):
        return False
    path = Path(source).expanduser()
    files = [path] if path.is_file() else sorted(path.glob("*.json")) if path.is_dir() else []
    return all(file.suffix.lower() != ".json" or file.stat().st_size <= budget.json_bytes for file in files)


def preflight(spec: JobSpec, *, import_rewards: bool = True, budget: DataBudget | None = None) -> PreflightReport:
    """Validate everything that can be checked without training. Raises PosttrainError subclasses.

    With a ``budget`` (the service), reward modules are not imported and only a bounded sample of the
    data is read: row counts and steps then describe that sample.
    """
    from posttrain.data import load_training_data
    from posttrain.modeling import resolve_placement

    warnings: list[str] = []
    placement = resolve_placement(spec.model)
    _check_quantization(spec, placement.device)
    location = _check_model(spec)
    check_options(spec, warnings, import_rewards=import_rewards and budget is None)
    if spec.method.name == "online_grpo":  # no data section: environments send rollouts to its trajectory API
        return _report(spec, location, placement, warnings)
    data_spec = spec.data
    if budget is not None:
        sources = [spec.data.source, spec.data.validation.source]
        if not all(data_within_budget(source, budget) for source in sources if source is not None):
            return _report(spec, location, placement, [*warnings, "data not checked here (hub or large file)"])
        data_spec = spec.data.model_copy(update={"max_samples": min(spec.data.max_samples or budget.rows,
                                                                    budget.rows)})
    data = load_training_data(data_spec, spec.method.name, seed=spec.training.seed,
                              validation_limit=budget.rows if budget is not None else None)
    if len(data.train) == 0:
        raise ConfigError(f"{data.source}: no training rows left", "data.source")
    if data.skipped:
        warnings.append(f"{data.skipped} malformed rows will be skipped (data.on_bad_row=skip)")
    return _report(spec, location, placement, warnings, data)


def _report(spec: JobSpec, location: str, placement, warnings: list[str], data=None) -> PreflightReport:
    train_rows = len(data.train) if data is not None else 0
    batch = spec.training.per_device_train_batch_size * spec.training.gradient_accumulation_steps
    if spec.method.name == "ppo":  # one PPO step samples every mini-batch's prompts
        batch *= spec.method.num_mini_batches
    steps_per_epoch = max(1, -(-train_rows // batch))
    total = spec.training.max_steps if spec.training.max_steps > 0 else int(
        steps_per_epoch * spec.training.num_train_epochs + 0.999
    )
    return PreflightReport(
        method=spec.method.name,
        model=spec.model.name_or_path,
        model_location=location,
        device=placement.device,
        dtype=str(placement.dtype).removeprefix("torch."),
        data_source=spec.data.source,
        data_format=data.format if data is not None else "unchecked",
        train_rows=train_rows,
        eval_rows=len(data.eval) if data is not None and data.eval is not None else None,
        skipped_rows=data.skipped if data is not None else 0,
        steps_per_epoch=steps_per_epoch,
        total_steps=total,
        warnings=warnings,
    )
