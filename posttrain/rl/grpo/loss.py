"""The online GRPO objective: PPO-clipped policy gradient on per-token advantages, optional KL.

For each trained token, with r = exp(log pi(token) - log pi_old(token)) (pi_old: the policy that sampled
it, from ``inference_logprobs``; without them r = 1 and this is the plain policy gradient):

    loss_token = -min(r * A, clip(r, 1 - eps_low, 1 + eps_high) * A) + beta * KL_token

where KL_token = exp(ref - logp) - (ref - logp) - 1 (the k3 estimator: unbiased, always >= 0) towards
the reference policy. Tokens are summed into one number per optimizer step by ``loss_type``:

- ``grpo``: mean over each sequence's tokens, then mean over the sequences (long answers weigh less);
- ``dr_grpo``: sum over all tokens / (sequences x a constant token budget) (Dr. GRPO: no length bias);
- ``dapo``: sum over all tokens / the number of trained tokens of the whole step (DAPO's token-level mean).

Each micro-batch's loss is its share of the step's loss (normalised by step-wide counts), so gradient
accumulation over micro-batches gives the same gradient as one big batch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch

from posttrain.rl.grpo.rollouts import RolloutBatch

LossType = Literal["grpo", "dr_grpo", "dapo"]


@dataclass(frozen=True)
class LossConfig:
    loss_type: LossType = "grpo"
    clip_low: float = 0.2
    clip_high: float = 0.2
    beta: float = 0.0
    token_budget: int = 1024  # dr_grpo's constant per-sequence normaliser


@dataclass
class StepCounts:
    """Step-wide counts every micro-batch is normalised by."""

    sequences: int
    tokens: int


@dataclass
class LossStats:
    """Sums over trained tokens, added up across micro-batches and turned into means at the end."""

    tokens: int = 0
    ratio_sum: float = 0.0
    clipped: int = 0
    kl_sum: float = 0.0
    extra: dict[str, float] = field(default_factory=dict)

    def add(self, other: LossStats) -> None:
        self.tokens += other.tokens
        self.ratio_sum += other.ratio_sum
        self.clipped += other.clipped
        self.kl_sum += other.kl_sum

    def means(self) -> dict[str, float]:
        n = max(self.tokens, 1)
        return {"mean_ratio": self.ratio_sum / n, "clipped_fraction": self.clipped / n, "kl": self.kl_sum / n}


def token_logprobs(model: torch.nn.Module, batch: RolloutBatch) -> torch.Tensor:
    """log pi(target) at every trained position ([B, T], 0 elsewhere), logits scaled by each sequence's
    sampling temperature so the ratio compares like with like. Only trained rows get a log-softmax."""
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    trained = batch.trained
    temperatures = batch.temperatures.to(logits.device)[:, None].expand_as(trained)[trained]
    rows = logits[trained].float() / temperatures[:, None]
    picked = rows.log_softmax(dim=-1).gather(1, batch.targets[trained][:, None]).squeeze(1)
    full = torch.zeros(trained.shape, dtype=picked.dtype, device=picked.device)
    return full.masked_scatter(trained, picked)


def policy_loss(logprobs: torch.Tensor, batch: RolloutBatch, config: LossConfig, counts: StepCounts,
                ref_logprobs: torch.Tensor | None = None) -> tuple[torch.Tensor, LossStats]:
    """This micro-batch's share of the step loss, and its ratio / clip / KL sums."""
    mask = batch.trained.to(logprobs.dtype)
    old = logprobs.detach()
    if batch.old_logprobs is not None:
        # Sequences without inference_logprobs stay on-policy (ratio 1).
        has_old = batch.has_old_logprobs[:, None].expand_as(old)
        old = torch.where(has_old, batch.old_logprobs.to(old.dtype), old)
    ratio = torch.exp(logprobs - old)
    advantages = batch.advantages.to(logprobs.dtype)
    clipped_ratio = ratio.clamp(1.0 - config.clip_low, 1.0 + config.clip_high)
    per_token = -torch.min(ratio * advantages, clipped_ratio * advantages)
    kl = None
    if config.beta > 0:
        if ref_logprobs is None:
            raise ValueError("beta > 0 needs the reference policy's log-probs")
        delta = ref_logprobs.detach() - logprobs
        kl = torch.exp(delta) - delta - 1
        per_token = per_token + config.beta * kl
    masked = per_token * mask
    if config.loss_type == "grpo":
        per_sequence = masked.sum(dim=1) / mask.sum(dim=1).clamp_min(1)
        loss = per_sequence.sum() / max(counts.sequences, 1)
    elif config.loss_type == "dr_grpo":
        loss = masked.sum() / (max(counts.sequences, 1) * config.token_budget)
    elif config.loss_type == "dapo":
        loss = masked.sum() / max(counts.tokens, 1)
    else:
        raise ValueError(f"unknown loss_type {config.loss_type!r}")
    with torch.no_grad():
        trained = batch.trained
        outside = (ratio < 1.0 - config.clip_low) | (ratio > 1.0 + config.clip_high)
        stats = LossStats(tokens=int(trained.sum()), ratio_sum=float(ratio[trained].sum()),
                          clipped=int((outside & trained).sum()),
                          kl_sum=float(kl[trained].sum()) if kl is not None else 0.0)
    return loss, stats
