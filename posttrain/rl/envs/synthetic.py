"""``digits``: a synthetic task small enough for the tiny random-init model to learn on a CPU in minutes.

Each prompt asks for digits; the reward of a reply is the share of its non-space characters that are digits
(0.0 for an empty reply). A random model writes some digits by chance, so the rewards within a group differ
from the first step on (atroposlib drops groups whose scores are all equal) and GRPO has a signal to follow:
the mean reward climbs towards 1.0 as the policy learns to prefer digit tokens. It exists to show the whole
online loop working, rising reward included, with nothing to download.
"""

from __future__ import annotations

import random

from pydantic import Field

from posttrain.rl.envs.base import PosttrainEnv, PosttrainEnvConfig, scored_group

PROMPTS = (
    "Write a long number.",
    "Reply with digits only.",
    "Count as high as you can.",
    "What is your favourite number? Write it out in digits.",
    "Type a phone number.",
    "List some numbers.",
)


class DigitsEnvConfig(PosttrainEnvConfig):
    target_chars: str = Field(default="0123456789", description="Characters that earn reward.")
    seed: int = Field(default=0, description="Seed of the prompt order.")


def digit_share(reply: str, target_chars: str = "0123456789") -> float:
    """Share of the reply's non-space characters that are in ``target_chars``."""
    characters = [c for c in reply if not c.isspace()]
    if not characters:
        return 0.0
    return sum(c in target_chars for c in characters) / len(characters)


class DigitsEnv(PosttrainEnv):
    """Reward = share of digits in the reply."""

    name = "digits"
    env_config_cls = DigitsEnvConfig

    @classmethod
    def config_init(cls):
        return cls.default_configs(
            group_size=8, batch_size=16, max_token_length=256, max_completion_tokens=12, steps_per_eval=0
        )

    async def setup(self) -> None:
        self.random = random.Random(self.config.seed)
        self.rewards: list[float] = []

    async def get_next_item(self) -> str:
        return self.random.choice(PROMPTS)

    async def collect_trajectories(self, item: str):
        completions = await self.sample_group([{"role": "user", "content": item}])
        scores = [digit_share(c.text, self.config.target_chars) for c in completions]
        self.rewards.extend(scores)
        return scored_group(completions, scores), []

    async def evaluate(self, *args, **kwargs) -> None:
        """Mean greedy reward over the prompts."""
        scores = []
        for prompt in PROMPTS:
            (completion,) = await self.sample_group([{"role": "user", "content": prompt}], n=1, temperature=0.0,
                                                    split="eval")
            scores.append(digit_share(completion.text, self.config.target_chars))
        await self.evaluate_log({"eval/reward_mean": sum(scores) / len(scores)}, verbose=False)

    async def wandb_log(self, wandb_metrics: dict | None = None) -> None:
        wandb_metrics = dict(wandb_metrics or {})
        if self.rewards:
            wandb_metrics["train/reward_mean"] = sum(self.rewards) / len(self.rewards)
            self.rewards = []
        await super().wandb_log(wandb_metrics)


if __name__ == "__main__":
    DigitsEnv.cli()
