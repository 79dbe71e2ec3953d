"""What the API shows of a job: its record merged with its job directory, logs, metrics and artifacts."""

from __future__ import annotations

import asyncio
import functools
import json
import os
import re
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

from posttrain.job.directory import TERMINAL_STATES, JobDir, JobStatus
from posttrain.service.schemas import Artifact, ArtifactList, EvalReport, JobInfo
from posttrain.service.store import JobRecord

TAIL_CHUNK = 64 * 1024


def job_info(record: JobRecord, live: bool = True) -> JobInfo:
    """A job as the API shows it. ``live`` adds what only its directory knows (the step of a running job,
    the latest metrics, started_at); without it nothing but the record is read (listings)."""
    job_dir = JobDir(record.job_dir)
    step, total_steps, started_at, metrics = record.step, record.total_steps, None, None
    status = read_status(job_dir.status_path) if live else None
    stage, stages = None, None
    evaluation, best, warnings = None, None, None
    if status is not None:
        started_at = status.started_at
        stage, stages = status.stage, status.stages  # a pipeline's (posttrain.pipeline)
        evaluation, best, warnings = status.eval, status.best, status.warnings
        if record.state == "running":  # the job dir is fresher than the mirrored copy
            step, total_steps = status.step, status.total_steps
    if live:
        metrics = latest_metrics(job_dir.metrics_path)
    return JobInfo(
        id=record.id, name=record.name, method=record.method, model=model_name(record.spec_json),
        state=record.state,  # type: ignore[arg-type]
        priority=record.priority, step=step, total_steps=total_steps, metrics=metrics, eval=evaluation, best=best,
        warnings=warnings,
        error=record.error, attempt=record.attempt, retries=record.retries,
        cancel_requested=record.cancel_requested, pause_requested=record.pause_requested, created_at=record.created_at, launched_at=record.launched_at,
        started_at=started_at, finished_at=record.finished_at, updated_at=record.updated_at,
        stage=stage if record.state == "running" else None, stages=stages,  # type: ignore[arg-type]
    )


# What was last read from a job directory's small files, by path. Status pollers ask for the same job
# many times between two writes of it; parsing the same bytes again is what costs (tens of microseconds).
_LAST_STATUS: dict[Path, tuple[bytes, JobStatus | None]] = {}
_LAST_METRICS: dict[Path, tuple[tuple[int, int, int], dict | None]] = {}
_LAST_READ_LIMIT = 4096


def _remember(cache: dict[Path, Any], path: Path, entry: Any) -> None:
    if len(cache) >= _LAST_READ_LIMIT:
        cache.clear()
    cache[path] = entry


def read_status(path: Path) -> JobStatus | None:
    """status.json as JobDir.read_status reads it, parsed only when its bytes changed since the last call."""
    try:
        data = path.read_bytes()
    except OSError:
        return None
    known = _LAST_STATUS.get(path)
    if known is not None and known[0] == data:
        return known[1]
    try:
        status: JobStatus | None = JobStatus.model_validate_json(data)
    except ValueError:
        status = None
    _remember(_LAST_STATUS, path, (data, status))
    return status


def latest_metrics(path: Path) -> dict | None:
    """:func:`last_metrics`, read again only when metrics.jsonl changed: it only grows (appends change its
    size) or is replaced by rename (a new inode)."""
    try:
        stat = os.stat(path)
    except OSError:
        return None
    signature = (stat.st_ino, stat.st_size, stat.st_mtime_ns)
    known = _LAST_METRICS.get(path)
    if known is not None and known[0] == signature:
        return known[1]
    metrics = last_metrics(path)
    _remember(_LAST_METRICS, path, (signature, metrics))
    return metrics


@functools.lru_cache(maxsize=1024)  # a job's spec never changes; status pollers ask again and again
def model_name(spec_json: str) -> str | None:
    """The model a stored spec trains (``model.name_or_path``); None for a spec that does not parse."""
    try:
        spec = json.loads(spec_json)
        if "stages" in spec:  # a pipeline: the model its first stage starts from
            spec = spec["stages"][0]["spec"]
        name = spec["model"]["name_or_path"]
    except (json.JSONDecodeError, TypeError, KeyError, IndexError, RecursionError):
        return None
    return name if isinstance(name, str) else None


