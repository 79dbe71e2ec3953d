"""A job's OpenAI events and checkpoints, read from its record and job directory (nothing is stored twice).

Events: the job's lifecycle (created, started, finished), one ``metrics`` event per record of
``metrics.jsonl`` and one ``message`` event per line the worker logged (``HH:MM:SS LEVEL name: text`` in
``worker.log``; its last 256 KiB). Ids are stable (a log line is named by its byte offset, a metrics
record by its line), so ``after`` pages through them while the job runs. Checkpoints: the complete
``checkpoints/checkpoint-N`` folders, with the train and validation losses logged at or before step N.
"""

from __future__ import annotations

import datetime as dt
import json
import re
from pathlib import Path
from typing import Any

from posttrain.jobdir import COMPLETE_MARKER, JobDir
from posttrain.service.openai_schemas import (
    CheckpointMetrics,
    FineTuningJobCheckpoint,
    FineTuningJobEvent,
)
from posttrain.service.store import JobRecord

LOG_BYTES = 256 * 1024
LOG_LINE = re.compile(r"^(\d\d):(\d\d):(\d\d) (DEBUG|INFO|WARNING|ERROR|CRITICAL) [\w.]+: (.*)$")
LEVELS = {"DEBUG": "info", "INFO": "info", "WARNING": "warn", "ERROR": "error", "CRITICAL": "error"}


def page(items: list[Any], after: str | None, limit: int) -> tuple[list[Any], bool]:
    """The ``limit`` items after the one whose id is ``after`` (all from the start when it is unknown)."""
    start = 0
    if after is not None:
        start = next((index + 1 for index, item in enumerate(items) if item.id == after), 0)
    chosen = items[start:start + limit]
    return chosen, start + limit < len(items)


def job_events(record: JobRecord, fine_tuned_model: str | None) -> list[FineTuningJobEvent]:
    """Every event of the job, newest first."""
    job_dir = JobDir(record.job_dir)
    prefix = f"ftevent-{record.id}"
    events: list[tuple[float, int, FineTuningJobEvent]] = []

    def add(when: float, order: int, suffix: str, message: str, level: str = "info", kind: str = "message",
            data: dict[str, Any] | None = None) -> None:
        event = FineTuningJobEvent(id=f"{prefix}-{suffix}", created_at=int(when), level=level,  # type: ignore[arg-type]
                                   message=message, type=kind, data=data)  # type: ignore[arg-type]
        events.append((when, order, event))

    add(record.created_at, 0, "created", f"Created fine-tuning job: {record.id}")
    add(record.created_at, 1, "validated", "Validated the training file: job queued")
    started = record.launched_at or record.created_at
    for offset, when, level, text in _log_lines(job_dir.log_path, started):
        # Log times are whole seconds: a line written within a second of the job's creation (a warm-started
        # worker logs ~0.1 s after submit) would otherwise sort before "Created".
        add(max(when, record.created_at), 2, f"log-{offset}", text, LEVELS[level])
    for index, metrics in enumerate(job_dir.read_metrics()):
        if isinstance(metrics, dict) and isinstance(metrics.get("step"), int):
            add(float(metrics.get("time") or started), 3, f"metrics-{index}", _metrics_message(metrics),
                kind="metrics", data=_metrics_data(metrics))
    if record.finished_at is not None:
        finished = {"succeeded": ("The job has successfully completed", "info"),
                    "failed": (f"The job failed: {record.error or 'unknown error'}", "error"),
                    "cancelled": ("The job was cancelled", "info")}.get(record.state)
        if finished is not None:
            if record.state == "succeeded" and fine_tuned_model:
                add(record.finished_at, 4, "model", f"New fine-tuned model created: {fine_tuned_model}")
            add(record.finished_at, 5, "finished", *finished)
    events.sort(key=lambda entry: (entry[0], entry[1]))
    return [event for _, _, event in reversed(events)]


def _log_lines(path: Path, started: float) -> list[tuple[int, float, str, str]]:
    """(byte offset, time, level, text) of the worker's own log lines, from the end of its log."""
    try:
        with open(path, "rb") as handle:
            size = handle.seek(0, 2)
            start = max(0, size - LOG_BYTES)
            handle.seek(start)
            data = handle.read()
    except FileNotFoundError:
        return []
    day = dt.datetime.fromtimestamp(started)
    found = []
    offset = start
    for raw in data.split(b"\n"):
        line_offset, offset = offset, offset + len(raw) + 1
        match = LOG_LINE.match(raw.decode(errors="replace").rstrip("\r"))
        if match is None or (line_offset == start and start > 0):  # the first line may be cut
            continue
        hour, minute, second = (int(part) for part in match.group(1, 2, 3))
        when = day.replace(hour=hour, minute=minute, second=second, microsecond=0)
        if when < day - dt.timedelta(hours=1):  # the log's clock went past midnight
            when += dt.timedelta(days=1)
        found.append((line_offset, when.timestamp(), match.group(4), match.group(5)))
    return found


def _metrics_data(metrics: dict[str, Any]) -> dict[str, Any]:
    data: dict[str, Any] = {"step": metrics["step"]}
    for ours, theirs in (("loss", "train_loss"), ("mean_token_accuracy", "train_mean_token_accuracy"),
                         ("eval_loss", "valid_loss"), ("eval_mean_token_accuracy", "valid_mean_token_accuracy"),
                         ("reward", "reward"), ("learning_rate", "learning_rate"), ("epoch", "epoch")):
        if isinstance(metrics.get(ours), int | float):
            data[theirs] = metrics[ours]
    return data


def _metrics_message(metrics: dict[str, Any]) -> str:
    data = _metrics_data(metrics)
    parts = [f"{name}={value:.4g}" for name, value in data.items() if name not in ("step", "epoch")]
    return f"Step {metrics['step']}: " + (", ".join(parts) or json.dumps(metrics)[:200])


def job_checkpoints(record: JobRecord, fine_tuned_model: str) -> list[FineTuningJobCheckpoint]:
    """Complete checkpoints, newest first, with the metrics logged at or before their step."""
    job_dir = JobDir(record.job_dir)
    records = [m for m in job_dir.read_metrics() if isinstance(m, dict) and isinstance(m.get("step"), int)]
    checkpoints = []
    for folder in reversed(job_dir.checkpoints()):
        step = JobDir.checkpoint_step(folder)
        train = next((m for m in reversed(records) if m["step"] <= step and "loss" in m), {})
        valid = next((m for m in reversed(records) if m["step"] <= step and "eval_loss" in m), {})
        try:  # the trainer may delete an old checkpoint (save_total_limit) while this lists it
            created = (folder / COMPLETE_MARKER).stat().st_mtime
        except OSError:
            created = record.created_at
        checkpoints.append(FineTuningJobCheckpoint(
            id=f"ftckpt-{record.id}-{step}", created_at=int(created),
            fine_tuned_model_checkpoint=f"{fine_tuned_model}:ckpt-step-{step}", fine_tuning_job_id=record.id,
            step_number=step,
            metrics=CheckpointMetrics(step=step, train_loss=train.get("loss"),
                                      train_mean_token_accuracy=train.get("mean_token_accuracy"),
                                      valid_loss=valid.get("eval_loss"),
                                      valid_mean_token_accuracy=valid.get("eval_mean_token_accuracy")),
        ))
    return checkpoints
