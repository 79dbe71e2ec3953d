"""The PPO trainer: the worker's recipe for ``method.name: ppo`` (classic RLHF with a reward model and a critic).

Read top to bottom: load the actor (full or LoRA; the shared :func:`~posttrain.rl.common.policy.build_policy`), the reference
(the actor's base: with LoRA the adapter switched off, no second copy), the frozen reward model and the
critic -> one AdamW + schedule each -> resume from the newest complete checkpoint -> for every step:

1. take the next prompts, sample one answer each (:mod:`posttrain.rl.ppo.rollouts`): in-process, or from an
   inference server kept on the actor's weights by the online trainer's weight bridge;
2. score prompt + answer with the reward model, minus the EOS / length penalties;
3. with no gradients: the actor's and the reference's log-probs and the critic's values of the answer
   tokens; per-token rewards = -kl_coef x KL (+ score on the last token); GAE; whitening;
4. ``ppo_epochs`` passes over shuffled mini-batches: clipped policy loss on the actor, clipped value loss on
   the critic, gradient accumulation over micro-batches, gradient clipping, one step of each optimizer;
5. push the new actor weights to the server (rollout_backend=server), the adaptive KL controller, metrics,
   checkpoints -> final/ (the actor).

By default rollouts need no inference server: the actor samples through the online stack's batched generation
in the trainer's own process, so no weights have to be synced. With ``rollout_backend: server`` the weight
bridge is the online GRPO trainer's own (:func:`posttrain.rl.common.policy.make_sync`), attached the same way.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from posttrain.eval.runner import Evaluator
from posttrain.job.context import RunContext
from posttrain.job.directory import atomic_write_json
from posttrain.job.result import JobResult
from posttrain.modeling import Placement, load_model, load_tokenizer, render_scored
from posttrain.rl.common.checkpoints import finish_run, load_training_state, resume_point, save_checkpoint
from posttrain.rl.common.evaluation import LoopEvaluation
from posttrain.rl.common.policy import attach_resumed, build_optimizer, build_policy, make_sync, served_model
from posttrain.rl.common.tracking import MetricsSinks
from posttrain.rl.ppo import loss as ppo_loss
from posttrain.rl.ppo.models import (
    CRITIC_DIR,
    RewardModel,
    build_critic,
    load_reward_model,
    response_logprobs,
    token_values,
)
from posttrain.rl.ppo.rollouts import (
    PromptStream,
    Rollouts,
    Sampler,
    inprocess_sampler,
    sample_rollouts,
)
from posttrain.rl.ppo.server_sampler import ServerSampler
from posttrain.spec import JobSpec, PPOMethod

log = logging.getLogger("posttrain.worker")

PPO_STATE_FILE = "ppo_state.json"


@dataclass
class Scored:
    """What the update trains on, all [B, R] except the per-sequence scores."""

    logprobs: torch.Tensor
    values: torch.Tensor
    advantages: torch.Tensor
    returns: torch.Tensor
    scores: torch.Tensor  # the reward model's raw score
    penalised: torch.Tensor  # the score after clipping and EOS / length penalties
    kl: torch.Tensor  # per-token KL estimate (as in the reward)
    entropy: torch.Tensor


@dataclass
class UpdateStats:
    policy_loss: list[float] = field(default_factory=list)
    value_loss: list[float] = field(default_factory=list)
    policy_clip: list[float] = field(default_factory=list)
    value_clip: list[float] = field(default_factory=list)
    approx_kl: list[float] = field(default_factory=list)
    grad_norm: list[float] = field(default_factory=list)
    critic_grad_norm: list[float] = field(default_factory=list)

    def means(self) -> dict[str, float]:
        def mean(values: list[float]) -> float:
            return sum(values) / len(values) if values else float("nan")

        return {"policy_loss": mean(self.policy_loss), "value_loss": mean(self.value_loss),
                "policy_clip_fraction": mean(self.policy_clip), "value_clip_fraction": mean(self.value_clip),
                "approx_kl": mean(self.approx_kl), "grad_norm": mean(self.grad_norm),
                "critic_grad_norm": mean(self.critic_grad_norm)}


def build_reference(spec: JobSpec, placement: Placement, actor: torch.nn.Module):
    """The KL reference: with LoRA the actor itself (its adapter disabled while it runs), otherwise a frozen
    copy of the base model."""
    if spec.peft.type != "none":
        return actor
    reference = load_model(spec, placement).to(placement.device).eval()
    return reference.requires_grad_(False)


def reference_logprobs(reference, actor, rows: dict[str, torch.Tensor], context_length: int,
                       temperature: float) -> torch.Tensor:
    if reference is actor:
        with actor.disable_adapter():
            return response_logprobs(actor, **rows, context_length=context_length, temperature=temperature)[0]
    return response_logprobs(reference, **rows, context_length=context_length, temperature=temperature)[0]


def score_answers(reward: RewardModel, rollouts: Rollouts, method: PPOMethod, max_length: int,
                  batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(raw reward-model scores, scores after clipping and the EOS / length penalties)."""
    texts = [render_scored(reward.tokenizer, prompt, answer) for prompt, answer in zip(rollouts.prompts,
                                                                                        rollouts.texts, strict=True)]
    raw = reward.score(texts, max_length, batch_size)
    scores = raw.clone()
    if method.reward_clip is not None:
        scores = scores.clamp(-method.reward_clip, method.reward_clip)
    if method.missing_eos_penalty is not None:
        scores = scores - method.missing_eos_penalty * (~rollouts.ended).float()
    if method.length_penalty:
        scores = scores - method.length_penalty * rollouts.mask.sum(dim=1).cpu()
    return raw, scores


