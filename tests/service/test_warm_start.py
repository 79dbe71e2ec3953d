"""Warm start: workers forked from a template process that has imported the training stack already."""

from __future__ import annotations

import os
import signal
import sys
import threading
from pathlib import Path

import psutil
import pytest
from service_harness import train_spec
from waiting import wait_for

from posttrain.job.directory import JobDir
from posttrain.launchers import LaunchRequest, WorkerExit
from posttrain.launchers.local import LocalLauncher
from posttrain.launchers.warm import WarmLauncher, WarmWorker
from posttrain.launchers.zygote import fork_safety_problem
from posttrain.service.assembly import local_launcher
from posttrain.service.settings import ServiceSettings, default_worker_command

LONG = {"max_steps": 200, "save_steps": 50}


def warm_started(job_dir: JobDir) -> bool:
    return "forked from the warm template" in job_dir.log_path.read_text(errors="replace")


def test_a_job_outlives_its_dead_template_and_the_next_job_starts_cold_until_it_is_back(start_server):
    server = start_server("--slots", "2")
    template_pid = server.readiness()["warm_template_pid"]
    with server.client() as client:
        first = client.submit(train_spec(**LONG))
        first_dir = JobDir(server.data_dir / "jobs" / first.id)
        wait_for(lambda: client.get_job(first.id).step >= 2, 120, "the first job to train")
        worker = psutil.Process(first_dir.read_status().pid)
        assert worker.ppid() == template_pid and warm_started(first_dir)
        # Its own session and process group, not the template's (cancel signals exactly the job's group).
        assert os.getsid(worker.pid) == os.getpgid(worker.pid) == worker.pid != os.getpgid(template_pid)

        os.kill(template_pid, signal.SIGKILL)
        second = client.submit(train_spec())
        second_dir = JobDir(server.data_dir / "jobs" / second.id)
        first = client.wait(first.id, timeout=240)
        second = client.wait(second.id, timeout=240)
    assert first.state == "succeeded", first.error  # its end recorded although nobody reaped it for us
    assert (first.step, first.attempt, first.retries) == (200, 1, 0)
    assert second.state == "succeeded", second.error
    assert not warm_started(second_dir)  # the template was dead: a cold start, not a lost job
    assert "the warm template exited" in server.log()
    restarted = wait_for(lambda: server.readiness().get("warm_template_pid"), 120, "the template to be back")
    assert restarted != template_pid and server.readiness()["warm_workers"] == "ready"


@pytest.mark.parametrize("omp_threads", ["1", None], ids=["OMP_NUM_THREADS=1", "no-thread-settings"])
def test_the_template_forks_single_threaded_and_reports_each_exit_code(tmp_path: Path, monkeypatch,
                                                                       omp_threads: str | None):
    # A server started from a plain shell has no thread settings (the test suite sets OMP_NUM_THREADS=1):
    # numpy's BLAS would then start a thread pool at import, and the template could never fork.
    for name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        monkeypatch.delenv(name, raising=False)
    if omp_threads is not None:
        monkeypatch.setenv("OMP_NUM_THREADS", omp_threads)
    launcher = WarmLauncher(default_worker_command(), tmp_path / "template.log")
    template = launcher.template
    try:
        wait_for(lambda: launcher.state()["warm_workers"] == "ready", 180, "the template's imports")
        # Fork copies only the calling thread; the kernel's count includes native threads (OpenMP, allocators).
        assert len(os.listdir(f"/proc/{template.pid}/task")) == 1
        # It catches no SIGTERM: a forked worker dies of a cancel until it has installed its own handler. A
        # handler inherited from here (an import's) would swallow one: the child resets it, and Python drops
        # a signal whose handler was reset before it ran.
        caught = Path(f"/proc/{template.pid}/status").read_text().split("SigCgt:")[1].split()[0]
        assert not int(caught, 16) & (1 << (signal.SIGTERM - 1))

        job_dir = JobDir(tmp_path / "job").create()
        job_dir.spec_path.write_text("training: {no_such_option: 1}\n")  # rejected input: exit code 2
        handle = launcher.launch(LaunchRequest("job-x", job_dir.root))
        assert isinstance(handle, WarmWorker)
        assert wait_for(handle.poll, 60, "the worker's exit") == WorkerExit(2)
        status = job_dir.read_status()
        assert status.state == "failed" and "training.no_such_option" in status.error
        assert job_dir.log_path.read_text().count("forked from the warm template") == 1  # started once
        assert len(os.listdir(f"/proc/{template.pid}/task")) == 1  # still single-threaded after a fork
    finally:
        launcher.close()
    assert template.process.returncode == 0  # it exits by itself when the server closes its stdin


def test_a_template_with_a_thread_refuses_to_fork():
    stop = threading.Event()
    thread = threading.Thread(target=stop.wait)
    thread.start()
    try:
        problem = fork_safety_problem()
    finally:
        stop.set()
        thread.join()
    assert problem is not None and "threads" in problem


def test_custom_worker_commands_and_the_setting_keep_the_cold_start(tmp_path: Path):
    custom = ServiceSettings(data_dir=tmp_path, worker_command=[sys.executable, "fake_worker.py"])
    off = ServiceSettings(data_dir=tmp_path, warm_workers=False)
    assert not custom.starts_workers_warm and not off.starts_workers_warm
    assert isinstance(local_launcher(custom), LocalLauncher) and isinstance(local_launcher(off), LocalLauncher)
    assert ServiceSettings(data_dir=tmp_path).starts_workers_warm
    assert WarmLauncher.name == LocalLauncher.name  # the same launcher as far as jobs and docs are concerned
