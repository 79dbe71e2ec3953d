"""What the online GRPO and the PPO trainer share: the policy they train (full model or LoRA, from the base
or a checkpoint), its optimizer and schedule, and the weight bridge that keeps an inference server on it."""

from __future__ import annotations

import logging
import math
import sys
from pathlib import Path

import torch

from posttrain.job.directory import JobDir
from posttrain.modeling import Placement, load_model, lora_config, resolve_model_path
from posttrain.rl.common.checkpoints import MODEL_DIR
from posttrain.spec import JobSpec, OnlineGRPOMethod, PPOMethod

log = logging.getLogger("posttrain.worker")


def build_policy(spec: JobSpec, placement: Placement, checkpoint: Path | None) -> torch.nn.Module:
    """The model to train: the base (or a checkpoint's full model), with a trainable LoRA adapter
    (a checkpoint's, when resuming) when peft.type is not none."""
    full_from_checkpoint = checkpoint is not None and spec.peft.type == "none"
    name = str(checkpoint / MODEL_DIR) if full_from_checkpoint else None
    model = load_model(spec, placement, name=name)
    if spec.peft.type != "none":
        from peft import PeftModel, get_peft_model

        if checkpoint is not None:
            model = PeftModel.from_pretrained(model, checkpoint / MODEL_DIR, is_trainable=True)
        else:
            model = get_peft_model(model, lora_config(spec))
    return model.to(placement.device)


def served_model(spec: JobSpec, checkpoint: Path | None) -> str:
    """What a server the trainer starts itself (mode none) loads: a full run's checkpoint, else the base."""
    if checkpoint and spec.peft.type == "none":
        return str(checkpoint / MODEL_DIR)
    return resolve_model_path(spec.model.name_or_path)


def make_sync(spec: JobSpec, jd: JobDir, model_path: str):
    """The weight bridge to the inference server (posttrain.weight_sync.strategies), or None when the run syncs
    nothing (online_grpo's method.sync_weights=false). PPO's server rollouts use it too."""
    method: OnlineGRPOMethod | PPOMethod = spec.method  # type: ignore[assignment]
    if isinstance(method, OnlineGRPOMethod) and not method.sync_weights:
        return None
    from posttrain.weight_sync.strategies import SyncConfig, make_weight_sync

    host, port = method.inference_host, method.inference_port
    # In `none` mode the trainer runs its own server, as the seed's trainer runs its own vLLM.
    command = [sys.executable, "-m", "posttrain.cli", "rl", "serve-inference", "--model", model_path,
               "--host", host, "--port", str(port)]
    return make_weight_sync(SyncConfig(
        mode=method.weight_bridge_mode, server_url=f"http://{host}:{port}",
        save_dir=Path(method.sync_dir) if method.sync_dir else jd.root / "sync",
        restart_interval=method.restart_interval,
        server_command=command if method.weight_bridge_mode == "none" else None,
        server_log=jd.root / "inference-server.log",
    ))


def attach_resumed(sync, model: torch.nn.Module, method: OnlineGRPOMethod | PPOMethod, checkpoint: Path | None,
                   step: int) -> torch.nn.Module:
    """Attach the weight bridge; a resumed run then pushes its checkpoint's weights at once, so the first
    rollouts after a resume come from the resumed policy, not from whatever the server held. (In none mode
    the server was started on the checkpoint itself.) shared_vllm adopts the server's buffer on attach, so
    the checkpoint's values are copied into it while generation is paused."""
    resumed = checkpoint is not None and method.weight_bridge_mode != "none"
    shared = resumed and method.weight_bridge_mode == "shared_vllm"
    snapshot = {name: p.detach().clone() for name, p in model.named_parameters()} if shared else None
    model = sync.attach(model)
    if resumed:
        sync.before_update()
        if snapshot is not None:
            with torch.no_grad():
                for name, param in model.named_parameters():
                    param.copy_(snapshot[name])
        seconds = sync.after_update(model, step)
        log.info("pushed the resumed weights of step %d to the inference server (%.3g s)", step, seconds)
    return model


def build_optimizer(spec: JobSpec, model: torch.nn.Module):
    from transformers import get_scheduler

    training = spec.training
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=training.learning_rate, weight_decay=training.weight_decay)
    warmup = training.warmup_steps or math.ceil(training.warmup_ratio * training.max_steps)
    scheduler = get_scheduler(training.lr_scheduler_type, optimizer, num_warmup_steps=warmup,
                              num_training_steps=training.max_steps)
    return optimizer, scheduler


