"""A job's OpenAI events and checkpoints, read from its record and job directory (nothing is stored twice).

Events: the job's lifecycle (created, started, finished), one ``metrics`` event per record of
``metrics.jsonl`` (a training record: ``train_loss``...; an evaluation: ``valid_loss``,
``valid_mean_token_accuracy``, ``valid_<grader>``, and after the last step also ``full_valid_*``, as OpenAI
reports them) and one ``message`` event per line the worker logged (``HH:MM:SS LEVEL name: text`` in
``worker.log``; its last 256 KiB). Ids carry their position (time, kind, sequence), so ``after`` pages
through them while the job runs, even past items that are gone since. Checkpoints: the complete
``checkpoints/checkpoint-N`` folders, with the training loss logged at or before step N and the evaluation
their marker holds (``valid_*``; ``full_valid_*`` when it is the one after the last step).
"""

from __future__ import annotations

import datetime as dt
import json
import re
from pathlib import Path
from typing import Any

from posttrain.job.directory import COMPLETE_MARKER, EVAL_RECORD, EVENT_RECORD, JobDir
from posttrain.service.errors import InvalidRequest
from posttrain.service.openai_schemas import (
    CheckpointMetrics,
    FineTuningJobCheckpoint,
    FineTuningJobEvent,
)
from posttrain.service.store import JobRecord
from posttrain.service.views import read_tail

LOG_BYTES = 256 * 1024
LOG_LINE = re.compile(r"^(\d\d):(\d\d):(\d\d) (DEBUG|INFO|WARNING|ERROR|CRITICAL) [\w.]+: (.*)$")
LEVELS = {"DEBUG": "info", "INFO": "info", "WARNING": "warn", "ERROR": "error", "CRITICAL": "error"}


def page(items: list[Any], after: str | None, limit: int) -> tuple[list[Any], bool]:
    """The ``limit`` items that come after ``after`` in the list (newest first). The position is read from
    the id itself, so paging goes on even when that item is gone (a log line out of the tail, a checkpoint
    deleted by rotation); an id that is not one of ours is a 400."""
    if after is None:
        return items[:limit], len(items) > limit
    cursor = position(after)
    rest = [item for item in items if position(item.id) < cursor]
    return rest[:limit], len(rest) > limit


def position(item_id: str) -> tuple[int, ...]:
    """The sort key an event or checkpoint id carries: (time in ms, kind, sequence) or (step,)."""
    try:
        if item_id.startswith("ftevent-"):
            _, when, kind, sequence = item_id.rsplit("-", 3)
            return int(when), int(kind), int(sequence)
        if item_id.startswith("ftckpt-"):
            return (int(item_id.rsplit("-", 1)[1]),)
    except ValueError:
        pass
    raise InvalidRequest(f"after={item_id!r} is not an event or checkpoint id of this API", param="after")


# Events of one moment, in the order they happened.
CREATED, VALIDATED, LOGGED, METRICS, MODEL, FINISHED = range(6)


