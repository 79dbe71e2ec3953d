"""Faults: the server or a worker is SIGKILLed mid-training; no job is lost or run twice."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import psutil
import pytest
from service_harness import train_spec, worker_processes
from waiting import wait_for

from posttrain.client import ServiceError
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


def test_a_job_whose_end_cannot_be_recorded_in_its_directory_still_ends(start_server):
    server = start_server("--max-retries", "0")
    with server.client() as client:
        job = client.submit(train_spec(**LONG))
        job_dir = JobDir(server.data_dir / "jobs" / job.id)
        wait_for(lambda: client.get_job(job.id).step >= 2, 120, "training to start")

        def break_status_file() -> bool:
            # status.json becomes a directory: neither the worker nor the scheduler can write it any more.
            job_dir.status_path.unlink(missing_ok=True)
            try:
                job_dir.status_path.mkdir()
            except FileExistsError:  # the worker rewrote it in between; try again
                return False
            return True

        wait_for(break_status_file, 30, "status.json to be replaced")
        job = client.wait(job.id, timeout=120)
        assert job.state == "failed" and "before recording a result" in job.error
        with pytest.raises(ServiceError) as caught:
            client.cancel(job.id)
        assert caught.value.status_code == 409
        client.delete(job.id)
        assert not job_dir.root.exists()
        assert client.ready()


def test_workers_get_a_minimal_environment_and_their_whole_group_ends_with_them(start_server, tmp_path: Path):
    code = tmp_path / "code"
    code.mkdir()
    child_pid = tmp_path / "child.pid"
    # Every Python process with this PYTHONPATH runs sitecustomize; in a worker it leaves a child behind,
    # as a data loader or user code could.
    pid_file = repr(str(child_pid))
    (code / "sitecustomize.py").write_text(
        "import os, subprocess\n"
        f"if os.environ.get('POSTTRAIN_JOB_ID') and not os.path.exists({pid_file}):\n"
        "    child = subprocess.Popen(['sleep', '300'])\n"
        f"    open({pid_file}, 'w').write(str(child.pid))\n")
    database = tmp_path / "from-env.db"
    server = start_server(env={"PYTHONPATH": str(code), "POSTTRAIN_DB": f"sqlite:///{database}",
                               "POSTTRAIN_API_KEY": "pt-not-for-workers", "SERVER_ONLY_SECRET": "s3cret"})
    assert database.is_file()  # --db was taken from POSTTRAIN_DB
    with server.client() as client:
        job = client.submit(train_spec(**LONG))
        job_dir = JobDir(server.data_dir / "jobs" / job.id)
        wait_for(lambda: client.get_job(job.id).step >= 1 and child_pid.exists(), 120, "the worker and its child")
        worker_pid = job_dir.read_status().pid
        environ = Path(f"/proc/{worker_pid}/environ").read_bytes().split(b"\0")
        names = {entry.split(b"=", 1)[0].decode() for entry in environ if entry}
        assert {"PATH", "PYTHONPATH", "POSTTRAIN_JOB_ID"} <= names
        assert not names & {"POSTTRAIN_DB", "POSTTRAIN_API_KEY", "SERVER_ONLY_SECRET"}

        child = psutil.Process(int(child_pid.read_text()))
        assert os.getpgid(child.pid) == worker_pid  # in the worker's group
        os.kill(worker_pid, signal.SIGKILL)  # the main process only: its child would live on by itself
        wait_for(lambda: not child.is_running() or child.status() == psutil.STATUS_ZOMBIE, 60,
                 "the worker's child to be killed with it")
        wait_for(lambda: client.get_job(job.id).retries == 1, 60, "the job to be requeued")
        client.cancel(job.id)
        assert client.wait(job.id, timeout=120).state == "cancelled"
