"""The online GRPO trainer: the worker's recipe for ``method.name: online_grpo``.

Read top to bottom: load the policy (full model or LoRA) -> attach the weight bridge -> optimizer and
schedule -> resume from the newest complete checkpoint -> register with the trajectory API -> for every
step: wait for a batch, build tensors (:mod:`posttrain.rl.rollouts`), accumulate the loss over
micro-batches (:mod:`posttrain.rl.grpo_loss`), clip gradients, step, push the new weights to the
inference server, log metrics, checkpoint -> final/.

Everything it writes follows the job-directory contract (status.json, metrics.jsonl, checkpoints with
their marker, final/), so the CLI, the job service and the dashboards read an online run like any other.
"""

from __future__ import annotations

import contextlib
import logging
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from posttrain.jobdir import JobDir
from posttrain.modeling import Placement, load_model, load_tokenizer, lora_config, resolve_model_path
from posttrain.rl.api_client import Registration, TrajectoryAPIClient
from posttrain.rl.checkpoints import (
    MODEL_DIR,
    finish_run,
    load_training_state,
    save_checkpoint,
    starting_point,
)
from posttrain.rl.grpo_loss import LossConfig, LossStats, StepCounts, policy_loss, token_logprobs
from posttrain.rl.rollouts import BadGroup, RolloutBatch, build_batch
from posttrain.rl.tracking import MetricsSinks
from posttrain.spec import JobSpec, OnlineGRPOMethod, PPOMethod

log = logging.getLogger("posttrain.worker")

API_STARTUP_TIMEOUT_S = 120.0


@dataclass
class StepResult:
    loss: float
    grad_norm: float
    stats: LossStats
    tokens: int
    seconds: float


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


def build_reference(spec: JobSpec, placement: Placement, policy: torch.nn.Module):
    """What computes the reference log-probs for the KL term: with LoRA the same model with its adapter
    disabled (no second copy), otherwise a frozen copy of the base model."""
    if spec.method.beta <= 0:
        return None
    if spec.peft.type != "none":
        return policy
    reference = load_model(spec, placement).to(placement.device).eval()
    reference.requires_grad_(False)
    return reference


def reference_logprobs(reference, policy: torch.nn.Module, batch: RolloutBatch) -> torch.Tensor | None:
    if reference is None:
        return None
    with torch.no_grad():
        if reference is policy:
            with policy.disable_adapter():
                return token_logprobs(policy, batch)
        return token_logprobs(reference, batch)


def served_model(spec: JobSpec, checkpoint: Path | None) -> str:
    """What a server the trainer starts itself (mode none) loads: a full run's checkpoint, else the base."""
    if checkpoint and spec.peft.type == "none":
        return str(checkpoint / MODEL_DIR)
    return resolve_model_path(spec.model.name_or_path)


def make_sync(spec: JobSpec, jd: JobDir, model_path: str):
    """The weight bridge to the inference server (posttrain.rl.weight_sync), or None when the run syncs
    nothing (online_grpo's method.sync_weights=false). PPO's server rollouts use it too."""
    method: OnlineGRPOMethod | PPOMethod = spec.method  # type: ignore[assignment]
    if isinstance(method, OnlineGRPOMethod) and not method.sync_weights:
        return None
    from posttrain.rl.weight_sync import SyncConfig, make_weight_sync

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


def train_step(model, reference, batch: RolloutBatch, micro_batch: int, loss_config: LossConfig,
               optimizer, max_grad_norm: float, sync) -> StepResult:
    """One optimizer step over ``batch``, accumulated over micro-batches of ``micro_batch`` sequences."""
    started = time.perf_counter()
    model.train()
    counts = StepCounts(sequences=batch.num_sequences, tokens=batch.num_trained_tokens)
    stats = LossStats()
    total = 0.0
    for start in range(0, batch.num_sequences, micro_batch):
        part = batch.rows(start, start + micro_batch)
        ref = reference_logprobs(reference, model, part)
        loss, part_stats = policy_loss(token_logprobs(model, part), part, loss_config, counts, ref)
        loss.backward()
        total += float(loss.detach())
        stats.add(part_stats)
    params = [p for p in model.parameters() if p.requires_grad]
    grad_norm = float(torch.nn.utils.clip_grad_norm_(params, max_grad_norm))
    if sync is not None:
        sync.before_update()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return StepResult(loss=total, grad_norm=grad_norm, stats=stats, tokens=int(batch.attention_mask.sum()),
                      seconds=time.perf_counter() - started)


def wait_for_batch(client: TrajectoryAPIClient, method: OnlineGRPOMethod, pad_id: int,
                   max_tokens: int, vocab_size: int | None = None) -> tuple[RolloutBatch | None, float]:
    """The next usable batch (groups that do not fit together are skipped with a warning), and the
    seconds spent waiting; (None, s) when a stop was requested meanwhile."""
    started = time.perf_counter()
    while True:
        groups = client.wait_for_batch(method.batch_timeout)
        if groups is None:
            return None, time.perf_counter() - started
        usable = []
        for number, group in enumerate(groups):
            try:
                build_batch([group], pad_id, max_tokens, vocab_size)
                usable.append(group)
            except BadGroup as exc:
                log.warning("skipping group %d of the batch: %s", number, exc)
        if usable:
            return build_batch(usable, pad_id, max_tokens, vocab_size), time.perf_counter() - started


