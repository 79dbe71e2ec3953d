"""The job directory: the truth about a run, read by every front door.

Layout::

    spec.json            the JobSpec the worker ran
    status.json          state, step, total_steps, error, timestamps (atomic rewrite)
    metrics.jsonl        one JSON object per logging step (append-only); evaluations and events are records too,
                         marked by "kind": "eval" / "event" (a training record has no kind)
    worker.log           the worker's log
    checkpoints/checkpoint-N/   complete only once it holds COMPLETE_MARKER
    final/               adapter or full model + tokenizer, loadable by transformers / PEFT
    best.json            with eval.select_best: the best evaluation so far and the checkpoint saved at it
                         (kept from rotation); final/ stays the last step
    eval/                the answers of every evaluation (answers-step-N.jsonl)
    tensorboard/         TensorBoard event files
    stop-received.json   written by the worker's signal handler: the cancel or pause it received (so the
                         service re-sends only a signal that did not arrive); absent until one does

Writers replace files by rename, so a reader sees the old or the new content, never a torn one.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field

# paused: stopped at a step boundary with a complete checkpoint; not terminal, it can be resumed.
JobState = Literal["queued", "running", "paused", "succeeded", "failed", "cancelled"]
TERMINAL_STATES: frozenset[str] = frozenset({"succeeded", "failed", "cancelled"})
COMPLETE_MARKER = "posttrain-complete.json"
STOP_RECEIVED_FILE = "stop-received.json"
BEST_FILE = "best.json"
# Record kinds in metrics.jsonl besides training records (which carry no "kind").
EVAL_RECORD, EVENT_RECORD = "eval", "event"
CHECKPOINT_PREFIX = "checkpoint-"
_CHECKPOINT_RE = re.compile(rf"^{CHECKPOINT_PREFIX}(\d+)$")


def checkpoint_name(step: int) -> str:
    """The folder name of the checkpoint saved after ``step`` (TRL's naming, which every trainer follows)."""
    return f"{CHECKPOINT_PREFIX}{step}"


class JobStatus(BaseModel):
    state: JobState = "queued"
    step: int = 0
    total_steps: int | None = None
    error: str | None = None
    pid: int | None = None
    attempt: int = 0
    created_at: float = Field(default_factory=time.time)
    started_at: float | None = None
    updated_at: float = Field(default_factory=time.time)
    finished_at: float | None = None
    # A pipeline's status only (posttrain.pipeline): the stage running now, and every stage's progress.
    stage: str | None = None
    stages: list[dict[str, Any]] | None = None
    # A node of a multi-node torchrun run that holds no rank 0, in a job directory of its own: its node rank
    # and where rank 0 writes the run's results (spec, metrics, checkpoints, final/). Its state and step are
    # that node's part of the run.
    node_rank: int | None = None
    rank0_host: str | None = None
    rank0_job_dir: str | None = None
    # The latest evaluation ({"step", "metrics": {name: value}}) and, with eval.select_best, the best one
    # (best.json's content); warnings the run raised (the reward-hacking guard's), newest last.
    eval: dict[str, Any] | None = None
    best: dict[str, Any] | None = None
    warnings: list[str] | None = None


class StopReceived(BaseModel):
    """A worker's acknowledgement of a stop request. ``pid`` is the process the service signals for the job
    (the worker itself, or torchrun's agent for a torchrun job), so an acknowledgement left by an earlier
    attempt's worker never counts for the next one."""

    pid: int
    request: Literal["cancel", "pause"]
    signal: str
    received_at: float = Field(default_factory=time.time)


def fsync_dir(path: Path) -> None:
    """Make a rename inside ``path`` durable: the new directory entry reaches the disk too, so after a
    power loss the file is the new one or the old one, never missing."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` so readers never see a partial file, and durably (file and directory
    entry synced)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def atomic_write_json(path: Path, payload: Any) -> None:
    atomic_write_text(path, json.dumps(payload, indent=2, default=str) + "\n")


class JobDir:
    """Paths and atomic reads/writes of one job directory."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)

    spec_path = property(lambda self: self.root / "spec.json")
    status_path = property(lambda self: self.root / "status.json")
    metrics_path = property(lambda self: self.root / "metrics.jsonl")
    log_path = property(lambda self: self.root / "worker.log")
    checkpoints_dir = property(lambda self: self.root / "checkpoints")
    final_dir = property(lambda self: self.root / "final")
    tensorboard_dir = property(lambda self: self.root / "tensorboard")
    stop_received_path = property(lambda self: self.root / STOP_RECEIVED_FILE)
    best_path = property(lambda self: self.root / BEST_FILE)
    eval_dir = property(lambda self: self.root / "eval")

    def create(self) -> JobDir:
        self.root.mkdir(parents=True, exist_ok=True)
        return self

    # -- spec ---------------------------------------------------------------------------------------
    def write_spec(self, spec_json: str) -> None:
        atomic_write_text(self.spec_path, spec_json)

    def read_spec_dict(self) -> dict[str, Any]:
        return json.loads(self.spec_path.read_text())

    # -- status -------------------------------------------------------------------------------------
    def read_status(self) -> JobStatus | None:
        """The status, or None when there is none or it cannot be read (writes are atomic, so only damage
        from outside makes an unreadable one; readers then treat the run as not having recorded a state)."""
        try:
            return JobStatus.model_validate_json(self.status_path.read_text())
        except (OSError, ValueError):
            return None

    def write_status(self, status: JobStatus) -> JobStatus:
        status.updated_at = time.time()
        atomic_write_text(self.status_path, status.model_dump_json(indent=2) + "\n")
        return status

    def update_status(self, **changes: Any) -> JobStatus:
        status = self.read_status() or JobStatus()
        updated = status.model_copy(update=changes)
        if changes.get("state") == "running" and updated.started_at is None:
            updated.started_at = time.time()
        if changes.get("state") in TERMINAL_STATES:
            updated.finished_at = time.time()
        return self.write_status(updated)

    # -- stop requests ------------------------------------------------------------------------------
    def record_stop_received(self, received: StopReceived) -> None:
        """Its own file, not a field of status.json: the signal handler that writes it runs between any two
        lines of the worker, possibly between a read and a write of status.json, which would then drop it."""
        atomic_write_text(self.stop_received_path, received.model_dump_json() + "\n")

    def read_stop_received(self) -> StopReceived | None:
        try:
            return StopReceived.model_validate_json(self.stop_received_path.read_text())
        except (OSError, ValueError):
            return None

    def clear_stop_received(self) -> None:
        self.stop_received_path.unlink(missing_ok=True)

    # -- metrics ------------------------------------------------------------------------------------
    def append_metrics(self, record: dict[str, Any]) -> None:
        # One write() of one line per record: appends of a few hundred bytes do not interleave.
        line = json.dumps(record, default=float) + "\n"
        with open(self.metrics_path, "a") as handle:
            handle.write(line)

    def read_metrics(self) -> list[dict[str, Any]]:
        try:
            lines = self.metrics_path.read_text().splitlines()
        except FileNotFoundError:
            return []
        records = []
        for line in lines:
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue  # a line cut by a crash mid-append
        return records

    def truncate_metrics(self, last_step: int) -> None:
        """Drop the records logged after ``last_step``: a run resumed from that step logs them again."""
        if not self.metrics_path.exists():
            return
        kept = [record for record in self.read_metrics() if record.get("step", 0) <= last_step]
        atomic_write_text(self.metrics_path, "".join(json.dumps(r, default=float) + "\n" for r in kept))

    # -- checkpoints --------------------------------------------------------------------------------
    def checkpoints(self, complete_only: bool = True) -> list[Path]:
        """Checkpoint folders sorted by step; by default only those whose marker file exists."""
        if not self.checkpoints_dir.is_dir():
            return []
        found = []
        for child in self.checkpoints_dir.iterdir():
            match = _CHECKPOINT_RE.match(child.name)
            if match and child.is_dir() and (not complete_only or (child / COMPLETE_MARKER).exists()):
                found.append((int(match.group(1)), child))
        return [path for _, path in sorted(found)]

    @staticmethod
    def checkpoint_step(checkpoint: Path) -> int:
        match = _CHECKPOINT_RE.match(checkpoint.name)
        if not match:
            raise ValueError(f"{checkpoint} is not a checkpoint-N folder")
        return int(match.group(1))

    def checkpoint_dir(self, step: int) -> Path:
        return self.checkpoints_dir / checkpoint_name(step)

    def latest_checkpoint(self) -> Path | None:
        complete = self.checkpoints()
        return complete[-1] if complete else None

    def mark_checkpoint_complete(self, checkpoint: Path, step: int) -> None:
        """Write the marker, with the latest evaluation at or before ``step`` (status.json's) in it."""
        marker: dict[str, Any] = {"step": step, "time": time.time()}
        status = self.read_status()
        if status is not None and status.eval is not None and status.eval.get("step", step + 1) <= step:
            marker["eval"] = status.eval
        atomic_write_json(checkpoint / COMPLETE_MARKER, marker)

    def checkpoint_marker(self, checkpoint: Path) -> dict[str, Any]:
        try:
            marker = json.loads((checkpoint / COMPLETE_MARKER).read_text())
        except (OSError, ValueError):
            return {}
        return marker if isinstance(marker, dict) else {}

    # -- best checkpoint ----------------------------------------------------------------------------
    def read_best(self) -> dict[str, Any] | None:
        try:
            best = json.loads(self.best_path.read_text())
        except (OSError, ValueError):
            return None
        return best if isinstance(best, dict) else None

    def write_best(self, best: dict[str, Any]) -> None:
        atomic_write_json(self.best_path, best)

    def best_checkpoint(self) -> Path | None:
        """The checkpoint folder best.json names (rotation keeps it), or None."""
        best = self.read_best()
        step = best.get("step") if best else None
        return self.checkpoint_dir(step) if isinstance(step, int) else None

    def rotate_checkpoints(self, keep: int | None) -> list[Path]:
        """Delete the oldest complete checkpoints beyond ``keep``, never the newest (the resume point) nor the
        one best.json names; returns what was removed."""
        if keep is None:
            return []
        complete = self.checkpoints()
        protected = {*complete[-1:], self.best_checkpoint()}
        removable = [path for path in complete if path not in protected]
        removed = removable[:max(0, len(complete) - max(keep, len(protected & set(complete))))]
        for path in removed:
            shutil.rmtree(path, ignore_errors=True)
        return removed

    def remove_incomplete_checkpoints(self) -> list[Path]:
        """Delete checkpoint folders a crash left without their marker; returns what was removed."""
        complete = set(self.checkpoints())
        removed = [path for path in self.checkpoints(complete_only=False) if path not in complete]
        for path in removed:
            shutil.rmtree(path, ignore_errors=True)
        return removed

    # -- listing ------------------------------------------------------------------------------------
    def artifacts(self) -> list[dict[str, Any]]:
        """Files under checkpoints/ (complete ones) and final/, with sizes, for listings and downloads."""
        roots = [*self.checkpoints(), self.final_dir]
        entries = []
        for root in roots:
            if not root.is_dir():
                continue
            for path in sorted(root.rglob("*")):
                if path.is_file():
                    entries.append({"path": str(path.relative_to(self.root)), "size": path.stat().st_size})
        return entries
