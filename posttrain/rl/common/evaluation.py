"""The job's evaluation inside an RL trainer's own loop (online GRPO, PPO): the hooks the TRL methods get
from ``recipes.callbacks.EvalCallback``, for a loop that is not a Trainer."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from posttrain.eval.runner import Evaluator
from posttrain.job.result import JobResult


class LoopEvaluation:
    """Runs ``evaluator`` with the live ``model`` before the first step (eval.at_start) and after every
    evaluation step; ``checkpoint_now`` saves a checkpoint of the current step (at a new best, and before a
    stop on divergence)."""

    def __init__(self, evaluator: Evaluator | None, model: Any, tokenizer: Any, max_steps: int,
                 checkpoint_now: Callable[[], None]) -> None:
        self.evaluator, self.model, self.tokenizer = evaluator, model, tokenizer
        self.max_steps = max_steps
        self.checkpoint_now = checkpoint_now
        self.rewards: list[float] = []

    def start(self, step: int) -> None:
        if self.evaluator is not None and self.evaluator.settings.at_start and step == 0:
            self.evaluator.evaluate(0, self.model, self.tokenizer)

    def after_step(self, step: int, reward: float) -> bool:
        """Evaluate if ``step`` is due; True when a checkpoint of this step was saved."""
        if math.isfinite(reward):
            self.rewards.append(reward)
        if self.evaluator is None or not self.evaluator.due(step, self.max_steps):
            return False
        mean = sum(self.rewards) / len(self.rewards) if self.rewards else None
        self.rewards = []
        outcome = self.evaluator.evaluate(step, self.model, self.tokenizer, final=step >= self.max_steps,
                                          train_reward=mean)
        if outcome.new_best or self.stopped:
            self.checkpoint_now()
            return True
        return False

    def end_of_step(self, step: int, reward: float, save_steps: int | None, saved_at: int) -> int:
        """Evaluate if ``step`` is due, then save the periodic checkpoint (every ``save_steps``, never of the last
        step, never twice); returns the step of the newest checkpoint. A stop on divergence saves only its own."""
        if self.after_step(step, reward):
            saved_at = step
        if not self.stopped and save_steps and step % save_steps == 0 and step < self.max_steps and saved_at != step:
            self.checkpoint_now()
            saved_at = step
        return saved_at

    @property
    def stopped(self) -> str | None:
        """The guard's message when it stopped the run (eval.stop_on_divergence)."""
        return self.evaluator.divergence if self.evaluator is not None else None

    def fail(self, result: JobResult, step: int) -> JobResult:
        result.step, result.total_steps = step, self.max_steps
        result.state, result.error = "failed", f"stopped by eval.stop_on_divergence: {self.stopped}"
        return result