def job_events(record: JobRecord, fine_tuned_model: str | None) -> list[FineTuningJobEvent]:
    """Every event of the job, newest first. An id is ``ftevent-<job>-<ms>-<kind>-<sequence>``: unique
    (a resumed run's metrics records have new times) and ordered, so ``after`` can page from it."""
    job_dir = JobDir(record.job_dir)
    events: list[tuple[tuple[int, int, int], FineTuningJobEvent]] = []

    def add(when: float, kind: int, sequence: int, message: str, level: str = "info", event_type: str = "message",
            data: dict[str, Any] | None = None) -> None:
        key = (round(when * 1000), kind, sequence)
        event = FineTuningJobEvent(id=f"ftevent-{record.id}-{key[0]}-{kind}-{sequence}", created_at=int(when),
                                   level=level, message=message, type=event_type, data=data)  # type: ignore[arg-type]
        events.append((key, event))

    add(record.created_at, CREATED, 0, f"Created fine-tuning job: {record.id}")
    add(record.created_at, VALIDATED, 0, "Validated the training file: job queued")
    latest = max(record.finished_at or 0.0, record.updated_at)
    for offset, when, level, text in _log_lines(job_dir.log_path, latest):
        # Log times are whole seconds: a line written within a second of the job's creation (a warm-started
        # worker logs ~0.1 s after submit) would otherwise sort before "Created".
        add(max(when, record.created_at), LOGGED, offset, text, LEVELS[level])
    started = record.launched_at or record.created_at
    for index, metrics in enumerate(job_dir.read_metrics()):
        # An event record (the reward-hacking guard's) reaches the events as the warning the worker logged.
        if isinstance(metrics, dict) and isinstance(metrics.get("step"), int) and metrics.get("kind") != EVENT_RECORD:
            add(float(metrics.get("time") or started), METRICS, index, _metrics_message(metrics),
                event_type="metrics", data=_metrics_data(metrics))
    if record.finished_at is not None:
        finished = {"succeeded": ("The job has successfully completed", "info"),
                    "failed": (f"The job failed: {record.error or 'unknown error'}", "error"),
                    "cancelled": ("The job was cancelled", "info")}.get(record.state)
        if finished is not None:
            if record.state == "succeeded" and fine_tuned_model:
                add(record.finished_at, MODEL, 0, f"New fine-tuned model created: {fine_tuned_model}")
            add(record.finished_at, FINISHED, 0, *finished)
    events.sort(key=lambda entry: entry[0], reverse=True)
    return [event for _, event in events]


def _log_lines(path: Path, latest: float) -> list[tuple[int, float, str, str]]:
    """(byte offset, time, level, text) of the worker's own log lines, from the end of its log.

    Lines carry only a time of day. The last one was written by ``latest`` (the job's last change), and
    each line is no later than the next: walking back from the end, each gets the latest date that keeps
    that order. This dates the lines of earlier runs (a paused and resumed job appends to the same log)
    and runs across midnight correctly."""
    data, end = read_tail(path, LOG_BYTES)
    start = end - len(data)
    parsed = []
    offset = start
    for raw in data.split(b"\n"):
        line_offset, offset = offset, offset + len(raw) + 1
        match = LOG_LINE.match(raw.decode(errors="replace").rstrip("\r"))
        if match is None or (line_offset == start and start > 0):  # the first line may be cut
            continue
        parsed.append((line_offset, match))
    found = []
    bound = dt.datetime.fromtimestamp(latest) + dt.timedelta(seconds=1)  # whole seconds, rounded down
    for line_offset, match in reversed(parsed):
        hour, minute, second = (int(part) for part in match.group(1, 2, 3))
        when = bound.replace(hour=hour, minute=minute, second=second, microsecond=0)
        if when > bound:
            when -= dt.timedelta(days=1)
        bound = when
        found.append((line_offset, when.timestamp(), match.group(4), match.group(5)))
    found.reverse()
    return found


def _evaluation_data(metrics: dict[str, Any], final: bool) -> dict[str, Any]:
    """An evaluation's metrics as OpenAI names them: valid_<metric>, and full_valid_<metric> for the evaluation
    after the last step (of every held-out row)."""
    data = {}
    for key, value in metrics.items():
        if isinstance(value, int | float) and not isinstance(value, bool):
            name = key.removeprefix("eval_")
            data[f"valid_{name}"] = value
            if final:
                data[f"full_valid_{name}"] = value
    return data


def _metrics_data(metrics: dict[str, Any]) -> dict[str, Any]:
    data: dict[str, Any] = {"step": metrics["step"]}
    if metrics.get("kind") == EVAL_RECORD:
        evaluated = {key: value for key, value in metrics.items() if key.startswith("eval_")}
        return {**data, **_evaluation_data(evaluated, bool(metrics.get("final")))}
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
        train = next((m for m in reversed(records) if m["step"] <= step and "loss" in m and not m.get("kind")), {})
        evaluation = job_dir.checkpoint_marker(folder).get("eval") or {}
        valid = _evaluation_data(evaluation.get("metrics") or {}, bool(evaluation.get("final")))
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
                                      **{key: value for key, value in valid.items()
                                         if key in CheckpointMetrics.model_fields}),
        ))
    return checkpoints
