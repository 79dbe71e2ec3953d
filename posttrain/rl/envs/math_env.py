"""A GSM8k-format math environment: word problems in, a numeric answer checked by math-verify out.

Rows have a ``question`` and an ``answer`` whose last line is ``#### <number>`` (GSM8k's convention). The
default data is the GSM8k-format sample bundled with posttrain (``posttrain:gsm8k``), so the environment runs
offline; ``--env.dataset openai/gsm8k:main`` reads the real GSM8k from the Hugging Face hub instead, and any
local .jsonl/.json/.csv/.parquet file of the same shape works too.

Reward: 1.0 when math-verify finds the reference answer in the reply (after ``####`` when the reply has that
line, else anywhere, boxed answers first), else ``number_reward`` if the reply states a number at all, else
0. The small credit for a number is shaping for small models, which start out never right: without it every
group scores the same and atroposlib drops it, so nothing would ever be learned. Set it to 0 for the plain
correctness reward.
"""

from __future__ import annotations

import random
from typing import Any

from latex2sympy2_extended import NormalizationConfig
from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify
from pydantic import Field

from posttrain.data.sources import read_rows
from posttrain.errors import DatasetError
from posttrain.rewards import final_answer
from posttrain.rl.envs.base import PosttrainEnv, PosttrainEnvConfig, scored_group

BUNDLED_GSM8K = "posttrain:gsm8k"
# The real dataset, for machines that can reach the hub: `--env.dataset openai/gsm8k:main`.
HUB_GSM8K = "openai/gsm8k:main"

SYSTEM_PROMPT = (
    "Solve the math problem. Think step by step, then give the final answer on its own last line as "
    "'#### <number>'."
)

# Boxed answers first, then LaTeX, then plain expressions (a bare "20" or "4 * 5 = 20").
ANSWER_EXTRACTION = [
    LatexExtractionConfig(
        normalization_config=NormalizationConfig(
            nits=False, malformed_operators=False, basic_latex=True, equations=True, boxed="all", units=True,
        ),
        boxed_match_priority=0,
    ),
    ExprExtractionConfig(),
]


class MathEnvConfig(PosttrainEnvConfig):
    dataset: str = Field(
        default=BUNDLED_GSM8K,
        description=f"GSM8k-format rows: {BUNDLED_GSM8K} (bundled), a local file, or a hub id such as {HUB_GSM8K}.",
    )
    eval_size: int = Field(default=20, description="Rows held out for evaluation (taken from the end).")
    number_reward: float = Field(
        default=0.1, description="Reward of a wrong reply that still states a number (0 = correctness only)."
    )
    seed: int = Field(default=0, description="Seed of the training order.")


def reference_answer(answer: str) -> str:
    """The number after GSM8k's '####' line (commas dropped), or the whole answer when it has no such line."""
    final = final_answer(answer)
    return (final if final is not None else answer).strip().replace(",", "")


def parse_reply(reply: str) -> list[Any]:
    """What math-verify reads as the reply's answer: the text after '####' if the reply has one."""
    final = final_answer(reply)
    return parse(final if final else reply, extraction_config=ANSWER_EXTRACTION)


def score_reply(reply: str, gold: str, number_reward: float = 0.0) -> float:
    """1.0 for a correct final answer, ``number_reward`` for a wrong one that is a number, 0 for no answer."""
    gold_parsed = parse(gold, extraction_config=[ExprExtractionConfig(), LatexExtractionConfig()])
    answer = parse_reply(reply)
    if gold_parsed and answer and verify(gold_parsed, answer):
        return 1.0
    return number_reward if answer else 0.0


def load_problems(dataset: str) -> list[dict[str, str]]:
    """``question`` / ``answer`` rows of a GSM8k-format source; a row without them is an error naming it."""
    problems = []
    for raw in read_rows(dataset):
        question, answer = raw.values.get("question"), raw.values.get("answer")
        if raw.error or not isinstance(question, str) or answer is None:
            raise DatasetError(raw.error or "expected GSM8k fields 'question' and 'answer'", raw.source, raw.row)
        problems.append({"question": question, "answer": reference_answer(str(answer))})
    if not problems:
        raise DatasetError("no rows", dataset)
    return problems


class MathEnv(PosttrainEnv):
    """GSM8k-format word problems scored with math-verify."""

    name = "gsm8k"
    env_config_cls = MathEnvConfig

    @classmethod
    def config_init(cls):
        return cls.default_configs(group_size=8, batch_size=16, max_token_length=1024, steps_per_eval=0)

    async def setup(self) -> None:
        config: MathEnvConfig = self.config
        problems = load_problems(config.dataset)
        held_out = min(config.eval_size, len(problems) // 2)
        self.train_rows = problems[: len(problems) - held_out]
        self.eval_rows = problems[len(problems) - held_out:]
        random.Random(config.seed).shuffle(self.train_rows)
        self.iter = 0
        self.percent_correct: list[float] = []

    def save_checkpoint(self, step, data=None):
        # Resuming the trainer also resumes where this environment was in the data.
        super().save_checkpoint(step, {**(data or {}), "iter": self.iter})

    async def get_next_item(self) -> dict[str, str]:
        row = self.train_rows[self.iter % len(self.train_rows)]
        self.iter += 1
        return row

    @staticmethod
    def messages(row: dict[str, str]) -> list[dict[str, str]]:
        return [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": row["question"]}]

    async def collect_trajectories(self, item: dict[str, str]):
        completions = await self.sample_group(self.messages(item))
        scores = [score_reply(c.text, item["answer"], self.config.number_reward) for c in completions]
        self.percent_correct.extend(1.0 if score == 1.0 else 0.0 for score in scores)
        return scored_group(completions, scores), []

    async def evaluate(self, *args, **kwargs) -> None:
        """Greedy accuracy on the held-out rows, logged with the next W&B step and, when
        ``data_dir_to_save_evals`` is set, written there."""
        correct = []
        for row in self.eval_rows:
            (completion,) = await self.sample_group(self.messages(row), n=1, temperature=0.0, split="eval")
            correct.append(score_reply(completion.text, row["answer"]) == 1.0)
        accuracy = sum(correct) / max(1, len(correct))
        self.eval_accuracy = accuracy
        await self.evaluate_log({"eval/percent_correct": accuracy}, verbose=False)

    async def wandb_log(self, wandb_metrics: dict | None = None) -> None:
        wandb_metrics = dict(wandb_metrics or {})
        if self.percent_correct:
            wandb_metrics["train/percent_correct"] = sum(self.percent_correct) / len(self.percent_correct)
            self.percent_correct = []
        await super().wandb_log(wandb_metrics)


if __name__ == "__main__":
    MathEnv.cli()