def train_online(spec: JobSpec, jd: JobDir, resume: bool, stop, result, placement: Placement):
    """Run an online_grpo job to its end (or to a stop request) and fill in ``result``."""

    method: OnlineGRPOMethod = spec.method  # type: ignore[assignment]
    training = spec.training
    checkpoint, state = starting_point(jd, resume)

    tokenizer = load_tokenizer(spec)
    model = build_policy(spec, placement, checkpoint)
    reference = build_reference(spec, placement, model)
    sync = make_sync(spec, jd, served_model(spec, checkpoint))
    sinks = MetricsSinks(spec, jd)
    client = TrajectoryAPIClient(method.api_url, poll_interval=method.poll_interval, should_stop=stop.is_set)
    try:
        if sync is not None:
            model = attach_resumed(sync, model, method, checkpoint, state.step)
        optimizer, scheduler = build_optimizer(spec, model)
        if checkpoint:
            load_training_state(checkpoint, optimizer, scheduler)
        loss_config = LossConfig(loss_type=method.loss_type, clip_low=method.clip_epsilon,
                                 clip_high=method.clip_epsilon_high or method.clip_epsilon, beta=method.beta,
                                 token_budget=training.max_seq_length)
        batch_size = training.per_device_train_batch_size * training.gradient_accumulation_steps
        if client.wait_until_up(API_STARTUP_TIMEOUT_S) is None:
            result.state = stop.outcome
            return result
        client.register(Registration(
            batch_size=batch_size, max_token_len=training.max_seq_length, checkpoint_dir=str(jd.checkpoints_dir),
            save_checkpoint_interval=training.save_steps or training.max_steps, starting_step=state.step,
            num_steps=training.max_steps, wandb_group=spec.tracking.run_name or spec.name or "",
            wandb_project=spec.tracking.project or ""))
        jd.update_status(step=state.step, total_steps=training.max_steps)
        log.info("online_grpo: training steps %d..%d from %s (batch %d sequences, loss %s, sync %s)",
                 state.step + 1, training.max_steps, method.api_url, batch_size, method.loss_type,
                 method.weight_bridge_mode if sync is not None else "off")
        def checkpoint_now() -> None:
            save_checkpoint(jd, state, model, tokenizer, optimizer, scheduler, training.save_total_limit)

        saved_at = state.step
        vocab_size = model.get_input_embeddings().weight.shape[0]  # an id past it would be an IndexError
        while state.step < training.max_steps and not stop.is_set():
            batch, waited = wait_for_batch(client, method, tokenizer.pad_token_id, training.max_seq_length,
                                           vocab_size)
            if batch is None:
                break
            lr = scheduler.get_last_lr()[0]
            step = train_step(model, reference, batch, training.per_device_train_batch_size, loss_config,
                              optimizer, training.max_grad_norm, sync)
            scheduler.step()
            state.step += 1
            assert client.registration is not None
            client.registration.starting_step = state.step  # what a restarted API is told on re-registering
            sync_seconds = sync.after_update(model, state.step) if sync is not None else 0.0
            reward = float(batch.scores.mean())
            state.rewards.append(reward)
            record = {"step": state.step, "time": time.time(), "loss": step.loss, "lr": lr,
                      "grad_norm": step.grad_norm, "reward_mean": reward,
                      "reward_std": float(batch.scores.std(unbiased=False)),
                      **step.stats.means(), "sync_seconds": sync_seconds,
                      "tokens_per_second": step.tokens / step.seconds if step.seconds > 0 else None,
                      "sequences": batch.num_sequences, "trained_tokens": batch.num_trained_tokens}
            if method.benchmark:
                record.update({"step_seconds": step.seconds, "wait_seconds": waited})
            if state.step % training.logging_steps == 0 or state.step == training.max_steps:
                sinks.write(record)
            jd.update_status(step=state.step, total_steps=training.max_steps)
            log.info("step %d/%d loss=%.4g reward_mean=%.3g mean_ratio=%.3g clipped=%.3g sync=%.3gs",
                     state.step, training.max_steps, step.loss, reward, record["mean_ratio"],
                     record["clipped_fraction"], sync_seconds)
            result.final_loss, result.tokens_per_s = step.loss, record["tokens_per_second"]
            if training.save_steps and state.step % training.save_steps == 0 and state.step < training.max_steps:
                checkpoint_now()
                saved_at = state.step
        return finish_run(spec, jd, state, result, stop, saved_at, checkpoint_now, model, tokenizer, "reward_mean")
    finally:
        client.close()
        sinks.close()
        if sync is not None:
            with contextlib.suppress(Exception):
                sync.close()

