"""Pause and resume through the service: a real server on loopback, real workers training the tiny model.

A pause stops a running worker at a step boundary with a complete checkpoint and frees its slot; a
resume queues the job again and its next worker continues from that checkpoint.
"""

from __future__ import annotations

import os
import signal
import time

import psutil
import pytest
from service_harness import HeldLog, ServerProcess, frozen, module_server, train_spec, worker_processes
from typer.testing import CliRunner
from waiting import wait_for

from posttrain.client import TERMINAL, Client, ServiceError
from posttrain.commands.jobs import jobs_app
from posttrain.job.directory import COMPLETE_MARKER, JobDir

# Long enough that a pause lands mid-run, short enough to finish when resumed. No periodic checkpoint:
# the only one a paused run has is the one its pause saved.
LONG = {"max_steps": 400, "save_steps": 10_000}
STOPPED = {"paused", *TERMINAL}


@pytest.fixture(scope="module")
def server(request, tmp_path_factory):
    yield from module_server(request, tmp_path_factory, "--slots", "1", "--cancel-grace", "30", clock_step=True)


def job_dir_of(server: ServerProcess, job_id: str) -> JobDir:
    return JobDir(server.data_dir / "jobs" / job_id)


def loss_steps(client: Client, job_id: str) -> list[int]:
    return [record["step"] for record in client.metrics(job_id) if "loss" in record]


def pause_running(client: Client, job_id: str) -> int:
    """Pause a job once it trains; returns the step it paused at."""
    wait_for(lambda: client.get_job(job_id).step >= 3, 120, "the job to train")
    pausing = client.pause(job_id)
    assert pausing.pause_requested and pausing.state in ("running", "paused")
    paused = client.wait(job_id, timeout=120, states=STOPPED)
    assert paused.state == "paused", paused.error
    assert not paused.pause_requested and paused.error is None and paused.finished_at is None
    return paused.step


def test_a_paused_job_keeps_a_checkpoint_of_its_step_and_resume_continues_from_it(server: ServerProcess):
    with server.client() as client:
        job = client.submit(train_spec(**LONG))
        job_dir = job_dir_of(server, job.id)
        step = pause_running(client, job.id)
        assert 3 <= step < 400

        # Stopped at a step boundary, with a complete checkpoint of exactly that step, and no worker left.
        status = job_dir.read_status()
        assert (status.state, status.step) == ("paused", step)
        assert [path.name for path in job_dir.checkpoints()] == [f"checkpoint-{step}"]
        assert (job_dir.latest_checkpoint() / COMPLETE_MARKER).is_file()
        assert not job_dir.final_dir.exists() and not worker_processes(server.data_dir)
        assert client.artifacts(job.id).checkpoints == [f"checkpoint-{step}"]
        assert job.id in [j.id for j in client.list_jobs(state="paused").jobs]
        # The log stream of a paused job ends: no worker writes to it until it is resumed.
        assert any("pausing after the current step" in line for line in client.follow_logs(job.id, tail=50))

        # The slot is free: another job runs to the end while this one is paused.
        other = client.submit(train_spec(max_steps=2))
        assert client.wait(other.id, timeout=180).state == "succeeded"
        assert client.get_job(job.id).state == "paused"

        resumed = client.resume(job.id)
        assert resumed.state in ("queued", "running") and resumed.error is None
        job = client.wait(job.id, timeout=300)
        assert job.state == "succeeded", job.error
        assert (job.step, job.total_steps) == (400, 400)
        assert job.attempt == 2 and job.retries == 0
        assert f"from step {step}" in "\n".join(client.logs(job.id, tail=5000))
        # The step count continued from the pause: every step logged once, 1..400, none twice.
        assert loss_steps(client, job.id) == list(range(1, 401))
        assert job_dir.read_status().state == "succeeded" and job_dir.final_dir.is_dir()


