"""Local launcher: the worker as a subprocess of the server, in its own session and process group.

Its own group means cancel can signal everything the worker started (data loader processes,
compile workers) and a Ctrl-C or crash of the server does not reach the worker; its own session
means the worker survives a server restart and can be re-adopted. When the worker's main process
exits, the rest of its group is killed, so nothing it started outlives the job.

The worker gets a minimal environment (:func:`worker_environment`): what training needs, never the
server's own settings or secrets (its database URL, its API key, whatever else its shell held).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
from collections.abc import Mapping
from pathlib import Path

import psutil

from posttrain.job.directory import JobDir
from posttrain.launchers import Launcher, LaunchRequest, WorkerExit, WorkerHandle
from posttrain.launchers.identity import process_start, recorded_worker_identity

# Variables a worker inherits from the server, by name or by prefix; everything else is dropped.
PASSED_VARIABLES = frozenset({
    "PATH", "HOME", "USER", "LOGNAME", "SHELL", "LANG", "LANGUAGE", "TZ", "TMPDIR", "TERM",
    "PYTHONPATH", "VIRTUAL_ENV", "LD_LIBRARY_PATH", "SSL_CERT_FILE", "SSL_CERT_DIR", "REQUESTS_CA_BUNDLE",
    "CURL_CA_BUNDLE", "HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY", "http_proxy", "https_proxy", "no_proxy",
    "OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "TOKENIZERS_PARALLELISM",
    "CUDA_VISIBLE_DEVICES", "CUDA_HOME", "CUDA_PATH", "PYTORCH_CUDA_ALLOC_CONF",
})
PASSED_PREFIXES = ("LC_", "HF_", "TRANSFORMERS_", "NCCL_", "TORCH_", "XDG_")


def worker_environment(server_env: Mapping[str, str], extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment of a worker: the variables training needs from ``server_env`` plus ``extra``
    (what the job asks for, e.g. its CUDA device or tracker settings)."""
    env = {key: value for key, value in server_env.items()
           if key in PASSED_VARIABLES or key.startswith(PASSED_PREFIXES)}
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra or {})
    return env


def worker_arguments(request: LaunchRequest) -> list[str]:
    """The arguments of ``python -m posttrain.worker`` for one job, however it is started."""
    job_dir = JobDir(request.job_dir)
    argv = ["--spec", str(job_dir.spec_path), "--job-dir", str(job_dir.root), "--no-log-file"]
    return [*argv, "--resume"] if request.resume else argv


def job_environment(request: LaunchRequest) -> dict[str, str]:
    return worker_environment(os.environ, {"POSTTRAIN_JOB_ID": request.job_id, **request.env})


def signal_group(pid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, sig)


def signal_process(pid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.kill(pid, sig)


class LocalWorker(WorkerHandle):
    def __init__(self, process: subprocess.Popen[bytes]) -> None:
        self.process = process
        self.pid = process.pid

    def poll(self) -> WorkerExit | None:
        if self.process.returncode is not None:
            return WorkerExit(self.process.returncode)
        # Look without reaping: while the exited main process is an unreaped zombie its pid (= the group
        # id) cannot be reused, so killing the rest of the group cannot hit anyone else.
        try:
            exited = os.waitid(os.P_PID, self.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
        except ChildProcessError:  # already reaped elsewhere
            exited = True
        if exited is None:
            return None
        signal_group(self.pid, signal.SIGKILL)
        return WorkerExit(self.process.wait())

    def signal(self, sig: int) -> None:
        if self.process.returncode is None:  # not reaped: the pid is still ours
            signal_group(self.pid, sig)

    def signal_main(self, sig: int) -> None:
        if self.process.returncode is None:
            signal_process(self.pid, sig)


class AdoptedWorker(WorkerHandle):
    """A worker started by an earlier server process: watched through psutil, exit code unknown.

    It is identified by pid and start time (identity.process_start: counted from boot, so a step of the
    wall clock changes nothing), so a pid reused after the worker ended is never mistaken for it: it is
    neither reported running nor signalled."""

    def __init__(self, process: psutil.Process, job_dir: Path) -> None:
        self.process = process
        self.pid = process.pid
        self.job_dir = job_dir
        self.started = process_start(process.pid)

    def is_same_process(self) -> bool:
        try:
            return (self.process.is_running() and process_start(self.pid) == self.started
                    and _is_worker_of(self.process, self.job_dir))
        except psutil.Error:
            return False

    def poll(self) -> WorkerExit | None:
        if self.is_same_process():
            return None
        self._kill_leftovers()
        return WorkerExit(None)

    def signal(self, sig: int) -> None:
        if self.is_same_process():
            signal_group(self.pid, sig)

    def signal_main(self, sig: int) -> None:
        if self.is_same_process():
            signal_process(self.pid, sig)

    def _kill_leftovers(self) -> None:
        """Processes still in the worker's group, started after it (so not a group that reuses its id)."""
        for process in psutil.process_iter():
            with contextlib.suppress(psutil.Error, ProcessLookupError, PermissionError):
                if os.getpgid(process.pid) == self.pid and process_start(process.pid) >= self.started:
                    process.kill()


def _is_worker_of(process: psutil.Process, job_dir: Path) -> bool:
    """Whether ``process`` is a live worker of ``job_dir``: one that recorded itself there (a warm start,
    see identity.py) or one whose command line names it (a cold start, from its first instant)."""
    try:
        cmdline = process.cmdline()
        if process.status() == psutil.STATUS_ZOMBIE:
            return False
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return False
    recorded = recorded_worker_identity(job_dir)
    if recorded is not None and recorded.matches(process):
        return True
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
        argv = [*self.worker_command, *worker_arguments(request)]
        env = job_environment(request)
        with open(job_dir.log_path, "ab") as log:
            process = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env,
                cwd=job_dir.root, start_new_session=True,
            )
        return LocalWorker(process)

    def adopt(self, job_dir: Path, pid: int | None) -> WorkerHandle | None:
        job_dir = job_dir.resolve()
        # The pid the store recorded, and the one a warm-started worker recorded in its job directory.
        recorded = recorded_worker_identity(job_dir)
        candidates = dict.fromkeys(p for p in (pid, recorded.pid if recorded else None) if p is not None)
        for candidate in candidates:
            try:
                process = psutil.Process(candidate)
            except psutil.NoSuchProcess:
                continue
            if _is_worker_of(process, job_dir):
                return AdoptedWorker(process, job_dir)
        # The pid may not have been recorded (server killed right after starting the worker):
        # look for any process running this job directory, so a job never runs twice.
        for process in psutil.process_iter():
            if process.pid != os.getpid() and _is_worker_of(process, job_dir):
                return AdoptedWorker(process, job_dir)
        return None
