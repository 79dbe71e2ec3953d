"""What every recipe shares: TrainingArguments built from the JobSpec, and the loaded model."""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from typing import Any

import torch
from trl.data_utils import is_conversational

from posttrain.data import PreparedData
from posttrain.job.directory import JobDir
from posttrain.modeling import Placement, ensure_chat_template
from posttrain.spec import JobSpec

# Above this size, activation memory starts to matter on a GPU; below it, recomputation only costs time.
CHECKPOINTING_MIN_PARAMS = 1_000_000_000
# Below this size, compiling the layers takes longer than it saves over a typical run (see use_compile).
COMPILE_MIN_PARAMS = 50_000_000


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


def use_compile(spec: JobSpec, placement: Placement, num_params: int, samples_from_it: bool = False) -> bool:
    """Whether to compile the decoder layers (``training.compile``).

    auto: on a CPU with native bf16 (AVX512-BF16 or AMX), one process, for models of COMPILE_MIN_PARAMS or
    more, where a C++ compiler is found (inductor builds its CPU kernels with it). There, bf16 matmuls are fast
    and a step is dominated by elementwise work (dtype casts under autocast, RMSNorm, RoPE, SiLU, softmax) that
    inductor fuses: a SmolLM2-135M LoRA step took 1.7x less CPU time compiled (bench/README.md). Compiling
    costs ~30-80 s once per process (less with inductor's on-disk cache), which a small model's short steps
    never pay back. AVX2-only CPUs run fp32 and were not measured: off there. ``samples_from_it``: the trainer
    also generates with this model (GRPO without the engine's rollouts).
    """
    setting = spec.training.compile
    if setting != "auto":
        return bool(setting)
    # A model that also samples (GRPO through TRL's own loop, with a KV cache) would recompile for its decode steps.
    return (placement.device == "cpu" and cpu_bf16_autocast(spec, placement) and num_params >= COMPILE_MIN_PARAMS
            and spec.distributed.launcher != "torchrun" and not samples_from_it and c_compiler_found())


def c_compiler_found() -> bool:
    return any(shutil.which(name) for name in (os.environ.get("CXX") or "g++", "c++", "clang++"))


def compile_decoder_layers(model: Any) -> int:
    """Compile every decoder layer of ``model`` (a transformers model, PEFT-wrapped or not) in place; returns
    how many. The layers are the classes transformers keeps whole when splitting a model (``_no_split_modules``):
    they share one forward, so inductor compiles one graph that all of them reuse. ``dynamic=True`` makes that
    graph take any sequence length, instead of a recompile for the second length seen and a dynamic one after.
    Parameter names and the saved weights are unchanged (the modules are compiled, not wrapped)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    layer_classes = set(getattr(base, "_no_split_modules", None) or ())
    count = 0
    for module in base.modules():
        if type(module).__name__ in layer_classes:
            module.compile(dynamic=True)
            count += 1
    return count


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


# Config attributes by which a model scales or caps its logits; TRL's fused head honours them, ours does not.
LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "output_multiplier", "lm_head_multiplier",
                    "logits_scaling")


def use_selected_log_probs(model: Any, temperature: float = 1.0, extras: tuple[str, ...] = ()) -> bool:
    """On CPU, score only the labelled positions where TRL's DPO and GRPO trainers call their fused LM head.

    TRL 1.16 patches the model so that ``model(..., labels=..., fused_lm_head=True)`` returns per-token
    log-probabilities; off Triton devices its kernel projects every position (prompt and padding too) through
    the LM head and projects them again in the backward. This wraps that patched forward: the same call runs
    the backbone, then :func:`posttrain.losses.selected_log_probs` on the labelled positions only (DPO: the
    completions; GRPO: the completion tokens), and returns TRL's own output type with zeros elsewhere, as TRL's
    does. ``extras`` are the non-differentiable per-token fields the trainer reads (entropy, mean_logits,
    is_top1). A model whose head is not a plain projection keeps TRL's kernel. Returns whether it applied.
    """
    from trl.trainer.utils import FusedCausalLMOutput

    from posttrain.losses import selected_log_probs

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    text_config = base.config.get_text_config()
    head = base.get_output_embeddings()
    if any(getattr(text_config, name, None) is not None for name in LOGIT_TRANSFORMS) or head is None \
            or getattr(head, "bias", None) is not None or "forward" not in vars(base):
        return False
    trl_forward = base.forward  # TRL's patched forward: the fallback, and the path without fused_lm_head

    def forward(*args: Any, fused_lm_head: bool = False, labels: Any = None, shift_labels: Any = None,
                num_items_in_batch: Any = None, **kwargs: Any) -> Any:
        if not fused_lm_head or shift_labels is not None or kwargs.get("output_router_logits"):
            return trl_forward(*args, fused_lm_head=fused_lm_head, labels=labels, shift_labels=shift_labels,
                               num_items_in_batch=num_items_in_batch, **kwargs)
        kwargs["use_cache"] = False
        hidden = base.base_model(*args, **kwargs).last_hidden_state[:, :-1]
        targets = labels[:, 1:]
        mask = targets != -100
        weight = base.get_output_embeddings().weight
        logps, more = selected_log_probs(hidden[mask], weight, targets[mask], temperature, extras)
        # masked_scatter keeps an all-masked micro-batch connected to the graph (a zero with a gradient), as TRL does.
        per_token = {name: torch.zeros(mask.shape, dtype=value.dtype, device=mask.device).masked_scatter(mask, value)
                     for name, value in {"log_probs": logps, **more}.items()}
        count = mask.sum().clamp(min=1) if num_items_in_batch is None else num_items_in_batch
        return FusedCausalLMOutput(loss=-per_token["log_probs"].sum() / count, label_mask=mask, **per_token)

    base.forward = forward
    return True