def test_a_pause_at_any_point_of_a_start_pauses_the_job_and_the_next_one_starts(server: ServerProcess):
    """Queued, launching (claimed, its worker not forked yet), just forked (no signal handler yet: SIGUSR1
    would kill it) and running: each paused job ends paused with no worker left and no error, and the next
    job starts. The server sees the wall clock stepped since its workers started (it used to lose the pause
    signal then: it took its own warm-started workers for strangers by their wall-clock start time)."""
    jobs_dir = server.data_dir / "jobs"

    def ends_paused(client: Client, job_id: str) -> None:
        job = client.wait(job_id, timeout=120, states=STOPPED)
        assert (job.state, job.error) == ("paused", None), job.error
        assert JobDir(jobs_dir / job_id).read_status().state == "paused"
        assert not worker_processes(server.data_dir, jobs_dir / job_id)

    with server.client() as client, server.clock_step.stepped():
        with frozen(server.readiness()["warm_template_pid"]):  # the scheduler claims a job, then waits for its fork
            launching = client.submit(train_spec(**LONG))
            wait_for(lambda: client.get_job(launching.id).state == "running", 60, "the job to be claimed")
            queued = client.submit(train_spec(**LONG))
            assert client.pause(queued.id).state == "paused"  # queued: at once
            forked = client.submit(train_spec(**LONG))
            held = HeldLog(jobs_dir / forked.id)
            assert client.pause(launching.id).pause_requested
            assert not (jobs_dir / launching.id / "worker-process.json").exists()  # not forked yet
        ends_paused(client, launching.id)

        # The next job started: its worker is held at its first instant, before it handles any signal.
        worker = wait_for(held.held_worker, 60, "the next job's worker to be forked")
        running = client.submit(train_spec(**LONG))
        assert client.pause(forked.id).pause_requested
        time.sleep(1)  # ticks of the scheduler: none may send SIGUSR1 yet (it would kill the worker)
        assert worker.is_running() and JobDir(jobs_dir / forked.id).read_status().state == "queued"
        held.release()
        ends_paused(client, forked.id)
        received = JobDir(jobs_dir / forked.id).read_stop_received()
        assert (received.pid, received.request, received.signal) == (worker.pid, "pause", "SIGUSR1")
        held.close()

        wait_for(lambda: worker_processes(server.data_dir, jobs_dir / running.id), 60, "the next job's worker")
        assert 3 <= pause_running(client, running.id) < 400
        assert not worker_processes(server.data_dir, jobs_dir / running.id)
        last = client.submit(train_spec(max_steps=2))
        assert client.wait(last.id, timeout=180).state == "succeeded"
        for job in (launching, queued, forked, running):
            assert client.cancel(job.id).state == "cancelled"


def test_pausing_a_queued_job_and_the_transitions_that_make_no_sense(server: ServerProcess):
    with server.client() as client:
        blocker = client.submit(train_spec(max_steps=100_000, save_steps=100_000))
        wait_for(lambda: client.get_job(blocker.id).state == "running", 120, "the first job to start")
        queued = client.submit(train_spec(max_steps=2))

        # A queued job is paused at once, without a worker, and stays paused when a slot frees.
        paused = client.pause(queued.id)
        assert paused.state == "paused" and paused.attempt == 0 and paused.launched_at is None
        assert job_dir_of(server, queued.id).read_status().state == "paused"

        def conflict(call, *words: str) -> None:
            with pytest.raises(ServiceError) as caught:
                call()
            assert caught.value.status_code == 409, caught.value
            for word in words:
                assert word in caught.value.message, caught.value.message

        conflict(lambda: client.pause(queued.id), "already paused", "resume")
        conflict(lambda: client.resume(blocker.id), "is running, not paused")
        conflict(lambda: client.delete(queued.id), "paused", "cancel it before deleting")

        # Resume and pause again while it is still queued: both at once, no worker involved.
        assert client.resume(queued.id).state == "queued"
        conflict(lambda: client.resume(queued.id), "is queued, not paused")
        assert client.pause(queued.id).state == "paused"

        # Cancel wins over a pause: a paused job is cancelled at once.
        cancelled = client.cancel(queued.id)
        assert cancelled.state == "cancelled" and cancelled.launched_at is None
        assert job_dir_of(server, queued.id).read_status().state == "cancelled"
        conflict(lambda: client.resume(queued.id), "already finished (cancelled)")

        client.cancel(blocker.id)
        assert client.wait(blocker.id, timeout=120).state == "cancelled"
        conflict(lambda: client.pause(blocker.id), "already finished (cancelled)")


