"""The online GRPO trainer: the worker's recipe for ``method.name: online_grpo``.

Read top to bottom: load the policy (full model or LoRA) -> attach the weight bridge -> optimizer and
schedule -> resume from the newest complete checkpoint -> register with the trajectory API -> for every
step: wait for a batch, build tensors (:mod:`posttrain.rl.grpo.rollouts`), accumulate the loss over
micro-batches (:mod:`posttrain.rl.grpo.loss`), clip gradients, step, push the new weights to the
inference server, log metrics, checkpoint -> final/.

Everything it writes follows the job-directory contract (status.json, metrics.jsonl, checkpoints with
their marker, final/), so the CLI, the job service and the dashboards read an online run like any other.
"""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass

import torch

from posttrain.eval.runner import Evaluator
from posttrain.job.context import RunContext
from posttrain.job.result import JobResult
from posttrain.modeling import Placement, load_model, load_tokenizer
from posttrain.rl.common.checkpoints import finish_run, load_training_state, resume_point, save_checkpoint
from posttrain.rl.common.evaluation import LoopEvaluation
from posttrain.rl.common.policy import attach_resumed, build_optimizer, build_policy, make_sync, served_model
from posttrain.rl.common.tracking import MetricsSinks
from posttrain.rl.grpo.loss import LossConfig, LossStats, StepCounts, policy_loss, token_logprobs
from posttrain.rl.grpo.rollouts import BadGroup, RolloutBatch, build_batch
from posttrain.rl.grpo.trajectory_client import Registration, TrajectoryAPIClient
from posttrain.spec import JobSpec, OnlineGRPOMethod

log = logging.getLogger("posttrain.worker")

API_STARTUP_TIMEOUT_S = 120.0


@dataclass
class StepResult:
    loss: float
    grad_norm: float
    stats: LossStats
    tokens: int
    seconds: float


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


def run(context: RunContext) -> JobResult:
    """Run an online_grpo job to its end (or to a stop request) and fill in its result."""
    spec, jd, stop, result, placement = context.spec, context.job_dir, context.stop, context.result, context.placement
    method: OnlineGRPOMethod = spec.method  # type: ignore[assignment]
    training = spec.training
    checkpoint, state = resume_point(jd, context.resume)

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
        # Held-out rows come from eval.data only: an online run reads no data.* section.
        evaluation = LoopEvaluation(Evaluator.for_job(spec, jd, sink=sinks.write), model, tokenizer,
                                    training.max_steps, checkpoint_now)
        evaluation.start(state.step)
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
            saved_at = evaluation.end_of_step(state.step, reward, training.save_steps, saved_at)
            if evaluation.stopped:
                return evaluation.fail(result, state.step)
        return finish_run(spec, jd, state, result, stop, saved_at, checkpoint_now, model, tokenizer, "reward_mean")
    finally:
        client.close()
        sinks.close()
        if sync is not None:
            with contextlib.suppress(Exception):
                sync.close()

