"""OpenAI events read from a job directory: log lines dated across runs and midnight, paging by position."""

from __future__ import annotations

import datetime as dt
import json
import time
from pathlib import Path

import pytest

from posttrain.job.directory import JobDir
from posttrain.service.errors import InvalidRequest
from posttrain.service.openai_events import _log_lines, job_events, page
from posttrain.service.store import JobRecord


def at(day: int, hour: int, minute: int = 0, second: int = 0) -> float:
    return dt.datetime(2026, 11, day, hour, minute, second).timestamp()


def test_log_lines_of_an_earlier_run_keep_their_own_day(tmp_path: Path):
    # Ran at 09:00 on the 10th, paused, resumed at 08:00 on the 11th, last change 08:30 (a day later).
    log = tmp_path / "worker.log"
    log.write_text("09:00:05 INFO posttrain.worker: first run\n23:59:59 INFO posttrain.worker: before midnight\n"
                   "00:00:01 INFO posttrain.worker: after midnight\n08:00:00 INFO posttrain.worker: resumed\n"
                   "08:30:00 INFO posttrain.worker: last\n")
    lines = _log_lines(log, at(11, 8, 30))
    assert [(text, when) for _, when, _, text in lines] == [
        ("first run", at(10, 9, 0, 5)), ("before midnight", at(10, 23, 59, 59)),
        ("after midnight", at(11, 0, 0, 1)), ("resumed", at(11, 8)), ("last", at(11, 8, 30))]


def test_paging_goes_on_from_an_item_that_is_gone_and_refuses_foreign_ids(tmp_path: Path):
    job_dir = JobDir(tmp_path / "job").create()
    now = time.time()
    job_dir.metrics_path.write_text("".join(json.dumps({"step": step, "loss": 1.0 / step, "time": now + step}) + "\n"
                                            for step in range(1, 6)))
    record = JobRecord(id="job-1", owner=None, name="x", method="sft", state="running", priority=0,
                       job_dir=str(job_dir.root), spec_json="{}", step=5, attempt=1, retries=0, resume=False,
                       cancel_requested=False, created_at=now, updated_at=now + 5)
    events = job_events(record, None)
    assert [e.data["step"] for e in events if e.type == "metrics"] == [5, 4, 3, 2, 1]  # newest first
    assert len({e.id for e in events}) == len(events)
    first, more = page(events, None, 2)
    assert more and [e.data["step"] for e in first] == [5, 4]
    # The record the cursor names is gone (a resumed run truncated metrics.jsonl): paging continues after it.
    job_dir.metrics_path.write_text("\n".join(job_dir.metrics_path.read_text().splitlines()[:3]) + "\n")
    rest, more = page(job_events(record, None), first[-1].id, 10)
    assert [e.data["step"] for e in rest if e.type == "metrics"] == [3, 2, 1] and not more
    with pytest.raises(InvalidRequest):
        page(events, "ftevent-nonsense", 10)
