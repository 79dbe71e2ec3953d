"""Faults: the server or a worker is SIGKILLed mid-training; no job is lost or run twice."""

from __future__ import annotations

import os
import signal

from service_harness import train_spec, worker_processes
from waiting import wait_for

from posttrain.jobdir import JobDir

# ~5 s of training on the tiny model: long enough to kill it part-way, short enough to finish.
LONG = {"max_steps": 200, "save_steps": 10}


def checkpoint_step(job_dir: JobDir) -> int:
    latest = job_dir.latest_checkpoint()
    return int(latest.name.rsplit("-", 1)[1]) if latest else 0


def test_server_and_worker_killed_then_restart_resumes_from_the_checkpoint(start_server):
    server = start_server()
    with server.client() as client:
        job = client.submit(train_spec(**LONG))
        job_dir = JobDir(server.data_dir / "jobs" / job.id)
        wait_for(lambda: checkpoint_step(job_dir) >= 10, 120, "a complete checkpoint")

    # The whole box goes down: the server and its worker die without any chance to clean up.
    server.kill()
    for worker in worker_processes(server.data_dir):
        os.killpg(worker.pid, signal.SIGKILL)
    wait_for(lambda: not worker_processes(server.data_dir), 10, "the worker to die")
    resumed_from = checkpoint_step(job_dir)
    assert 10 <= resumed_from < 200

    restarted = start_server(data_dir=server.data_dir)
    with restarted.client() as client:
        job = client.wait(job.id, timeout=240)
        log = "\n".join(client.logs(job.id, tail=2000))
        steps = [m["step"] for m in client.metrics(job.id) if "loss" in m]
    assert job.state == "succeeded", job.error
    assert (job.step, job.total_steps) == (200, 200)
    assert job.retries == 1 and job.attempt == 2
    assert f"from step {resumed_from}" in log  # the worker continued the step count, not restarted it
    assert steps[-1] == 200 and steps.count(resumed_from + 1) >= 1
    assert JobDir(job_dir.root).read_status().state == "succeeded"


def test_worker_that_outlives_the_server_is_readopted_not_run_twice(start_server):
    server = start_server()
    with server.client() as client:
        job = client.submit(train_spec(**LONG))
        wait_for(lambda: client.get_job(job.id).step >= 5, 120, "training to start")
    server.kill()  # the worker runs in its own session and keeps training
    [worker] = worker_processes(server.data_dir)

    restarted = start_server(data_dir=server.data_dir)
    with restarted.client() as client:
        def finished_with_one_worker() -> bool:
            assert len(worker_processes(server.data_dir)) <= 1
            return client.get_job(job.id).state != "running"

        wait_for(finished_with_one_worker, 240, "the re-adopted job to finish")
        job = client.get_job(job.id)
    assert job.state == "succeeded", job.error
    assert job.attempt == 1 and job.retries == 0  # the original worker finished it
    assert JobDir(server.data_dir / "jobs" / job.id).read_status().pid == worker.pid


def test_sigkilled_worker_is_retried_from_its_checkpoint_then_fails_when_retries_run_out(start_server):
    server = start_server("--max-retries", "1")
    with server.client() as client:
        job = client.submit(train_spec(**LONG))
        job_dir = JobDir(server.data_dir / "jobs" / job.id)
        wait_for(lambda: checkpoint_step(job_dir) >= 10, 120, "a complete checkpoint")
        first_pid = job_dir.read_status().pid
        os.killpg(first_pid, signal.SIGKILL)  # what the kernel's OOM killer does

        # Requeued and resumed by a new worker.
        def second_worker() -> int | None:
            status = job_dir.read_status()
            return status.pid if status.state == "running" and status.pid != first_pid else None

        second_pid = wait_for(second_worker, 120, "the retry to start")
        retried = client.get_job(job.id)
        assert retried.retries == 1 and "SIGKILL" in (retried.error or "") and "resuming from" in retried.error
        os.killpg(second_pid, signal.SIGKILL)

        job = client.wait(job.id, timeout=60)
    assert job.state == "failed"
    assert "killed by SIGKILL" in job.error and "out of memory" in job.error
    assert "gave up after 1 retries" in job.error
    assert job_dir.read_status().state == "failed"
