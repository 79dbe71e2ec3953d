"""The evaluation a job runs while it trains: :class:`Evaluator`, one for every method.

The trainers call it at their evaluation steps (TRL methods through ``recipes.callbacks.EvalCallback``, the
online GRPO and PPO loops directly) with the live model. One evaluation scores the held-out rows (a sample
of ``eval.max_samples``, the same at every step):

- teacher-forced: loss and token accuracy on the replies, a causal LM's preference between a pair's replies
  (:mod:`posttrain.eval.metrics`); for sft, dpo and reward the trainer's own evaluation loop (TRL's, which
  runs distributed) computes these and hands them over;
- generation-based: each prompt answered (greedy unless ``eval.temperature``) by the project's inference
  code on the live model and graded by ``eval.graders``;
- the regression set: how many of its questions still come out right.

and writes them where every door reads them: a ``"kind": "eval"`` record in metrics.jsonl (``eval_<metric>``
keys), status.json's ``eval``, the answers in ``eval/answers-step-N.jsonl``, and with ``eval.select_best``
best.json (the caller saves a checkpoint at a new best). Reinforcement methods also feed the reward-hacking
guard (:mod:`posttrain.eval.guard`). Under torchrun every rank evaluates the same rows; rank 0 writes.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from posttrain.data.eval_rows import EvalRow, eval_rows, load_eval_rows, sample_rows
from posttrain.errors import ConfigError
from posttrain.eval.answers import LiveModel, answer_records, grade, regression_grader, scorers
from posttrain.eval.guard import DivergenceGuard
from posttrain.eval.metrics import preference_scores, reply_scores
from posttrain.job.directory import EVAL_RECORD, EVENT_RECORD, JobDir, atomic_write_text
from posttrain.job.ranks import is_main_process
from posttrain.spec import LOWER_IS_BETTER, JobSpec, metric_name

log = logging.getLogger("posttrain.worker")

# What the trainers' own evaluation loops report (TRL's names), by method: the evaluator then computes no
# teacher-forced metric itself. A reward model's accuracy is also recorded as pairwise_accuracy.
TRAINER_METRICS: dict[str, tuple[str, ...]] = {
    "sft": ("loss", "mean_token_accuracy"),
    "dpo": ("loss", "rewards/accuracies", "rewards/margins"),
    "reward": ("loss", "accuracy", "pairwise_accuracy"),
}
# The training reward the guard compares with, by method (the key in the trainer's metrics records).
REWARD_KEYS = {"grpo": "reward", "online_grpo": "reward_mean", "ppo": "reward"}
REGRESSION_METRICS = ("regression_accuracy", "regression_forgotten")


@dataclass
class EvalOutcome:
    step: int
    metrics: dict[str, float]  # by metric name (metrics.jsonl keys carry an eval_ prefix)
    new_best: bool = False
    divergence: str | None = None  # the guard's message when it fired


def held_out_rows(spec: JobSpec, split_rows: Any = None) -> list[EvalRow]:
    """The rows a job evaluates on: eval.data, else data.validation (a file read as it is; a split_ratio's
    rows as the training data held them out, ``split_rows``); online_grpo reads only eval.data."""
    if spec.eval.data is not None:
        return load_eval_rows(spec.eval.data, spec.eval.split).rows
    validation = spec.data.validation
    if spec.method.name == "online_grpo":
        return []
    if validation.source is not None:
        return load_eval_rows(validation.source, validation.split, format=spec.data.format, columns=spec.data.columns,
                              on_bad_row=spec.data.on_bad_row).rows
    if validation.split_ratio is not None and split_rows is not None:
        return eval_rows(split_rows)
    return []


def every_steps(spec: JobSpec) -> int:
    """How often a job evaluates: eval.every_steps, else training.eval_steps, else every 10 logging steps."""
    return spec.eval.every_steps or spec.training.eval_steps or spec.training.logging_steps * 10


class Evaluator:
    """Evaluates one job's model at its evaluation steps and records the results in its job directory.

    ``trainer_metrics``: the metrics the trainer's own evaluation loop reports (then no teacher-forced metric is
    computed here); ``sink``: where eval records go (metrics.jsonl by default; the RL trainers' sinks also feed
    TensorBoard)."""

    def __init__(self, spec: JobSpec, job_dir: JobDir, held_out: list[EvalRow], regression: list[EvalRow], *,
                 trainer_metrics: tuple[str, ...] = (), sink: Callable[[dict[str, Any]], None] | None = None) -> None:
        settings = spec.eval
        self.spec, self.job_dir, self.settings = spec, job_dir, settings
        self.rows = sample_rows(held_out, settings.max_samples, spec.training.seed)
        self.regression = regression
        self.trainer_metrics = trainer_metrics
        self.scorers = scorers(settings.graders)
        self.regression_scorer = scorers([regression_grader()])
        self.every = every_steps(spec)
        self.sink = sink or job_dir.append_metrics
        self.main = is_main_process()
        self.best = job_dir.read_best() if settings.select_best else None  # a resumed run's best so far
        self.divergence: str | None = None
        watched = settings.divergence_metric or (settings.graders[0].name if settings.graders else None)
        self.guard = None
        if spec.method.name in REWARD_KEYS and watched is not None:
            self.guard = DivergenceGuard(metric_name(watched), metric_name(watched) not in LOWER_IS_BETTER,
                                         settings.divergence_tolerance, settings.divergence_window)
        self._check_names()

    @classmethod
    def for_job(cls, spec: JobSpec, job_dir: JobDir, split_rows: Any = None, **kwargs: Any) -> Evaluator | None:
        """The job's evaluator, or None when it has nothing to evaluate on."""
        held_out = held_out_rows(spec, split_rows)
        regression = load_eval_rows(spec.eval.regression, spec.eval.split).rows if spec.eval.regression else []
        if not held_out and not regression:
            return None
        evaluator = cls(spec, job_dir, held_out, regression, **kwargs)
        log.info("eval: %d held-out rows%s every %d steps and at the end: %s", len(evaluator.rows),
                 f" and {len(regression)} regression questions" if regression else "", evaluator.every,
                 ", ".join(evaluator.metric_names()) or "nothing to score")
        return evaluator

    # -- what is measured --------------------------------------------------------------------------------
    def metric_names(self) -> list[str]:
        names = list(self.trainer_metrics)
        kinds = {row.kind for row in self.rows}
        if not self.trainer_metrics and kinds & {"reply", "pair", "text"}:
            names += ["loss", "mean_token_accuracy"]
        if not self.trainer_metrics and "pair" in kinds:
            names += ["preference_accuracy", "preference_margin"]
        if any(row.prompt is not None for row in self.rows):
            names += list(self.scorers)
        if self.regression:
            names += list(REGRESSION_METRICS)
        return names

    def _check_names(self) -> None:
        names = self.metric_names()
        for key in ("select_best", "divergence_metric"):
            wanted = getattr(self.settings, key)
            if wanted is not None and metric_name(wanted) not in names:
                raise ConfigError(f"metric {wanted!r} is not one this job's evaluation reports "
                                  f"({', '.join(names) or 'none'})", f"eval.{key}")
        if self.settings.graders and not any(row.prompt is not None for row in self.rows):
            raise ConfigError("eval.graders grade answers to prompts, and the held-out rows have none (plain "
                              "text); give prompt/answer or chat rows", "eval.graders")

    def due(self, step: int, max_steps: int | None) -> bool:
        """Whether ``step`` is an evaluation step: every ``every`` steps, and the last one."""
        return step > 0 and (step % self.every == 0 or (max_steps is not None and step >= max_steps))

    # -- one evaluation ----------------------------------------------------------------------------------
    def evaluate(self, step: int, model: Any, tokenizer: Any, *, final: bool = False,
                 trainer_metrics: dict[str, Any] | None = None, train_reward: float | None = None) -> EvalOutcome:
        """Score the model at ``step``, record it, and say whether it is the best so far and whether the guard
        fired. ``trainer_metrics``: what the trainer's evaluation loop reported (``eval_``-prefixed, as TRL
        logs them); ``train_reward``: the mean training reward since the previous evaluation."""
        from posttrain.modeling import ensure_chat_template

        started = time.perf_counter()
        metrics: dict[str, float] = {}
        seconds = 0.0
        if trainer_metrics is not None:
            metrics.update(_trainer_values(trainer_metrics))
            seconds += float(trainer_metrics.get("eval_runtime") or 0.0)
        elif self.rows:
            batch, length = self.settings.batch_size, self.spec.training.max_seq_length
            metrics.update(reply_scores(model, tokenizer, self.rows, length, batch))
            metrics.update(preference_scores(model, tokenizer, self.rows, length, batch))
        if any(isinstance(row.prompt, list) for row in [*self.rows, *self.regression]):
            ensure_chat_template(tokenizer)
        answered: list[dict[str, Any]] = []
        live = LiveModel(model, tokenizer, self.settings.batch_size)
        prompted = [row for row in self.rows if row.prompt is not None]
        if self.scorers and prompted:
            answers = self._answer(live, prompted)
            grades = grade(self.scorers, answers, prompted)
            metrics.update({name: sum(values) / len(values) for name, values in grades.items()})
            answered += answer_records("held_out", prompted, answers, grades)
        if self.regression:
            answers = self._answer(live, self.regression)
            right = next(iter(grade(self.regression_scorer, answers, self.regression).values()))
            metrics["regression_accuracy"] = sum(right) / len(right)
            metrics["regression_forgotten"] = float(sum(1 for value in right if value < 1))
            answered += answer_records("regression", self.regression, answers, {"right": right})
        seconds += time.perf_counter() - started
        outcome = EvalOutcome(step, metrics)
        if self.settings.select_best:
            outcome.new_best = self._improves(step, metrics)
        if self.guard is not None:
            outcome.divergence = self.guard.observe(step, train_reward, metrics.get(self.guard.metric))
        if self.main:
            self._record(outcome, final, seconds, answered)
        if outcome.divergence is not None:
            log.warning("eval step %d: %s", step, outcome.divergence)
            if self.settings.stop_on_divergence:
                self.divergence = outcome.divergence
        log.info("eval step %d%s (%.1f s): %s", step, " (final)" if final else "", seconds,
                 " ".join(f"{name}={value:.4g}" for name, value in metrics.items()))
        return outcome

    def _answer(self, live: LiveModel, rows: list[EvalRow]) -> list[str]:
        return live.answer([row.prompt for row in rows], self.settings.max_new_tokens,  # type: ignore[misc]
                           self.settings.temperature, seed=self.spec.training.seed)

    def _improves(self, step: int, metrics: dict[str, float]) -> bool:
        name = metric_name(self.settings.select_best or "")
        value = metrics.get(name)
        # The starting model (an eval.at_start evaluation) has no checkpoint to keep: it is no candidate.
        if step == 0 or value is None or not math.isfinite(value):
            return False
        higher = self.settings.best_is_max()
        if self.best is not None and isinstance(self.best.get("value"), int | float):
            previous = float(self.best["value"])
            if (value <= previous) if higher else (value >= previous):
                return False
        self.best = {"metric": f"eval_{name}", "mode": "max" if higher else "min", "value": value, "step": step,
                     "checkpoint": str(self.job_dir.checkpoint_dir(step).relative_to(self.job_dir.root))}
        return True

    def _record(self, outcome: EvalOutcome, final: bool, seconds: float, answered: list[dict[str, Any]]) -> None:
        jd, step = self.job_dir, outcome.step
        record: dict[str, Any] = {"kind": EVAL_RECORD, "step": step, "time": time.time(), "final": final,
                                  "samples": len(self.rows), "seconds": round(seconds, 3)}
        record.update({f"eval_{name}": value for name, value in outcome.metrics.items()})
        self.sink(record)
        if answered:
            atomic_write_text(jd.eval_dir / f"answers-step-{step}.jsonl",
                              "".join(_json_line(row) for row in answered))
        changes: dict[str, Any] = {"eval": {"step": step, "final": final, "metrics": outcome.metrics}}
        if outcome.new_best and self.best is not None:
            jd.write_best(self.best)
            changes["best"] = self.best
        if outcome.divergence is not None:
            self.sink({"kind": EVENT_RECORD, "event": "divergence", "step": step, "time": time.time(),
                       "message": outcome.divergence})
            status = jd.read_status()
            changes["warnings"] = [*(status.warnings or [] if status is not None else []), outcome.divergence]
        jd.update_status(**changes)


def _trainer_values(trainer_metrics: dict[str, Any]) -> dict[str, float]:
    """The trainer's eval_* numbers by metric name (its runtime and throughput are not metrics)."""
    values = {metric_name(key): float(value) for key, value in trainer_metrics.items()
              if key.startswith("eval_") and isinstance(value, int | float) and not isinstance(value, bool)
              and not key.endswith(("_runtime", "_per_second", "_num_tokens"))}
    if "accuracy" in values:  # a reward model's accuracy on the held-out pairs
        values["pairwise_accuracy"] = values["accuracy"]
    return values


def _json_line(row: dict[str, Any]) -> str:
    return json.dumps(row, ensure_ascii=False, default=str) + "\n"
