"""What every recipe shares: TrainingArguments built from the JobSpec, and the loaded model."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from trl.data_utils import is_conversational

from posttrain.data import PreparedData
from posttrain.job.directory import JobDir
from posttrain.modeling import Placement, ensure_chat_template
from posttrain.spec import JobSpec

# Above this size, activation memory starts to matter on a GPU; below it, recomputation only costs time.
CHECKPOINTING_MIN_PARAMS = 1_000_000_000


@dataclass
class RecipeInputs:
    """Everything a recipe needs to build its trainer; the worker assembles it."""

    spec: JobSpec
    job_dir: JobDir
    placement: Placement
    data: PreparedData
    tokenizer: Any
    callbacks: list[Any]
    # Steps between the trainer's own evaluations of data.eval (TRL's loop; the job's Evaluator adds to them);
    # None: the trainer does not evaluate.
    eval_steps: int | None = None


def cpu_bf16_autocast(spec: JobSpec, placement: Placement) -> bool:
    """Whether ``model.dtype=auto`` on a CPU should train fp32 weights under bf16 autocast (every method).

    Only CPUs with native bf16 instructions (AVX512-BF16 or AMX) qualify: there, bf16 autocast trained
    a hidden-256 Llama ~1.4-2x faster than fp32 at the same loss (bench/sft_throughput.py), while AVX2-only
    CPUs emulate bf16 and run it several times slower than fp32. 4-bit (QLoRA) runs keep their own
    compute dtype.
    """
    if spec.model.dtype != "auto" or placement.device != "cpu" or spec.quantization.load_in_4bit:
        return False
    import torch

    return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())


def use_gradient_checkpointing(spec: JobSpec, placement: Placement, num_params: int) -> bool:
    setting = spec.training.gradient_checkpointing
    if setting != "auto":
        return bool(setting)
    # On CPU, checkpointing was measured several times slower for no benefit (memory is plentiful).
    return placement.device == "cuda" and num_params >= CHECKPOINTING_MIN_PARAMS


def ddp_precision(spec: JobSpec) -> str:
    """distributed.mixed_precision of a torchrun DDP run: the Trainer's autocast (FSDP2 has its own policy)."""
    dist = spec.distributed
    return dist.mixed_precision if dist.launcher == "torchrun" and dist.strategy == "ddp" else "no"


def training_arguments(inputs: RecipeInputs, num_params: int) -> dict[str, Any]:
    """Keyword arguments shared by SFTConfig / DPOConfig / RewardConfig / GRPOConfig."""
    spec, placement = inputs.spec, inputs.placement
    training = spec.training
    has_eval = inputs.eval_steps is not None and inputs.data.eval is not None
    checkpointing = use_gradient_checkpointing(spec, placement, num_params)
    autocast = cpu_bf16_autocast(spec, placement)
    # In metrics.jsonl "dtype" stays the weights' dtype; "autocast" says the matmuls ran in bf16.
    record_settings(inputs, autocast="bf16" if autocast else None)
    kwargs: dict[str, Any] = {
        "output_dir": str(inputs.job_dir.checkpoints_dir),
        "num_train_epochs": training.num_train_epochs,
        "max_steps": training.max_steps,
        "learning_rate": training.learning_rate,
        "lr_scheduler_type": training.lr_scheduler_type,
        "warmup_steps": training.warmup_steps if training.warmup_steps > 0 else training.warmup_ratio,
        "weight_decay": training.weight_decay,
        "max_grad_norm": training.max_grad_norm,
        "optim": training.optim,
        "per_device_train_batch_size": training.per_device_train_batch_size,
        "per_device_eval_batch_size": training.per_device_eval_batch_size,
        "gradient_accumulation_steps": training.gradient_accumulation_steps,
        "activation_checkpointing": checkpointing,
        "seed": training.seed,
        "data_seed": training.seed,
        "logging_strategy": "steps",
        "logging_steps": training.logging_steps,
        "logging_first_step": True,
        "eval_strategy": "steps" if has_eval else "no",
        "eval_steps": inputs.eval_steps if has_eval else None,
        "save_strategy": "steps" if training.save_steps else "epoch",
        "save_steps": training.save_steps or 500,
        "save_total_limit": training.save_total_limit,
        "report_to": list(spec.tracking.report_to),
        "run_name": spec.tracking.run_name or spec.name,
        "bf16": placement.mixed_precision == "bf16" or autocast or ddp_precision(spec) == "bf16",
        "fp16": placement.mixed_precision == "fp16" or ddp_precision(spec) == "fp16",
        "use_cpu": placement.device == "cpu",
        "dataloader_num_workers": training.dataloader_num_workers,
        # DDP's search for unused parameters costs a graph walk per step; every trained parameter is used.
        "ddp_find_unused_parameters": False if spec.distributed.launcher == "torchrun" else None,
        # Our own progress display and metrics writer replace tqdm and the log printer.
        "disable_tqdm": True,
        # GRPO counts prompt + completion tokens itself; the Trainer's counter cannot see its inputs.
        "include_num_input_tokens_seen": "no" if spec.method.name == "grpo" else "non_padding",
    }
    if checkpointing:
        kwargs["activation_checkpointing_kwargs"] = {"use_reentrant": False}
    if spec.tracking.project:
        kwargs["project"] = spec.tracking.project
    return kwargs


def shared_trainer_arguments(inputs: RecipeInputs) -> dict[str, Any]:
    """The trainer arguments every method passes the same way: data, tokenizer, callbacks.

    Conversational rows need a chat template; a tokenizer without one gets a ChatML template here.
    """
    if is_conversational(inputs.data.train[0]):
        ensure_chat_template(inputs.tokenizer)
    return {
        "train_dataset": inputs.data.train,
        "eval_dataset": inputs.data.eval if inputs.eval_steps is not None else None,
        "processing_class": inputs.tokenizer,
        "callbacks": inputs.callbacks,
    }


def record_settings(inputs: RecipeInputs, **settings: object) -> None:
    """Add the chosen settings to every metrics.jsonl record (the worker's metrics callback has ``extra``)."""
    for callback in inputs.callbacks:
        extra = getattr(callback, "extra", None)
        if isinstance(extra, dict):
            extra.update(settings)