def test_cli_pause_and_resume(server: ServerProcess, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("POSTTRAIN_SERVER", server.url)
    runner = CliRunner()
    with server.client() as client:
        job = client.submit(train_spec(**LONG))
        wait_for(lambda: client.get_job(job.id).step >= 3, 120, "the job to train")
        paused = runner.invoke(jobs_app, ["pause", job.id, "--wait"])
        assert paused.exit_code == 0 and paused.output.strip() == f"{job.id} paused", paused.output
        listed = runner.invoke(jobs_app, ["list", "--state", "paused"])
        assert job.id in listed.output and "paused" in listed.output
        again = runner.invoke(jobs_app, ["pause", job.id])
        assert again.exit_code == 1 and "already paused" in again.output
        resumed = runner.invoke(jobs_app, ["resume", job.id])
        assert resumed.exit_code == 0 and resumed.output.split()[1] in ("queued", "running"), resumed.output
        assert client.wait(job.id, timeout=300).state == "succeeded"
    help_text = " ".join(runner.invoke(jobs_app, ["pause", "--help"]).output.split())
    assert "saves a complete checkpoint" in help_text and "posttrain jobs resume" in help_text


def test_a_worker_killed_while_its_pause_is_pending_ends_paused_and_resumes(server: ServerProcess):
    with server.client() as client:
        job = client.submit(train_spec(max_steps=400, save_steps=10))
        job_dir = job_dir_of(server, job.id)
        wait_for(job_dir.latest_checkpoint, 120, "a complete checkpoint")
        pid = job_dir.read_status().pid
        # Frozen, the worker cannot act on the pause signal: the pause stays pending until it is killed.
        os.kill(pid, signal.SIGSTOP)
        try:
            assert client.pause(job.id).pause_requested
            wait_for(lambda: f"job {job.id}: SIGUSR1 sent" in server.log(), 60, "the pause signal to be sent")
            checkpoint = job_dir.latest_checkpoint().name
        finally:
            os.kill(pid, signal.SIGKILL)

        paused = client.wait(job.id, timeout=120, states=STOPPED)
        assert paused.state == "paused" and paused.retries == 0, paused.error
        assert "killed by SIGKILL" in paused.error and "while pausing" in paused.error and f"resumes from {checkpoint}" in paused.error
        assert paused.step == int(checkpoint.rsplit("-", 1)[1])
        assert job_dir.read_status().state == "paused"

        client.resume(job.id)
        job = client.wait(job.id, timeout=300)
        assert job.state == "succeeded" and job.error is None, job.error
        assert (job.step, job.attempt, job.retries) == (400, 2, 0)
        assert loss_steps(client, job.id) == list(range(1, 401))


def test_a_cancel_while_a_pause_is_pending_wins(server: ServerProcess):
    with server.client() as client:
        job = client.submit(train_spec(**LONG))
        wait_for(lambda: client.get_job(job.id).step >= 3, 120, "the job to train")
        pid = job_dir_of(server, job.id).read_status().pid
        os.kill(pid, signal.SIGSTOP)  # both requests reach the worker before it can act on either
        try:
            client.pause(job.id)
            wait_for(lambda: f"job {job.id}: SIGUSR1 sent" in server.log(), 60, "the pause signal to be sent")
            assert client.cancel(job.id).cancel_requested
            wait_for(lambda: f"job {job.id}: SIGTERM sent" in server.log(), 60, "the cancel signal to be sent")
        finally:
            os.kill(pid, signal.SIGCONT)
        job = client.wait(job.id, timeout=120, states=STOPPED)
        assert job.state == "cancelled" and job.error is None
        assert not job.pause_requested  # the pause it never acted on is not shown as still pending
        assert job_dir_of(server, job.id).read_status().state == "cancelled"
        assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE


def test_a_paused_job_stays_paused_across_a_server_restart(start_server):
    server = start_server()
    with server.client() as client:
        job = client.submit(train_spec(**LONG))
        step = pause_running(client, job.id)
    server.stop()

    restarted = start_server(data_dir=server.data_dir)
    with restarted.client() as client:
        # The restarted scheduler runs the queue (this job runs to the end) but leaves the paused one be.
        other = client.submit(train_spec(max_steps=2))
        assert client.wait(other.id, timeout=180).state == "succeeded"
        still = client.get_job(job.id)
        assert (still.state, still.step, still.attempt) == ("paused", step, 1)

        client.resume(job.id)
        job = client.wait(job.id, timeout=300)
    assert job.state == "succeeded", job.error
    assert (job.step, job.attempt) == (400, 2)
