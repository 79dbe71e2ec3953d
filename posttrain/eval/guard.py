"""The reward-hacking guard of reinforcement jobs (grpo, online_grpo, ppo).

A policy can learn what the training reward pays for instead of the task (answers that get longer, a format
without the right number). The guard watches a held-out metric computed by graders independent of that
reward: when, over the last ``window`` evaluations, the training reward has risen while the held-out metric
has fallen by more than ``tolerance``, the two have diverged and the run is likely hacking its reward.

The training reward of an evaluation is the mean reward of the steps logged since the previous one; it is
compared with the earliest evaluation in the window that has one (an evaluation before the first step has
none).
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Observation:
    step: int
    reward: float | None
    value: float


@dataclass
class DivergenceGuard:
    metric: str  # the held-out metric's name (without eval_)
    higher_is_better: bool
    tolerance: float
    window: int
    history: list[Observation] = field(default_factory=list)

    def observe(self, step: int, reward: float | None, value: float | None) -> str | None:
        """Record one evaluation; a message saying what diverged when the guard fires, else None."""
        if value is None:
            return None
        self.history.append(Observation(step, reward, value))
        if len(self.history) <= self.window:
            return None
        window = self.history[-self.window - 1:]
        then, now = window[0], window[-1]
        rewarded = next((entry for entry in window[:-1] if entry.reward is not None), None)
        if rewarded is None or now.reward is None or not now.reward > rewarded.reward:  # type: ignore[operator]
            return None
        fall = (then.value - now.value) if self.higher_is_better else (now.value - then.value)
        if fall <= self.tolerance:
            return None
        return (f"reward hacking suspected: the training reward rose from {rewarded.reward:.4g} (step "
                f"{rewarded.step}) to {now.reward:.4g} (step {now.step}) while held-out {self.metric} went from "
                f"{then.value:.4g} (step {then.step}) to {now.value:.4g}, beyond the tolerance of {self.tolerance:g}")
