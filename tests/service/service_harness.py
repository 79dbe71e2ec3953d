"""Helpers of the service tests: a real `posttrain serve` process on a free loopback port."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import psutil
from clock_step import ClockStep
from ports import free_port
from waiting import kill_process, stop_process

from posttrain.client import Client
from posttrain.launchers.identity import recorded_worker_identity

STARTUP_TIMEOUT_S = 60
WARM_TIMEOUT_S = 180


class ServerProcess:
    """`python -m posttrain.cli serve` (= `posttrain serve`) as a subprocess; stop() or kill() it."""

    def __init__(self, data_dir: Path, *args: str, api_key: str | None = None,
                 env: dict[str, str] | None = None, clock_step: bool = False) -> None:
        self.data_dir = data_dir
        self.args = list(args)
        self.api_key = api_key
        self.env = env  # added to (or, with None values, removed from) the test's environment
        # clock_step.stepped() makes the server see the wall clock stepped (only with clock_step=True).
        self.clock_step = ClockStep(data_dir.parent / f"{data_dir.name}-clock-step")
        if clock_step:
            self.env = {**self.clock_step.environment(), **(env or {})}
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen[bytes] | None = None
        self.log_path = data_dir.parent / f"{data_dir.name}-server.log"

    def start(self) -> ServerProcess:
        argv = [sys.executable, "-m", "posttrain.cli", "serve", "--port", str(self.port), "--data-dir", str(self.data_dir),
                *self.args]
        log = open(self.log_path, "ab")  # noqa: SIM115 - handed to the child
        env = {**os.environ, **(self.env or {})}
        self.process = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                        env={key: value for key, value in env.items() if value is not None})
        log.close()
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        with Client(self.url, self.api_key, timeout=2) as client:
            while time.monotonic() < deadline:
                if self.process.poll() is not None:
                    raise RuntimeError(f"server exited with {self.process.returncode}:\n{self.log()}")
                if client.ready():
                    break
                time.sleep(0.1)
            else:
                self.kill()
                raise RuntimeError(f"server did not become ready in {STARTUP_TIMEOUT_S}s:\n{self.log()}")
        # With warm start on (the default), tests start jobs from the warm template, as a long-running
        # server does; while it is still importing, jobs would start cold.
        deadline = time.monotonic() + WARM_TIMEOUT_S
        while self.readiness().get("warm_workers") not in (None, "ready"):
            if time.monotonic() > deadline:
                self.kill()
                raise RuntimeError(f"warm template not ready in {WARM_TIMEOUT_S}s:\n{self.log()}")
            time.sleep(0.1)
        return self

    def readiness(self) -> dict[str, Any]:
        return httpx.get(f"{self.url}/readyz", timeout=5).json()

    def client(self, api_key: str | None = None) -> Client:
        return Client(self.url, api_key if api_key is not None else self.api_key)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self) -> None:
        stop_process(self.process, 15)

    def kill(self) -> None:
        """SIGKILL the server only (its workers live in their own sessions and keep running)."""
        kill_process(self.process)


def worker_processes(data_dir: Path, job_dir: Path | None = None) -> list[psutil.Process]:
    """Live worker processes of jobs under ``data_dir`` (started by this test's servers), or of the one
    job in ``job_dir``: cold-started ones by their --job-dir argument, warm-started ones by the identity
    they recorded in their job dir."""
    found: dict[int, psutil.Process] = {}
    prefix = str((job_dir or data_dir).resolve())
    for process in psutil.process_iter():
        with contextlib.suppress(psutil.Error):
            cmdline = process.cmdline()
            if ("posttrain.worker" in cmdline or "posttrain.pipeline" in cmdline) and "--job-dir" in cmdline:
                its_job_dir = cmdline[cmdline.index("--job-dir") + 1]
                if its_job_dir.startswith(prefix) and process.status() != psutil.STATUS_ZOMBIE:
                    found[process.pid] = process
    for one_dir in [job_dir] if job_dir is not None else (data_dir / "jobs").glob("*"):
        recorded = recorded_worker_identity(one_dir)
        with contextlib.suppress(psutil.Error):
            process = psutil.Process(recorded.pid) if recorded is not None else None
            if process is not None and recorded.matches(process) and process.status() != psutil.STATUS_ZOMBIE:
                found[process.pid] = process
    return list(found.values())


@contextlib.contextmanager
def frozen(pid: int) -> Iterator[None]:
    """SIGSTOP a process for the block (the warm template: no worker can be forked meanwhile)."""
    os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(pid, signal.SIGCONT)


class HeldLog:
    """Holds a job's warm-started worker at its first instant: its worker.log made a FIFO nobody reads yet.
    A worker forked from the warm template opens its log right after it has recorded who it is (the server
    knows it from then on) and before it handles any signal; the open blocks until :meth:`release`."""

    def __init__(self, job_dir: Path) -> None:
        self.job_dir = job_dir
        self.fifo = job_dir / "worker.log"
        os.mkfifo(self.fifo)
        self._reader: threading.Thread | None = None

    def held_worker(self) -> psutil.Process | None:
        """The worker, once it was forked and waits at its log (it can go no further)."""
        return next(iter(worker_processes(self.job_dir.parent.parent, self.job_dir)), None)

    def release(self) -> None:
        """Read (and drop) the log until the worker ends: it goes on."""
        def drain() -> None:
            with open(self.fifo, "rb") as log:
                while log.read(1 << 16):
                    pass

        self._reader = threading.Thread(target=drain, daemon=True)
        self._reader.start()

    def close(self) -> None:
        """Once the worker is gone: an ordinary (empty) log again, which the server's log routes can read."""
        if self._reader is not None:
            self._reader.join(timeout=30)
        self.fifo.unlink(missing_ok=True)
        self.fifo.touch()


def kill_workers(data_dir: Path) -> None:
    for process in worker_processes(data_dir):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(process.pid, signal.SIGKILL)


def module_server(request: Any, tmp_path_factory: Any, *args: str, api_key: str | None = None,
                  env: dict[str, str] | None = None, clock_step: bool = False) -> Iterator[ServerProcess]:
    """Body of a module-scoped server fixture (one server shared by a module's tests)."""
    server = ServerProcess(tmp_path_factory.mktemp(request.module.__name__.rsplit(".", 1)[-1]) / "data", *args,
                           api_key=api_key, env=env, clock_step=clock_step)
    server.start()
    yield server
    server.stop()
    kill_workers(server.data_dir)


def write_key_file(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n")
    return path


def train_spec(**training: object) -> dict:
    """A tiny-model SFT job: a few steps on one thread, checkpoints every 2 steps, no trackers."""
    return {
        "training": {"max_steps": 4, "save_steps": 2, "per_device_train_batch_size": 2, "num_threads": 1,
                     "logging_steps": 1, **training},
        "data": {"max_samples": 64},
        "tracking": {"report_to": []},
    }
