"""Status reads served from memory: never staler than the last write this process made."""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path

import pytest

from posttrain.job.directory import JobDir
from posttrain.service.job_reads import RecentJobs
from posttrain.service.store import JobRecord, JobStore
from posttrain.service.views import job_info


@pytest.fixture
def store(tmp_path: Path):
    store = JobStore(f"sqlite:///{tmp_path / 'jobs.db'}")
    now = time.time()
    store.add_job(JobRecord(id="job-1", owner="alice", name="one", method="sft", state="queued", priority=0,
                            job_dir=str(tmp_path / "job-1"), spec_json="{}", step=0, attempt=0, retries=0,
                            resume=False, cancel_requested=False, created_at=now, updated_at=now))
    yield store
    store.close()


def test_a_record_is_served_from_memory_until_anything_is_written(store: JobStore):
    reads = RecentJobs(store, max_age_s=60)
    assert reads.cached("job-1") is None
    assert reads.read("job-1").state == "queued"
    assert reads.cached("job-1").state == "queued"

    assert store.claim("job-1", 0)  # the scheduler starts it
    assert reads.cached("job-1") is None
    assert reads.read("job-1").state == "running"
    store.cancel("job-1")
    assert reads.cached("job-1") is None and reads.read("job-1").cancel_requested


def test_a_read_that_raced_with_a_write_is_not_kept(store: JobStore, monkeypatch):
    reads = RecentJobs(store, max_age_s=60)
    real_get = store.get_job

    def get_then_write(job_id: str, owner: str | None = None):
        record = real_get(job_id, owner)
        store.update_job(job_id, step=7)  # lands while the read's result is on its way back
        return record

    monkeypatch.setattr(store, "get_job", get_then_write)
    assert reads.read("job-1").step == 0
    assert reads.cached("job-1") is None


def test_records_expire(store: JobStore):
    reads = RecentJobs(store, max_age_s=0.0)
    reads.read("job-1")
    time.sleep(0.01)
    assert reads.cached("job-1") is None  # a write by another server would show after max_age_s


def test_pollers_that_miss_together_share_one_read(store: JobStore, monkeypatch):
    reads = RecentJobs(store, max_age_s=60)
    calls = []
    real_get = store.get_job

    def counted(job_id: str, owner: str | None = None):
        calls.append(job_id)
        time.sleep(0.05)
        return real_get(job_id, owner)

    monkeypatch.setattr(store, "get_job", counted)

    async def poll_together():
        return await asyncio.gather(*(reads.get("job-1") for _ in range(20)), reads.get("job-404"))

    *records, missing = asyncio.run(poll_together())
    assert {record.id for record in records} == {"job-1"} and missing is None
    assert sorted(calls) == ["job-1", "job-404"]  # one read each; their threads may finish in either order


def test_a_read_after_a_write_never_joins_a_read_that_started_before_it(store: JobStore, monkeypatch):
    # A poller's read is in flight when a client's cancel commits; that client's next GET must see it.
    reads = RecentJobs(store, max_age_s=60)
    real_get = store.get_job
    release = threading.Event()

    async def scenario() -> tuple[JobRecord | None, JobRecord | None]:
        loop = asyncio.get_running_loop()
        old_row_read = asyncio.Event()

        def slow_get(job_id: str, owner: str | None = None):
            record = real_get(job_id, owner)  # the row as it was before the cancel
            loop.call_soon_threadsafe(old_row_read.set)
            release.wait(5)
            return record

        monkeypatch.setattr(store, "get_job", slow_get)
        poller = asyncio.ensure_future(reads.get("job-1"))
        await old_row_read.wait()
        monkeypatch.setattr(store, "get_job", real_get)
        store.cancel("job-1")  # commits while the poller's read is on its way back
        client = asyncio.ensure_future(reads.get("job-1"))
        await asyncio.sleep(0.05)
        release.set()
        return await poller, await client

    polled, seen_by_client = asyncio.run(scenario())
    assert polled.state == "queued"
    assert seen_by_client.state == "cancelled"


def test_job_info_sees_every_change_of_the_job_directory(store: JobStore):
    record = store.get_job("job-1")
    record.state = "running"
    job_dir = JobDir(record.job_dir).create()
    assert job_info(record).metrics is None
    for step in range(1, 30):  # same-size rewrites, several within one timestamp tick
        job_dir.update_status(state="running", step=step, total_steps=100)
        job_dir.append_metrics({"step": step, "loss": 1.0 / step})
        info = job_info(record)
        assert (info.step, info.metrics["step"]) == (step, step)
