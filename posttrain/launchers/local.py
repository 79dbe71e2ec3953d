"""Local launcher: the worker as a subprocess of the server, in its own session and process group.

Its own group means cancel can signal everything the worker started (data loader processes,
compile workers) and a Ctrl-C or crash of the server does not reach the worker; its own session
means the worker survives a server restart and can be re-adopted.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
from pathlib import Path

import psutil

from posttrain.jobdir import JobDir
from posttrain.launchers import Launcher, LaunchRequest, WorkerExit, WorkerHandle


def _signal_group(pid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, sig)


class LocalWorker(WorkerHandle):
    def __init__(self, process: subprocess.Popen[bytes]) -> None:
        self.process = process
        self.pid = process.pid

    def poll(self) -> WorkerExit | None:
        code = self.process.poll()
        return None if code is None else WorkerExit(code)

    def signal(self, sig: int) -> None:
        _signal_group(self.pid, sig)


class AdoptedWorker(WorkerHandle):
    """A worker started by an earlier server process: watched through psutil, exit code unknown."""

    def __init__(self, process: psutil.Process) -> None:
        self.process = process
        self.pid = process.pid

    def poll(self) -> WorkerExit | None:
        try:
            if self.process.is_running() and self.process.status() != psutil.STATUS_ZOMBIE:
                return None
        except psutil.NoSuchProcess:
            pass
        return WorkerExit(None)

    def signal(self, sig: int) -> None:
        _signal_group(self.pid, sig)


def _is_worker_of(process: psutil.Process, job_dir: Path) -> bool:
    try:
        cmdline = process.cmdline()
        if process.status() == psutil.STATUS_ZOMBIE:
            return False
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return False
    if "--job-dir" not in cmdline:
        return False
    index = cmdline.index("--job-dir")
    return index + 1 < len(cmdline) and Path(cmdline[index + 1]) == job_dir


class LocalLauncher(Launcher):
    name = "local"

    def __init__(self, worker_command: list[str]) -> None:
        self.worker_command = worker_command

    def launch(self, request: LaunchRequest) -> WorkerHandle:
        job_dir = JobDir(request.job_dir)
        argv = [*self.worker_command, "--spec", str(job_dir.spec_path), "--job-dir", str(job_dir.root),
                "--no-log-file"]
        if request.resume:
            argv.append("--resume")
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "POSTTRAIN_JOB_ID": request.job_id, **request.env}
        with open(job_dir.log_path, "ab") as log:
            process = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env,
                cwd=job_dir.root, start_new_session=True,
            )
        return LocalWorker(process)

    def adopt(self, job_dir: Path, pid: int | None) -> WorkerHandle | None:
        job_dir = job_dir.resolve()
        if pid is not None:
            try:
                process = psutil.Process(pid)
                if _is_worker_of(process, job_dir):
                    return AdoptedWorker(process)
            except psutil.NoSuchProcess:
                pass
        # The pid may not have been recorded (server killed right after starting the worker):
        # look for any process running this job directory, so a job never runs twice.
        for process in psutil.process_iter():
            if process.pid != os.getpid() and _is_worker_of(process, job_dir):
                return AdoptedWorker(process)
        return None

