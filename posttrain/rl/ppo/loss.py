"""The PPO arithmetic on response tokens: KL-shaped rewards, GAE, whitening, clipped policy and value losses,
and the adaptive KL controller. Pure tensor functions over ``[batch, response_length]`` tensors with a
``mask`` of real (generated) tokens; the trainer (:mod:`posttrain.rl.ppo.trainer`) feeds them.

The formulas are those of the RLHF PPO literature (Ziegler et al. 2019, as implemented by TRL's former
PPOTrainer and OpenRLHF):

    r_t = -kl_coef * KL_t  (+ score on the last real token)
    delta_t = r_t + gamma * V_{t+1} - V_t ;  A_t = delta_t + gamma * lam * A_{t+1} ;  returns = A + V
    policy loss = mean over tokens of max(-A * ratio, -A * clip(ratio, 1 - eps, 1 + eps))
    value loss = 0.5 * mean over tokens of max((V - R)^2, (clip(V, V_old +- eps_v) - R)^2)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (values * mask).sum() / mask.sum().clamp_min(1)


def masked_var(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Unbiased variance of the masked entries (0 when fewer than two)."""
    count = mask.sum()
    if count < 2:
        return torch.zeros((), dtype=values.dtype, device=values.device)
    mean = masked_mean(values, mask)
    return ((values - mean) ** 2 * mask).sum() / (count - 1)


def masked_whiten(values: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True) -> torch.Tensor:
    """Scale the masked entries to unit variance (and zero mean unless ``shift_mean`` is false); entries
    outside the mask become 0."""
    mean, var = masked_mean(values, mask), masked_var(values, mask)
    whitened = (values - mean) * torch.rsqrt(var + 1e-8)
    if not shift_mean:
        whitened = whitened + mean
    return whitened * mask


def token_kl(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, estimator: str = "k1") -> torch.Tensor:
    """Per-token KL(pi || ref) estimate from the sampled tokens' log-probs: k1 = log-ratio (unbiased, may be
    negative per token), k3 = exp(-d) + d - 1 (unbiased, never negative)."""
    delta = logprobs - ref_logprobs
    if estimator == "k1":
        return delta
    if estimator == "k3":
        return torch.exp(-delta) + delta - 1
    raise ValueError(f"unknown KL estimator {estimator!r}")


def shaped_rewards(scores: torch.Tensor, kl: torch.Tensor, mask: torch.Tensor, kl_coef: float) -> torch.Tensor:
    """Per-token rewards: the KL penalty on every real token, plus each sequence's score on its last one."""
    rewards = -kl_coef * kl * mask
    lengths = mask.sum(dim=1).long()
    rows = torch.arange(len(scores), device=scores.device)
    has_tokens = lengths > 0
    last = (lengths - 1).clamp_min(0)
    rewards[rows[has_tokens], last[has_tokens]] += scores[has_tokens].to(rewards.dtype)
    return rewards


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float,
        lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimates and returns. Positions outside ``mask`` (after a sequence ends) hold
    no reward and value 0, so the recursion stops at each sequence's last real token."""
    rewards = rewards * mask
    values = values * mask
    length = rewards.shape[1]
    advantages = torch.zeros_like(rewards)
    last = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(length)):
        next_value = values[:, t + 1] if t + 1 < length else torch.zeros_like(last)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        last = delta + gamma * lam * last
        advantages[:, t] = last
    advantages = advantages * mask
    return advantages, (advantages + values) * mask


@dataclass
class ClipStats:
    loss: torch.Tensor
    clip_fraction: float


def policy_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                cliprange: float) -> ClipStats:
    """PPO's clipped surrogate, averaged over real tokens; clip_fraction: tokens whose clipped term won."""
    ratio = torch.exp(logprobs - old_logprobs)
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1.0 - cliprange, 1.0 + cliprange)
    loss = masked_mean(torch.maximum(unclipped, clipped), mask)
    with torch.no_grad():
        fraction = float(masked_mean((clipped > unclipped).to(mask.dtype), mask))
    return ClipStats(loss, fraction)


def value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor,
               cliprange_value: float) -> ClipStats:
    """Clipped value loss (0.5 x squared error, the larger of clipped and unclipped), over real tokens."""
    clipped_values = old_values + (values - old_values).clamp(-cliprange_value, cliprange_value)
    unclipped_error = (values - returns) ** 2
    clipped_error = (clipped_values - returns) ** 2
    loss = 0.5 * masked_mean(torch.maximum(unclipped_error, clipped_error), mask)
    with torch.no_grad():
        fraction = float(masked_mean((clipped_error > unclipped_error).to(mask.dtype), mask))
    return ClipStats(loss, fraction)


def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> float:
    """1 - Var(returns - values) / Var(returns): 1 is a perfect critic, 0 no better than a constant."""
    var_returns = float(masked_var(returns, mask))
    if var_returns == 0:
        return float("nan")
    return 1.0 - float(masked_var(returns - values, mask)) / var_returns


class KLController:
    """The KL coefficient: fixed, or adaptive (Ziegler et al.): nudged towards a target KL per sequence,
    by at most 20% of the error per ``horizon`` rollouts."""

    def __init__(self, init_kl_coef: float, target: float | None = None, horizon: int = 10000) -> None:
        self.value = init_kl_coef
        self.target = target
        self.horizon = horizon

    def update(self, current_kl: float, num_rollouts: int) -> None:
        if self.target is None:
            return
        error = min(max(current_kl / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * num_rollouts / self.horizon

    def state_dict(self) -> dict[str, float]:
        return {"value": self.value}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.value = float(state["value"])