@torch.no_grad()
def evaluate_rollouts(actor, reference, critic, reward: RewardModel, rollouts: Rollouts, method: PPOMethod,
                      kl_coef: float, max_length: int, micro: int) -> Scored:
    """Old log-probs, reference log-probs, values, rewards with the KL penalty, advantages and returns."""
    parts: dict[str, list[torch.Tensor]] = {"logprobs": [], "entropy": [], "ref": [], "values": []}
    context = rollouts.context_length
    for start in range(0, rollouts.size, micro):
        rows = rollouts.rows(torch.arange(start, min(start + micro, rollouts.size)))
        logprobs, entropy = response_logprobs(actor, **rows, context_length=context,
                                              temperature=method.temperature, with_entropy=True)
        parts["logprobs"].append(logprobs)
        parts["entropy"].append(entropy)
        parts["ref"].append(reference_logprobs(reference, actor, rows, context, method.temperature))
        # The value of the state before each answer token: the head's output one position earlier.
        parts["values"].append(token_values(critic, **rows)[:, context - 1:-1])
    logprobs, entropy, ref, values = (torch.cat(parts[k]) for k in ("logprobs", "entropy", "ref", "values"))
    mask = rollouts.mask
    raw, scores = score_answers(reward, rollouts, method, max_length, micro)
    device = logprobs.device
    kl = ppo_loss.token_kl(logprobs, ref, method.kl_estimator) * mask
    rewards = ppo_loss.shaped_rewards(scores.to(device), kl, mask, kl_coef)
    if method.whiten_rewards:
        rewards = ppo_loss.masked_whiten(rewards, mask, shift_mean=False)
    values = values * mask
    advantages, returns = ppo_loss.gae(rewards, values, mask, method.gamma, method.lam)
    if method.whiten_advantages:
        advantages = ppo_loss.masked_whiten(advantages, mask)
    return Scored(logprobs, values, advantages, returns, raw, scores, kl, entropy)


def ppo_update(actor, critic, actor_optimizer, critic_optimizer, rollouts: Rollouts, scored: Scored,
               method: PPOMethod, mini_batch: int, micro: int, max_grad_norm: float) -> UpdateStats:
    """``ppo_epochs`` passes over the rollouts in shuffled mini-batches; one step of each optimizer per
    mini-batch, gradients accumulated over its micro-batches."""
    stats = UpdateStats()
    actor_params = [p for p in actor.parameters() if p.requires_grad]
    critic_params = [p for p in critic.parameters() if p.requires_grad]
    context = rollouts.context_length
    for _epoch in range(method.ppo_epochs):
        order = torch.randperm(rollouts.size)
        for start in range(0, rollouts.size, mini_batch):
            batch = order[start:start + mini_batch]
            for micro_start in range(0, len(batch), micro):
                index = batch[micro_start:micro_start + micro]
                share = len(index) / len(batch)
                mask = rollouts.mask[index]
                logprobs, _ = response_logprobs(actor, **rollouts.rows(index), context_length=context,
                                                temperature=method.temperature)
                policy = ppo_loss.policy_loss(logprobs, scored.logprobs[index], scored.advantages[index], mask,
                                              method.cliprange)
                (policy.loss * share).backward()
                values = token_values(critic, **rollouts.rows(index))[:, context - 1:-1]
                value = ppo_loss.value_loss(values, scored.values[index], scored.returns[index], mask,
                                            method.cliprange_value)
                (method.vf_coef * value.loss * share).backward()
                stats.policy_loss.append(float(policy.loss.detach()))
                stats.value_loss.append(float(value.loss.detach()))
                stats.policy_clip.append(policy.clip_fraction)
                stats.value_clip.append(value.clip_fraction)
                with torch.no_grad():
                    log_ratio = (logprobs - scored.logprobs[index]) * mask
                    stats.approx_kl.append(float(0.5 * (log_ratio ** 2).sum() / mask.sum().clamp_min(1)))
            stats.grad_norm.append(float(torch.nn.utils.clip_grad_norm_(actor_params, max_grad_norm)))
            stats.critic_grad_norm.append(float(torch.nn.utils.clip_grad_norm_(critic_params, max_grad_norm)))
            actor_optimizer.step()
            critic_optimizer.step()
            actor_optimizer.zero_grad(set_to_none=True)
            critic_optimizer.zero_grad(set_to_none=True)
    return stats


