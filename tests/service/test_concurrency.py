"""50 submissions at once from 50 threads: every one is stored once and runs once."""

from __future__ import annotations

import threading
import time

import pytest
from waiting import wait_for

SUBMISSIONS = 50

# The smallest real job: one step on 8 rows, no checkpoint, no final save. Each worker still spends
# most of its ~8 CPU-seconds importing torch/transformers/trl, so the whole test is a few minutes.
MINIMAL = {
    "training": {"max_steps": 1, "per_device_train_batch_size": 2, "num_threads": 1, "save_steps": 100},
    "data": {"max_samples": 8},
    "output": {"save_final": False},
    "tracking": {"report_to": []},
}


@pytest.mark.slow
def test_fifty_concurrent_submissions_are_all_stored_and_all_run(start_server):
    server = start_server("--slots", "3")
    ids: list[str] = []
    errors: list[BaseException] = []
    barrier = threading.Barrier(SUBMISSIONS)

    def submit(index: int) -> None:
        try:
            with server.client() as client:
                barrier.wait(timeout=30)
                job = client.submit({**MINIMAL, "name": f"burst-{index}"})
                ids.append(job.id)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=submit, args=(i,)) for i in range(SUBMISSIONS)]
    started = time.monotonic()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    submit_s = time.monotonic() - started
    assert not errors, errors[:3]
    assert len(ids) == len(set(ids)) == SUBMISSIONS, f"{len(set(ids))} distinct ids"

    with server.client() as client:
        page = client.list_jobs(limit=500)
        assert page.total == SUBMISSIONS
        assert sorted(j.name for j in page.jobs) == sorted(f"burst-{i}" for i in range(SUBMISSIONS))

        def all_finished() -> bool:
            return client.list_jobs(state=["queued", "running"], limit=1).total == 0

        wait_for(all_finished, 900, "all 50 jobs to finish")
        jobs = client.list_jobs(limit=500).jobs
    assert {j.id for j in jobs} == set(ids)
    assert [j.error for j in jobs if j.state != "succeeded"] == []
    assert all(j.attempt == 1 and j.step == 1 for j in jobs)  # each ran exactly once
    print(f"50 submissions in {submit_s:.1f}s; all ran in {time.monotonic() - started:.0f}s")
