"""The scheduler and launchers without a server: races made deterministic with a fake launcher and a real store."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from waiting import wait_for

from posttrain.job.directory import JobDir, JobStatus, StopReceived
from posttrain.launchers import Launcher, LaunchRequest, WorkerExit, WorkerHandle
from posttrain.launchers.identity import recorded_worker_identity
from posttrain.launchers.local import AdoptedWorker, LocalLauncher, worker_environment
from posttrain.service import scheduler as scheduler_module
from posttrain.service.scheduler import Scheduler
from posttrain.service.settings import ServiceSettings
from posttrain.service.store import JobRecord, JobStore


class FakeWorker(WorkerHandle):
    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.exit: WorkerExit | None = None
        self.signals: list[int] = []

    def poll(self) -> WorkerExit | None:
        return self.exit

    def signal(self, sig: int) -> None:
        self.signals.append(sig)

    def signal_main(self, sig: int) -> None:
        self.signals.append(-sig)  # negative: sent to the main process only


class FakeLauncher(Launcher):
    name = "fake"

    def __init__(self) -> None:
        self.launched: list[FakeWorker] = []

    def launch(self, request: LaunchRequest) -> WorkerHandle:
        worker = FakeWorker(100_000 + len(self.launched))
        self.launched.append(worker)
        return worker

    def adopt(self, job_dir: Path, pid: int | None) -> WorkerHandle | None:
        return None


@pytest.fixture
def setup(tmp_path: Path):
    settings = ServiceSettings(data_dir=tmp_path / "data", max_retries=2)
    settings.jobs_dir.mkdir(parents=True)
    store = JobStore(settings.database_url)
    launcher = FakeLauncher()
    yield store, launcher, Scheduler(store, launcher, settings), settings
    store.close()


def add_job(store: JobStore, settings: ServiceSettings, job_id: str = "job-1") -> JobRecord:
    root = settings.jobs_dir / job_id
    JobDir(root).create().write_status(JobStatus(state="queued"))
    now = time.time()
    return store.add_job(JobRecord(id=job_id, owner="alice", name=job_id, method="sft", state="queued", priority=0,
                                   job_dir=str(root), spec_json="{}", step=0, attempt=0, retries=0, resume=False,
                                   cancel_requested=False, created_at=now, updated_at=now))


def test_a_cancel_that_lands_while_a_dead_worker_is_requeued_wins(setup):
    store, launcher, scheduler, settings = setup
    add_job(store, settings)
    scheduler.tick()
    [worker] = launcher.launched
    stale = store.get_job("job-1")  # what the scheduler read before the cancel arrived
    assert stale.state == "running" and not stale.cancel_requested

    assert store.cancel("job-1") == "running"  # the API flags it...
    scheduler._worker_died(stale, "worker was killed by SIGKILL before recording a result")  # ...mid-requeue

    job = store.get_job("job-1")
    assert job.state == "cancelled" and job.retries == 0
    assert JobDir(job.job_dir).read_status().state == "cancelled"
    worker.exit = WorkerExit(-9)
    scheduler.tick()
    assert len(launcher.launched) == 1  # never relaunched
    assert store.get_job("job-1").state == "cancelled"


def test_cancel_of_a_job_requeued_between_the_two_updates_still_cancels(setup):
    store, _launcher, _scheduler, settings = setup
    add_job(store, settings)
    assert store.cancel("job-1") == "cancelled"
    assert store.get_job("job-1").cancel_requested
    assert store.cancel("job-1") is None  # already finished: nothing to cancel


def test_an_end_that_cannot_be_recorded_is_recorded_on_a_later_tick(setup, monkeypatch):
    store, launcher, scheduler, settings = setup
    add_job(store, settings)
    add_job(store, settings, "job-2")
    scheduler.settings.slots = 2
    scheduler.tick()
    first, _second = launcher.launched
    JobDir(settings.jobs_dir / "job-1").update_status(state="succeeded", step=4, total_steps=4)
    first.exit = WorkerExit(0)

    real_finish = store.finish
    calls = []

    def failing_finish(job_id, state, **values):
        calls.append(job_id)
        if len(calls) <= 2:  # when the exit is reaped, and again when the tick settles leftovers
            raise RuntimeError("database hiccup")
        return real_finish(job_id, state, **values)

    monkeypatch.setattr(store, "finish", failing_finish)
    scheduler.tick()  # recording job-1's end fails; job-2 is still watched and synced
    assert store.get_job("job-1").state == "running"
    assert "job-2" in scheduler._running
    scheduler.tick()
    job = store.get_job("job-1")
    assert (job.state, job.step) == ("succeeded", 4)
    assert calls == ["job-1"] * 3


def test_a_running_job_without_a_worker_is_settled_not_left_running(setup):
    store, launcher, scheduler, settings = setup
    add_job(store, settings)
    assert store.claim("job-1", 0)  # 'running' in the store, but no worker here (lost by a failed launch)
    store.cancel("job-1")
    scheduler.tick()
    assert store.get_job("job-1").state == "cancelled"
    assert launcher.launched == []


def test_the_tick_goes_on_when_one_job_cannot_be_synced(setup, monkeypatch):
    store, _launcher, scheduler, settings = setup
    for job_id in ("job-1", "job-2"):
        add_job(store, settings, job_id)
    scheduler.settings.slots = 2
    real = scheduler._sync_one

    def sync(record):
        if record.id == "job-1":
            raise OSError("status.json unreadable")
        return real(record)

    monkeypatch.setattr(scheduler, "_sync_one", sync)
    scheduler.tick()
    JobDir(settings.jobs_dir / "job-2").update_status(state="running", step=3, total_steps=9)
    scheduler._last_sync = 0
    add_job(store, settings, "job-3")
    scheduler.settings.slots = 3
    scheduler.tick()
    assert store.get_job("job-2").step == 3  # synced despite job-1's error
    assert store.get_job("job-3").state == "running"  # and the queue moved on


def test_a_pause_signals_the_main_process_once_and_a_recorded_pause_frees_the_slot(setup):
    store, launcher, scheduler, settings = setup
    add_job(store, settings)
    add_job(store, settings, "job-2")
    scheduler.tick()
    [worker] = launcher.launched
    assert store.pause("job-1") == "running"
    scheduler.tick()
    assert worker.signals == []  # not before the worker says it runs (and so handles the signal)
    JobDir(settings.jobs_dir / "job-1").update_status(state="running", pid=worker.pid)
    scheduler.tick()
    scheduler.tick()
    assert worker.signals == [-signal.SIGUSR1]  # once, and never to the group (helpers may not handle it)
    assert store.pause("job-1") == "running"  # asking again while it is pending changes nothing

    JobDir(settings.jobs_dir / "job-1").update_status(state="paused", step=3, total_steps=9)
    worker.exit = WorkerExit(75)
    scheduler.tick()
    job = store.get_job("job-1")
    assert (job.state, job.step, job.pid, job.pause_requested, job.retries) == ("paused", 3, None, False, 0)
    assert store.get_job("job-2").state == "running"  # the freed slot went to the next job
    assert len(launcher.launched) == 2

    assert store.resume("job-1") and not store.resume("job-1")
    job = store.get_job("job-1")
    assert (job.state, job.resume) == ("queued", True)


def test_a_pause_that_lands_while_a_dead_worker_is_requeued_pauses_it(setup):
    store, _launcher, scheduler, settings = setup
    add_job(store, settings)
    scheduler.tick()
    stale = store.get_job("job-1")
    assert store.pause("job-1") == "running"
    scheduler._worker_died(stale, "worker was killed by SIGKILL")  # read before the pause arrived
    job = store.get_job("job-1")
    assert job.state == "paused" and job.retries == 0 and "while pausing" in job.error
    assert JobDir(job.job_dir).read_status().state == "paused"


def test_a_cancel_wins_over_a_pause_at_every_point(setup):
    store, launcher, scheduler, settings = setup
    add_job(store, settings)
    scheduler.tick()
    [worker] = launcher.launched
    store.cancel("job-1")
    assert store.pause("job-1") is None  # being cancelled: nothing to pause
    scheduler.tick()
    assert worker.signals == [signal.SIGTERM]

    # The worker recorded a pause (the cancel came too late for it): the job still ends cancelled.
    JobDir(settings.jobs_dir / "job-1").update_status(state="paused", step=2)
    worker.exit = WorkerExit(75)
    scheduler.tick()
    assert store.get_job("job-1").state == "cancelled"
    assert JobDir(settings.jobs_dir / "job-1").read_status().state == "cancelled"

    add_job(store, settings, "job-2")
    assert store.pause("job-2") == "paused"  # queued: at once
    assert store.cancel("job-2") == "cancelled"
    assert store.resume("job-2") is False


def test_a_stop_signal_is_sent_again_until_the_worker_acknowledges_it(setup, monkeypatch):
    store, launcher, scheduler, settings = setup
    monkeypatch.setattr(scheduler_module, "SIGNAL_RESEND_S", 0.0)  # again on every tick, not after 2 s
    add_job(store, settings)
    add_job(store, settings, "job-2")
    scheduler.tick()
    [worker] = launcher.launched
    job_dir = JobDir(settings.jobs_dir / "job-1")

    def acknowledge(request: str, pid: int = worker.pid) -> None:
        job_dir.record_stop_received(StopReceived(pid=pid, request=request, signal="SIGTERM"))

    # A pause: never before the worker says it runs; then on every tick until it is acknowledged.
    assert store.pause("job-1") == "running"
    scheduler.tick()
    assert worker.signals == []
    job_dir.update_status(state="running", pid=worker.pid)
    scheduler.tick()
    scheduler.tick()
    acknowledge("pause", pid=worker.pid + 1)  # another process's (an earlier worker's) does not count
    scheduler.tick()
    assert worker.signals == [-signal.SIGUSR1] * 3
    acknowledge("pause")
    scheduler.tick()
    assert worker.signals == [-signal.SIGUSR1] * 3

    # A cancel: the same, and an acknowledged one is never sent again (a second SIGTERM means "at once").
    worker.signals.clear()
    assert store.cancel("job-1") == "running"
    scheduler.tick()
    scheduler.tick()
    assert worker.signals == [signal.SIGTERM] * 2  # the pause's acknowledgement does not cover a cancel
    acknowledge("cancel")
    scheduler.tick()
    assert worker.signals == [signal.SIGTERM] * 2
    # The grace period is over: SIGKILL, on every tick until the worker is gone.
    settings.cancel_grace_s = 0.0
    scheduler.tick()
    scheduler.tick()
    assert worker.signals == [signal.SIGTERM] * 2 + [signal.SIGKILL] * 2

    # The next worker starts without the acknowledgement an earlier attempt left.
    JobDir(settings.jobs_dir / "job-2").record_stop_received(StopReceived(pid=1, request="cancel", signal="SIGTERM"))
    worker.exit = WorkerExit(-signal.SIGKILL)
    scheduler.tick()
    assert store.get_job("job-1").state == "cancelled"
    assert store.get_job("job-2").state == "running"
    assert JobDir(settings.jobs_dir / "job-2").read_stop_received() is None


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="start times from /proc")
def test_a_worker_is_still_recognised_after_the_wall_clock_steps(tmp_path: Path, monkeypatch):
    job_dir = tmp_path / "job"
    job_dir.mkdir()
    # Records its identity as a warm-started worker does (its command line does not name the job dir).
    script = ("import sys, time; from pathlib import Path; from posttrain.launchers.identity import "
              "record_worker_identity; record_worker_identity(Path(sys.argv[1])); time.sleep(120)")
    process = subprocess.Popen([sys.executable, "-c", script, str(job_dir)], start_new_session=True)
    try:
        recorded = wait_for(lambda: recorded_worker_identity(job_dir), 60, "the worker to record its identity")
        # The wall clock steps by a second (NTP, a virtual machine resumed): the boot time psutil adds to
        # every start time moves with it. A real step needs root and would disturb the whole machine.
        real_boot_time = psutil._pslinux.boot_time
        monkeypatch.setattr(psutil._pslinux, "boot_time", lambda: real_boot_time() + 1.0)
        assert psutil.Process(process.pid).create_time() != recorded.create_time  # the step is seen
        assert recorded.matches(psutil.Process(process.pid))
        adopted = LocalLauncher([]).adopt(job_dir, process.pid)
        assert isinstance(adopted, AdoptedWorker) and adopted.poll() is None
        adopted.signal(signal.SIGTERM)
        assert process.wait(30) == -signal.SIGTERM
    finally:
        process.kill()
        process.wait()


def _sleeper(job_dir: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)", "--job-dir", str(job_dir)],
                            start_new_session=True)


def test_an_adopted_worker_is_signalled_only_while_it_is_the_same_process(tmp_path: Path):
    job_dir = tmp_path / "job"
    process = _sleeper(job_dir)
    try:
        adopted = LocalLauncher([]).adopt(job_dir, process.pid)
        assert isinstance(adopted, AdoptedWorker) and adopted.poll() is None
        assert LocalLauncher([]).adopt(tmp_path / "other-job", process.pid) is None

        adopted.started -= 1.0  # as if the pid now belonged to a process started later
        adopted.signal(signal.SIGKILL)
        assert process.poll() is None  # not signalled
        assert adopted.poll() == WorkerExit(None)  # and no longer taken for the worker

        adopted.started += 1.0
        adopted.signal(signal.SIGKILL)
        assert process.wait(30) == -signal.SIGKILL
    finally:
        process.kill()
        process.wait()


def test_when_a_workers_main_process_exits_the_rest_of_its_group_is_killed(tmp_path: Path):
    pid_file = tmp_path / "child.pid"
    # The "worker" starts a child in its own process group, then exits, leaving the child behind.
    script = ("import subprocess, sys; child = subprocess.Popen(['sleep', '120']); "
              f"open({str(pid_file)!r}, 'w').write(str(child.pid))")
    launcher = LocalLauncher([sys.executable, "-c", script])
    job_dir = JobDir(tmp_path / "job").create()
    handle = launcher.launch(LaunchRequest("job-x", job_dir.root))
    exit_info = wait_for(handle.poll, 60, "the worker to exit")
    assert exit_info == WorkerExit(0)
    child = psutil.Process(int(pid_file.read_text()))
    wait_for(lambda: not child.is_running() or child.status() == psutil.STATUS_ZOMBIE, 30, "the child to die")


def test_workers_get_a_minimal_environment():
    server_env = {"PATH": "/usr/bin", "HOME": "/root", "HF_HOME": "/cache/hf", "LC_ALL": "C.UTF-8",
                  "POSTTRAIN_DB": "postgresql://u:secret@db/pt", "POSTTRAIN_API_KEY": "pt-key",
                  "AWS_SECRET_ACCESS_KEY": "x", "DATABASE_URL": "postgres://y", "PYTHONPATH": "/code"}
    env = worker_environment(server_env, {"CUDA_VISIBLE_DEVICES": "1"})
    assert env == {"PATH": "/usr/bin", "HOME": "/root", "HF_HOME": "/cache/hf", "LC_ALL": "C.UTF-8",
                   "PYTHONPATH": "/code", "PYTHONUNBUFFERED": "1", "CUDA_VISIBLE_DEVICES": "1"}


def test_status_writes_sync_the_directory_after_the_rename(tmp_path: Path, monkeypatch):
    synced: list[str] = []
    real_fsync = os.fsync

    def recording_fsync(fd: int) -> None:
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    job_dir = JobDir(tmp_path / "job").create()
    job_dir.update_status(state="running")
    assert synced[-1] == str(job_dir.root)  # the directory, after the file itself
    assert any(path.startswith(str(job_dir.root / ".status.json.")) for path in synced[:-1])
