"""Trainer callbacks that keep the job directory current, evaluate the model and show progress."""

from __future__ import annotations

import logging
import math
import sys
import time
from typing import Any

from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from posttrain.distributed.runtime import CANCEL, NO_STOP, PAUSE, agree_on_stop, barrier, is_distributed
from posttrain.eval.runner import REWARD_KEYS, Evaluator
from posttrain.job.directory import JobDir
from posttrain.job.signals import PAUSE_SIGNAL, StopRequest

log = logging.getLogger("posttrain.worker")


def is_evaluation_log(logs: dict[str, Any]) -> bool:
    """What the Trainer logs after its evaluation loop (eval_* values): EvalCallback records it, with the
    job's own eval metrics, as one eval record."""
    return "loss" not in logs and any(key.startswith("eval_") for key in logs)


def _clean(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


class JobDirCallback(TrainerCallback):
    """Writes status.json, metrics.jsonl and checkpoint markers; honours stop requests."""

    def __init__(self, job_dir: JobDir, stop: StopRequest, extra_metrics: dict[str, Any]) -> None:
        self.job_dir = job_dir
        self.stop = stop
        self.extra = extra_metrics
        self._last_time = time.perf_counter()
        self._last_tokens = 0
        self._last_step = 0
        self.last_logs: dict[str, Any] = {}
        self.tokens_per_s: float | None = None

    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **_: Any):
        self._last_time = time.perf_counter()
        self._last_tokens = int(state.num_input_tokens_seen or 0)
        self._last_step = state.global_step
        if state.is_world_process_zero:
            self.job_dir.update_status(state="running", step=state.global_step, total_steps=state.max_steps)

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **_: Any):
        if is_distributed():
            self._agree_on_stop(args)
        if self.stop.is_set():
            control.should_training_stop = True
            # A pause keeps the work done: the trainer saves a checkpoint of this step (weights, optimizer,
            # scheduler, RNG and data position) before it stops, and on_save marks it complete.
            control.should_save = self.stop.pausing
        return control

    def _agree_on_stop(self, args: TrainingArguments) -> None:
        """Ranks of a torchrun run stop after the same step: a signal that reached one rank (or reached them
        at different moments) stops them all, pause or cancel (a cancel wins)."""
        local = (CANCEL if not self.stop.pausing else PAUSE) if self.stop.is_set() else NO_STOP
        agreed = agree_on_stop(local, args.device.type)
        if agreed > local:
            self.stop.set(PAUSE_SIGNAL.name if agreed == PAUSE else "SIGTERM")

    def on_log(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
               logs: dict[str, Any] | None = None, **_: Any):
        if not state.is_world_process_zero or not logs or is_evaluation_log(logs):
            return
        now = time.perf_counter()
        tokens = int(state.num_input_tokens_seen or 0)
        record: dict[str, Any] = {"step": state.global_step, "epoch": _clean(state.epoch), "time": time.time()}
        record.update({key: _clean(value) for key, value in logs.items()})
        if "train_loss" not in logs and state.global_step > self._last_step and now > self._last_time:
            self.tokens_per_s = (tokens - self._last_tokens) / (now - self._last_time)
            record["tokens_per_s"] = round(self.tokens_per_s, 2)
            record["steps_per_s"] = round((state.global_step - self._last_step) / (now - self._last_time), 4)
        record["num_tokens_seen"] = tokens
        record.update(self.extra)
        self._last_time, self._last_tokens, self._last_step = now, tokens, state.global_step
        self.last_logs = record
        self.job_dir.append_metrics(record)
        self.job_dir.update_status(step=state.global_step, total_steps=state.max_steps)

    def on_save(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **_: Any):
        barrier()  # a torchrun run's checkpoint is complete only once every rank has written its part
        if not state.is_world_process_zero:
            return
        checkpoint = self.job_dir.checkpoint_dir(state.global_step)
        if checkpoint.is_dir():
            # The marker goes in last: a checkpoint without it (a crash mid-save) is never resumed from.
            self.job_dir.mark_checkpoint_complete(checkpoint, state.global_step)