def stage_names(spec_json: str) -> list[str]:
    """The stages of a pipeline job's stored plan (posttrain.pipeline); [] for any other job."""
    try:
        plan = json.loads(spec_json)
        names = [stage["name"] for stage in plan["stages"]] if isinstance(plan, dict) and "stages" in plan else []
    except (json.JSONDecodeError, TypeError, KeyError, RecursionError):
        return []
    return [name for name in names if isinstance(name, str) and name and "/" not in name and name != ".."]


def read_tail(path: Path, max_bytes: int) -> tuple[bytes, int]:
    """The last ``max_bytes`` of a file and the offset just past what was read (where a follower goes on)."""
    try:
        with open(path, "rb") as handle:
            handle.seek(0, os.SEEK_END)
            size = handle.tell()
            handle.seek(max(0, size - max_bytes))
            data = handle.read()
            return data, handle.tell()
    except FileNotFoundError:
        return b"", 0


def last_metrics(path: Path) -> dict | None:
    """The last complete training record of metrics.jsonl (evaluations and events, which carry a ``kind``, are
    status.json's to show), without reading the whole file."""
    for line in reversed(read_tail(path, TAIL_CHUNK)[0].splitlines()):
        try:
            record = json.loads(line)
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError):
            continue
        if isinstance(record, dict) and "kind" not in record:
            return record
    return None


def metrics_page(path: Path, since_step: int | None, limit: int) -> tuple[list[dict[str, Any]], bool]:
    """Up to ``limit`` records of metrics.jsonl logged after ``since_step``, and whether more follow.
    Read line by line and stopped at the limit: memory stays bounded however long the run."""
    records: list[dict[str, Any]] = []
    try:
        handle = open(path, "rb")  # noqa: SIM115 - closed below; a missing file is an empty page
    except FileNotFoundError:
        return [], False
    with handle:
        for line in handle:
            try:
                record = json.loads(line)
            except (json.JSONDecodeError, UnicodeDecodeError, RecursionError):
                continue  # a line cut by a crash mid-append
            if not isinstance(record, dict):
                continue
            step = record.get("step")
            if since_step is not None and not (isinstance(step, int | float) and step > since_step):
                continue
            # A page ends at a step boundary: the records of one step (training, evaluation, event) stay
            # together, so a reader that goes on after the page's last step misses none of them.
            if len(records) >= limit and step != records[-1].get("step"):
                return records, True
            records.append(record)
    return records, False


def tail_lines(path: Path, count: int) -> tuple[list[str], int]:
    """The last ``count`` lines of a log and the byte offset where the file ended."""
    max_bytes = TAIL_CHUNK
    while True:
        data, end = read_tail(path, max_bytes)
        lines = data.decode(errors="replace").replace("\r", "\n").splitlines()
        # Offset `end` is where this read stopped, so lines appended meanwhile are not skipped.
        if len(lines) > count or len(data) >= end or max_bytes >= 64 * TAIL_CHUNK:
            return lines[-count:] if count else [], end
        max_bytes *= 4


def _sse(data: str, event: str | None = None) -> str:
    head = f"event: {event}\n" if event else ""
    return head + "".join(f"data: {line}\n" for line in data.split("\n")) + "\n"


