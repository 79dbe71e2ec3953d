"""Faults: the server or a worker is SIGKILLed mid-training; no job is lost or run twice."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import psutil
import pytest
from service_harness import train_spec, worker_processes
from waiting import wait_for

from posttrain.client import ServiceError
from posttrain.job.directory import JobDir

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
    # Forked from the warm template (the default): recognised after the restart by the identity it
    # recorded in its job directory, since its command line names no job.
    assert "forked from the warm template" in JobDir(server.data_dir / "jobs" / job.id).log_path.read_text()
    assert "--job-dir" not in worker.cmdline()

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


# A reward module that, when a worker imports it, leaves a child process behind (as a data loader or user
# code could) and records the environment the worker's code sees. It runs in the worker however it was
# started: a fresh interpreter (cold) or a fork of the warm template.
LEAVER = """
import atexit, json, os, subprocess
from pathlib import Path

_out = Path({out!r})
(_out / f"env-{{os.getpid()}}.json").write_text(json.dumps(dict(os.environ)))
atexit.register((_out / f"atexit-{{os.getpid()}}").write_text, "ran")  # runs when the worker exits normally
_child = subprocess.Popen(["sleep", "300"])
(_out / f"child-{{os.getpid()}}.pid").write_text(str(_child.pid))


def reward(completions, **kwargs):
    return [0.0] * len(completions)
"""


def leaver_spec(**training: object) -> dict:
    spec = train_spec(per_device_train_batch_size=8, **training)
    spec["method"] = {"name": "grpo", "num_generations": 4, "max_completion_length": 8,
                      "reward_functions": ["leaver:reward"]}
    spec["data"] = {"source": "posttrain:gsm8k", "max_samples": 64}
    return spec


def gone(process: psutil.Process) -> bool:
    return not process.is_running() or process.status() == psutil.STATUS_ZOMBIE


@pytest.mark.parametrize("start", ["--warm-workers", "--no-warm-workers"])
def test_workers_get_a_minimal_environment_and_their_whole_group_ends_with_them(start_server, tmp_path: Path,
                                                                                start: str):
    code, out = tmp_path / "code", tmp_path / "out"
    code.mkdir()
    out.mkdir()
    (code / "leaver.py").write_text(LEAVER.format(out=str(out)))
    database = tmp_path / "from-env.db"
    server = start_server(start, env={"PYTHONPATH": str(code), "POSTTRAIN_DB": f"sqlite:///{database}",
                                      "POSTTRAIN_API_KEY": "pt-not-for-workers", "SERVER_ONLY_SECRET": "s3cret"})
    assert database.is_file()  # --db was taken from POSTTRAIN_DB
    secrets = {"POSTTRAIN_DB", "POSTTRAIN_API_KEY", "SERVER_ONLY_SECRET"}
    with server.client() as client:
        job = client.submit(leaver_spec(**LONG))
        job_dir = JobDir(server.data_dir / "jobs" / job.id)

        def child_of_worker() -> tuple[int, psutil.Process] | None:
            status = job_dir.read_status()
            pid_file = out / f"child-{status.pid}.pid" if status and status.pid else None
            return (status.pid, psutil.Process(int(pid_file.read_text()))) if pid_file and pid_file.exists() else None

        worker_pid, child = wait_for(child_of_worker, 120, "the worker and its child")
        seen = json.loads((out / f"env-{worker_pid}.json").read_text())  # what the job's code sees
        assert {"PATH", "PYTHONPATH", "POSTTRAIN_JOB_ID"} <= seen.keys() and seen["POSTTRAIN_JOB_ID"] == job.id
        assert not seen.keys() & secrets
        environ = Path(f"/proc/{worker_pid}/environ").read_bytes().split(b"\0")  # what the process started with
        assert not {entry.split(b"=", 1)[0].decode() for entry in environ if entry} & secrets
        warm = "forked from the warm template" in job_dir.log_path.read_text()
        assert warm == (start == "--warm-workers")

        assert os.getpgid(child.pid) == worker_pid == os.getsid(worker_pid)  # the worker's own session and group
        os.kill(worker_pid, signal.SIGKILL)  # the main process only: its child would live on by itself
        wait_for(lambda: gone(child), 60, "the worker's child to be killed with it")
        wait_for(lambda: client.get_job(job.id).retries == 1, 60, "the job to be requeued")

        retry_pid, retry_child = wait_for(lambda: (found := child_of_worker()) and found[0] != worker_pid and found,
                                          120, "the retried worker and its child")
        client.cancel(job.id)  # SIGTERM to the worker's group: its child goes too
        assert client.wait(job.id, timeout=120).state == "cancelled"
        wait_for(lambda: gone(retry_child), 60, "the retried worker's child to be killed by the cancel")
        assert not psutil.pid_exists(retry_pid) or gone(psutil.Process(retry_pid))
    # The cancelled worker ended like any Python program: exit handlers of the job's code ran (trackers
    # finish their runs there); the SIGKILLed one never got to.
    assert (out / f"atexit-{retry_pid}").read_text() == "ran"
    assert not (out / f"atexit-{worker_pid}").exists()