class EvalCallback(TrainerCallback):
    """Runs the job's :class:`~posttrain.eval.runner.Evaluator` at its evaluation steps (and before the first
    one with eval.at_start): right after the trainer's own evaluation loop where it has one (sft, dpo, reward;
    its metrics join the record), at the end of the step otherwise (grpo). A new best asks the trainer for a
    checkpoint of this step and keeps it from rotation (``state.best_model_checkpoint``); a divergence with
    eval.stop_on_divergence stops training after a checkpoint."""

    def __init__(self, evaluator: Evaluator, trainer_evaluates: bool) -> None:
        self.evaluator = evaluator
        self.trainer_evaluates = trainer_evaluates
        self.trainer: Any = None  # set once the trainer exists (its evaluation loop runs at step 0)
        self.reward_key = REWARD_KEYS.get(evaluator.spec.method.name)
        self.rewards: list[float] = []  # training rewards logged since the last evaluation

    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any):
        if not self.evaluator.settings.at_start or state.global_step != 0:
            return
        if self.trainer_evaluates and self.trainer is not None:
            self.trainer.evaluate()  # its on_evaluate runs the rest
        else:
            self._evaluate(state, control, kwargs)

    def on_log(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
               logs: dict[str, Any] | None = None, **_: Any):
        value = (logs or {}).get(self.reward_key) if self.reward_key else None
        if isinstance(value, int | float) and math.isfinite(value):
            self.rewards.append(float(value))

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any):
        if not self.trainer_evaluates and self.evaluator.due(state.global_step, state.max_steps):
            self._evaluate(state, control, kwargs)

    def on_evaluate(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                    metrics: dict[str, Any] | None = None, **kwargs: Any):
        if self.trainer_evaluates:
            self._evaluate(state, control, kwargs, metrics or {})

    def _evaluate(self, state: TrainerState, control: TrainerControl, kwargs: dict[str, Any],
                  trainer_metrics: dict[str, Any] | None = None) -> None:
        step = state.global_step
        reward = sum(self.rewards) / len(self.rewards) if self.rewards else None
        self.rewards = []
        outcome = self.evaluator.evaluate(step, kwargs["model"], kwargs["processing_class"],
                                          final=bool(state.max_steps) and step >= state.max_steps,
                                          trainer_metrics=trainer_metrics, train_reward=reward)
        best = self.evaluator.best
        if outcome.new_best and best is not None:
            control.should_save = True
            state.best_model_checkpoint = str(self.evaluator.job_dir.checkpoint_dir(step))
            state.best_metric, state.best_global_step = best["value"], step
        if self.evaluator.divergence is not None:
            control.should_save = True
            control.should_training_stop = True


class ProgressCallback(TrainerCallback):
    """A tqdm bar (step, loss, tokens/s, ETA) on a terminal; one plain line per log otherwise."""

    def __init__(self, metrics: JobDirCallback, description: str) -> None:
        self.metrics = metrics
        self.description = description
        self.bar = None
        self.interactive = sys.stderr.isatty()

    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **_: Any):
        if not state.is_world_process_zero:
            return
        if self.interactive:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=state.max_steps, initial=state.global_step, desc=self.description,
                            unit="step", dynamic_ncols=True, file=sys.stderr)
        else:
            log.info("%s: training %d steps (from step %d)", self.description, state.max_steps, state.global_step)

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **_: Any):
        if self.bar is not None:
            self.bar.update(state.global_step - self.bar.n)

    def on_log(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
               logs: dict[str, Any] | None = None, **_: Any):
        if not state.is_world_process_zero or not logs or "train_loss" in logs:
            return
        shown = {}
        for key in ("loss", "reward", "rewards/margins", "eval_loss", "learning_rate", "tokens_per_s"):
            value = self.metrics.last_logs.get(key)
            if isinstance(value, float):
                shown[key.replace("rewards/", "")] = f"{value:.3g}" if key != "tokens_per_s" else f"{value:.0f}"
        if self.bar is not None:
            self.bar.set_postfix(shown, refresh=False)
        else:
            fields = " ".join(f"{key}={value}" for key, value in shown.items())
            log.info("step %d/%d %s", state.global_step, state.max_steps, fields)

    def on_train_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **_: Any):
        if self.bar is not None:
            self.bar.close()
            self.bar = None