def step_metrics(step: int, rollouts: Rollouts, scored: Scored, stats: UpdateStats, kl_coef: float, lr: float,
                 update_tokens: int, update_seconds: float, sync_seconds: float) -> dict:
    mask = rollouts.mask
    kl_per_sequence = (scored.kl * mask).sum(dim=1)
    lengths = mask.sum(dim=1)
    return {
        "step": step, "time": time.time(), "lr": lr, "kl_coef": kl_coef,
        "reward": float(scored.scores.mean()),
        "reward_std": float(scored.scores.std(unbiased=False)),
        "reward_with_kl": float((scored.penalised.to(kl_per_sequence.device) - kl_coef * kl_per_sequence).mean()),
        "kl": float(kl_per_sequence.mean()),
        **stats.means(),
        "explained_variance": ppo_loss.explained_variance(scored.values, scored.returns, mask),
        "entropy": float(ppo_loss.masked_mean(scored.entropy, mask)),
        "response_length": float(lengths.mean()),
        "eos_fraction": float(rollouts.ended.float().mean()),
        "generation_tokens_per_s": rollouts.generated_tokens / max(rollouts.generation_seconds, 1e-9),
        "tokens_per_s": update_tokens / max(update_seconds, 1e-9),
        "generated_tokens": rollouts.generated_tokens, "generation_seconds": rollouts.generation_seconds,
        "update_tokens": update_tokens, "update_seconds": update_seconds, "sync_seconds": sync_seconds,
    }


def _save_critic_state(critic, critic_optimizer, critic_scheduler, kl: ppo_loss.KLController,
                       prompts: PromptStream):
    def write(path: Path) -> None:
        critic.save_pretrained(path / CRITIC_DIR)
        torch.save(critic_optimizer.state_dict(), path / "critic_optimizer.pt")
        torch.save(critic_scheduler.state_dict(), path / "critic_scheduler.pt")
        atomic_write_json(path / PPO_STATE_FILE, {"kl_controller": kl.state_dict(), "data_position": prompts.position})
    return write