async def follow_log(
    path: Path, tail: int, job_state: Callable[[], str | None], disconnected: Callable[[], object],
    poll_s: float = 0.25, keepalive_s: float = 15.0,
) -> AsyncIterator[str]:
    """Server-sent events: the last ``tail`` lines, then each new line, then ``event: end`` with the state
    once the job has finished or is paused."""
    lines, offset = await asyncio.to_thread(tail_lines, path, tail)
    for line in lines:
        yield _sse(line)
    pending = b""
    idle = 0.0
    while True:
        chunk = await asyncio.to_thread(_read_from, path, offset)
        if chunk:
            offset += len(chunk)
            pending += chunk
            *complete, pending = pending.replace(b"\r", b"\n").split(b"\n")
            for line in complete:
                yield _sse(line.decode(errors="replace"))
            idle = 0.0
            continue
        state = await asyncio.to_thread(job_state)
        if state is None or state in TERMINAL_STATES or state == "paused":
            # No worker any more (a paused job's next one starts only on resume). One last read: the
            # worker may have written its final lines just before exiting.
            tail_chunk = pending + await asyncio.to_thread(_read_from, path, offset)
            for line in tail_chunk.replace(b"\r", b"\n").split(b"\n"):
                if line:
                    yield _sse(line.decode(errors="replace"))
            yield _sse(json.dumps({"state": state}), event="end")
            return
        if await disconnected():  # type: ignore[misc]
            return
        await asyncio.sleep(poll_s)
        idle += poll_s
        if idle >= keepalive_s:
            idle = 0.0
            yield ": keep-alive\n\n"


def _read_from(path: Path, offset: int, limit: int = 1024 * 1024) -> bytes:
    try:
        with open(path, "rb") as handle:
            handle.seek(offset)
            return handle.read(limit)
    except FileNotFoundError:
        return b""


def artifact_list(record: JobRecord) -> ArtifactList:
    job_dir = JobDir(record.job_dir)
    entries = [Artifact(**entry) for entry in job_dir.artifacts()]
    for stage in stage_names(record.spec_json):  # a pipeline's files are its stages' (<stage>/final/...)
        entries += [Artifact(path=f"{stage}/{entry['path']}", size=entry["size"])
                    for entry in JobDir(job_dir.root / stage).artifacts()]
    return ArtifactList(
        job_id=record.id, checkpoints=[path.name for path in job_dir.checkpoints()],
        final=job_dir.final_dir.is_dir(), artifacts=entries, total_size=sum(entry.size for entry in entries),
    )


class UnsafePath(ValueError):
    pass


def resolve_artifact(record: JobRecord, relative: str) -> Path | None:
    """A file inside the job's own directory, or None; raises UnsafePath for paths that try to leave it."""
    if not relative or relative.startswith(("/", "\\")) or "\x00" in relative:
        raise UnsafePath(f"artifact path {relative!r} must be relative to the job directory")
    if any(part == ".." for part in relative.replace("\\", "/").split("/")):
        raise UnsafePath(f"artifact path {relative!r} may not contain '..'")
    root = Path(record.job_dir).resolve()
    target = (root / relative).resolve()
    if not target.is_relative_to(root):  # e.g. a symlink pointing outside
        return None
    return target if target.is_file() else None


EVAL_ANSWERS_LIMIT = 2000  # answers returned by one read of an evaluation (they are kept in full on disk)
_ANSWERS_FILE = re.compile(r"^answers-step-(\d+)\.jsonl$")


def eval_report(record: JobRecord, step: int | None = None) -> EvalReport:
    """The job's latest evaluation, its best one, the steps whose answers are kept, and the answers of ``step``
    (default: the latest evaluation that kept answers)."""
    job_dir = JobDir(record.job_dir)
    status = read_status(job_dir.status_path)
    steps = sorted(int(match.group(1)) for path in (job_dir.eval_dir.iterdir() if job_dir.eval_dir.is_dir() else [])
                   if (match := _ANSWERS_FILE.match(path.name)))
    chosen = step if step is not None else (steps[-1] if steps else None)
    answers: list[dict[str, Any]] = []
    if chosen is not None:
        try:
            handle = open(job_dir.eval_dir / f"answers-step-{chosen}.jsonl", "rb")  # noqa: SIM115 - closed below
        except FileNotFoundError:
            chosen = None
        else:
            with handle:
                for line in handle:
                    if len(answers) == EVAL_ANSWERS_LIMIT:
                        break
                    try:
                        answers.append(json.loads(line))
                    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError):
                        continue
    return EvalReport(job_id=record.id, eval=status.eval if status else None, best=status.best if status else None,
                      steps=steps, step=chosen, answers=answers)