def run(context: RunContext) -> JobResult:
    """Run a ppo job to its end (or to a stop request) and fill in its result."""
    from posttrain.data import load_training_data

    spec, jd, stop, result, placement = context.spec, context.job_dir, context.stop, context.result, context.placement
    method: PPOMethod = spec.method  # type: ignore[assignment]
    training = spec.training
    checkpoint, state = resume_point(jd, context.resume)
    ppo_state = json.loads((checkpoint / PPO_STATE_FILE).read_text()) if checkpoint else {}

    tokenizer = load_tokenizer(spec)
    conversational = bool(getattr(tokenizer, "chat_template", None))
    data = load_training_data(spec.data, "ppo", seed=training.seed, conversational=conversational)
    if data.skipped:
        log.warning("skipped %d malformed rows of %s (data.on_bad_row=skip)", data.skipped, data.source)
    prompts = PromptStream(list(data.train["prompt"]), training.seed, ppo_state.get("data_position", 0))
    actor = build_policy(spec, placement, checkpoint)
    reference = build_reference(spec, placement, actor)
    reward = load_reward_model(spec, placement)
    critic = build_critic(spec, placement, checkpoint, tokenizer)
    sync, server = None, None
    sinks: MetricsSinks | None = None
    try:
        sample: Sampler = inprocess_sampler(actor, tokenizer)
        if method.rollout_backend == "server":
            # As the online trainer: attach before the optimizer exists (shared_vllm rebinds the parameters).
            sync = make_sync(spec, jd, served_model(spec, checkpoint))
            actor = attach_resumed(sync, actor, method, checkpoint, state.step)
            server = ServerSampler(f"http://{method.inference_host}:{method.inference_port}")
            sample = server.complete
        # Dropout off everywhere (eval mode; gradients still flow), as in TRL's PPO: the rollout's log-probs and
        # values and the update's come from the same function, so the first mini-batch's ratio is exactly 1.
        actor.eval()
        critic.eval()
        actor_optimizer, actor_scheduler = build_optimizer(spec, actor)
        critic_spec = spec.model_copy(update={"training": training.model_copy(
            update={"learning_rate": method.critic_learning_rate or training.learning_rate})})
        critic_optimizer, critic_scheduler = build_optimizer(critic_spec, critic)
        kl = ppo_loss.KLController(method.kl_coef, method.kl_target, method.kl_horizon)
        if checkpoint:
            load_training_state(checkpoint, actor_optimizer, actor_scheduler)  # also the random generators
            critic_optimizer.load_state_dict(torch.load(checkpoint / "critic_optimizer.pt", weights_only=True))
            critic_scheduler.load_state_dict(torch.load(checkpoint / "critic_scheduler.pt", weights_only=True))
            kl.load_state_dict(ppo_state["kl_controller"])
        micro = training.per_device_train_batch_size
        mini_batch = micro * training.gradient_accumulation_steps
        rollout_batch = mini_batch * method.num_mini_batches
        sinks = MetricsSinks(spec, jd)
        jd.update_status(step=state.step, total_steps=training.max_steps)
        log.info("ppo: steps %d..%d, %d rollouts per step (%d mini-batches of %d, micro-batches of %d), %d rows, "
                 "reward model %s, rollouts %s", state.step + 1, training.max_steps, rollout_batch,
                 method.num_mini_batches, mini_batch, micro, len(prompts.rows), method.reward_model,
                 f"server {method.inference_host}:{method.inference_port} ({method.weight_bridge_mode})"
                 if sync is not None else "in-process")

        def checkpoint_now() -> None:
            save_checkpoint(jd, state, actor, tokenizer, actor_optimizer, actor_scheduler, training.save_total_limit,
                            extra=_save_critic_state(critic, critic_optimizer, critic_scheduler, kl, prompts))

        saved_at = state.step
        evaluation = LoopEvaluation(Evaluator.for_job(spec, jd, split_rows=data.eval, sink=sinks.write), actor,
                                    tokenizer, training.max_steps, checkpoint_now)
        evaluation.start(state.step)
        while state.step < training.max_steps and not stop.is_set():
            lr = actor_scheduler.get_last_lr()[0]
            rollouts = sample_rollouts(sample, tokenizer, prompts.take(rollout_batch), method.response_length,
                                       method.temperature, method.max_prompt_length, placement.device)
            started = time.perf_counter()
            scored = evaluate_rollouts(actor, reference, critic, reward, rollouts, method, kl.value,
                                       training.max_seq_length, micro)
            # Rollouts and updates take turns, so one hold around all of this step's optimizer steps is
            # enough for shared_vllm; the other modes push once, after the last of them.
            if sync is not None:
                sync.before_update()
            stats = ppo_update(actor, critic, actor_optimizer, critic_optimizer, rollouts, scored, method,
                               mini_batch, micro, training.max_grad_norm)
            update_seconds = time.perf_counter() - started
            actor_scheduler.step()
            critic_scheduler.step()
            state.step += 1
            sync_seconds = sync.after_update(actor, state.step) if sync is not None else 0.0
            # Forward passes of the update: the scoring pass and ppo_epochs x (actor + critic) passes.
            update_tokens = int(rollouts.attention_mask.sum()) * (1 + method.ppo_epochs)
            record = step_metrics(state.step, rollouts, scored, stats, kl.value, lr, update_tokens, update_seconds,
                                  sync_seconds)
            kl.update(record["kl"], rollouts.size)
            state.rewards.append(record["reward"])
            if state.step % training.logging_steps == 0 or state.step == training.max_steps:
                sinks.write(record)
            jd.update_status(step=state.step, total_steps=training.max_steps)
            log.info("step %d/%d reward=%.4g kl=%.4g policy_loss=%.4g value_loss=%.4g len=%.1f",
                     state.step, training.max_steps, record["reward"], record["kl"], record["policy_loss"],
                     record["value_loss"], record["response_length"])
            result.final_loss, result.tokens_per_s = record["policy_loss"], record["tokens_per_s"]
            saved_at = evaluation.end_of_step(state.step, record["reward"], training.save_steps, saved_at)
            if evaluation.stopped:
                return evaluation.fail(result, state.step)
        return finish_run(spec, jd, state, result, stop, saved_at, checkpoint_now, actor, tokenizer, "reward")
    finally:
        if sinks is not None:
            sinks.close()
        if server is not None:
            server.close()
        if sync is not None:
            with contextlib.suppress(Exception):
                sync.close()

