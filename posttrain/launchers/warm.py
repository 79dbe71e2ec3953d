"""Warm start: workers forked from a template process that has already imported the training stack.

:class:`WarmLauncher` is the local launcher with a faster start. The server starts the template
(:mod:`posttrain.launchers.zygote`) once, with the same minimal environment workers get, and asks it
to fork each job's worker. Whenever the template cannot do that (still importing, died, refused), the
job starts cold through :class:`~posttrain.launchers.local.LocalLauncher` exactly as before, and a
dead template is restarted. Both paths run the same ``posttrain.worker`` main with the same arguments.

The scheduler thread starts and watches workers; ``/readyz`` asks for :meth:`WarmLauncher.state` from
a request thread, so reading the template's pipe is guarded by a lock (which ``state`` never waits for).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import select
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import IO, Any

import psutil

from posttrain.job.directory import JobDir
from posttrain.launchers import Launcher, LaunchRequest, WorkerExit, WorkerHandle
from posttrain.launchers.identity import process_start
from posttrain.launchers.local import (
    AdoptedWorker,
    LocalLauncher,
    job_environment,
    signal_group,
    signal_process,
    worker_arguments,
    worker_environment,
)

log = logging.getLogger("posttrain.service")
SPAWN_TIMEOUT_S = 60.0
# Libraries that start threads when they are imported would make the template multi-threaded (it then
# refuses to fork and every job starts cold):
# - pyarrow (imported by datasets) loads a jemalloc with an idle background thread. pyarrow allocates
#   with mimalloc, so that jemalloc is unused; its thread is not needed.
# - numpy's OpenBLAS starts a pool of (cores - 1) threads at import unless told to use one. Training runs
#   its matrix work in torch (its own thread pool, started lazily in each worker), so numpy keeps one
#   BLAS thread in warm-started workers; the tests set OMP_NUM_THREADS=1, which hid this.
TEMPLATE_ONLY_ENV = {"JE_ARROW_MALLOC_CONF": "background_thread:false", "OPENBLAS_NUM_THREADS": "1"}


class TemplateError(RuntimeError):
    pass


class WarmTemplate:
    """The server's side of one template process: start it, ask it to fork a worker, collect exits."""

    def __init__(self, log_path: Path, python: str = sys.executable) -> None:
        self.log_path = log_path
        self.ready = False
        self.pid: int | None = None
        self.problem: str | None = None
        self.exits: dict[int, int] = {}  # worker pid -> exit code, reported by the template
        self._pending = b""
        self._replies: dict[int, dict[str, Any]] = {}
        self._next_id = 0
        self._lock = threading.Lock()
        with open(log_path, "ab") as template_log:
            self.process = subprocess.Popen(
                [python, "-m", "posttrain.launchers.zygote"], stdin=subprocess.PIPE,
                stdout=subprocess.PIPE, stderr=template_log, env=worker_environment(os.environ, TEMPLATE_ONLY_ENV),
                start_new_session=True,  # a Ctrl-C of the server's terminal is not for it
                cwd=log_path.parent,  # the data dir: no Python modules there to shadow the ones it imports
            )
        assert self.process.stdout is not None and self.process.stdin is not None
        self._stdout: IO[bytes] = self.process.stdout
        self._stdin: IO[bytes] = self.process.stdin
        os.set_blocking(self._stdout.fileno(), False)

    @property
    def alive(self) -> bool:
        return self.process.poll() is None

    def pump(self, timeout: float = 0.0, wait_for_lock: bool = True) -> bool:
        """Read what the template has written (waiting up to ``timeout``); False at end of file. Without
        ``wait_for_lock``, nothing is read while another thread is reading."""
        if not self._lock.acquire(blocking=wait_for_lock):
            return True
        try:
            return self._pump(timeout)
        finally:
            self._lock.release()

    def _pump(self, timeout: float) -> bool:
        readable, _, _ = select.select([self._stdout], [], [], timeout)
        if not readable:
            return True
        chunk = self._stdout.read()
        if not chunk:
            return chunk is None  # None: nothing more yet; b"": the template closed its end
        self._pending += chunk
        *lines, self._pending = self._pending.split(b"\n")
        for line in lines:
            message = json.loads(line)
            if "exit" in message:
                self.exits[int(message["exit"])] = int(message["code"])
            elif "ready" in message:
                self.ready, self.pid, self.problem = True, int(message["pid"]), message.get("problem")
            else:
                self._replies[int(message["id"])] = message
        return True

    def spawn(self, request: dict[str, Any]) -> tuple[int, float]:
        """Have the template fork a worker; (pid, start time: identity.process_start) once the worker has
        recorded its identity."""
        with self._lock:
            self._next_id += 1
            request_id = self._next_id
            try:
                self._stdin.write((json.dumps({"id": request_id, **request}) + "\n").encode())
                self._stdin.flush()
            except OSError as exc:
                raise TemplateError(f"cannot reach the warm template: {exc}") from None
            deadline = time.monotonic() + SPAWN_TIMEOUT_S
            while request_id not in self._replies:
                if not self._pump(0.05) or time.monotonic() > deadline:
                    raise TemplateError("the warm template exited or did not answer")
            reply = self._replies.pop(request_id)
        if "error" in reply:
            raise TemplateError(reply["error"])
        return int(reply["pid"]), float(reply["started"])

    def close(self) -> None:
        """Stop the template (its end of stdin closes; it exits). Workers it started keep running."""
        with contextlib.suppress(OSError):
            self._stdin.close()
        try:
            self.process.wait(5)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        with self._lock:
            try:  # keep the exits it reported last: its workers' handles still look them up
                while select.select([self._stdout], [], [], 0)[0] and self._pump(0):
                    pass
            except (OSError, ValueError):
                pass
            self._stdout.close()


class WarmWorker(WorkerHandle):
    """A worker forked by the template. The template reports its exit code; once the template is gone,
    the worker is watched like a re-adopted one (by pid and start time; exit code unknown)."""

    def __init__(self, template: WarmTemplate, pid: int, started: float, job_dir: Path) -> None:
        self.template = template
        self.pid = pid
        self.started = started  # identity.process_start(pid), as the worker recorded it
        self.job_dir = job_dir
        self._orphan: AdoptedWorker | None = None

    def poll(self) -> WorkerExit | None:
        with contextlib.suppress(OSError, ValueError):
            self.template.pump()
        if self.pid in self.template.exits:
            return WorkerExit(self.template.exits.pop(self.pid))
        if self.template.alive:
            return None
        # The template died: nobody reports this worker's exit code any more.
        if self._orphan is None:
            try:
                self._orphan = AdoptedWorker(psutil.Process(self.pid), self.job_dir)
            except psutil.NoSuchProcess:
                return WorkerExit(None)
            self._orphan.started = self.started  # never taken for a later process with the same pid
        return self._orphan.poll()

    def _still_ours(self) -> bool:
        """Same pid and start time, zombie included: an unreaped worker still holds its pid and group id."""
        if self.pid in self.template.exits:
            return False
        try:
            return process_start(self.pid) == self.started
        except psutil.Error:
            return False

    def signal(self, sig: int) -> None:
        if self._still_ours():
            signal_group(self.pid, sig)

    def signal_main(self, sig: int) -> None:
        if self._still_ours():
            signal_process(self.pid, sig)


class WarmLauncher(Launcher):
    """Local workers forked from a warm template; cold starts through ``LocalLauncher`` when it cannot."""

    name = "local"

    def __init__(self, worker_command: list[str], log_path: Path) -> None:
        self.cold = LocalLauncher(worker_command)
        # The template runs under the workers' Python (``[python, "-m", "posttrain.worker"]``), which may
        # be another environment than the server's (Llama Stack's, without torch, drives posttrain's).
        self.python = worker_command[0]
        self.log_path = log_path
        self.template: WarmTemplate | None = None
        self._told_not_ready = False
        self.start_template()

    def start_template(self) -> None:
        try:
            self.template = WarmTemplate(self.log_path, self.python)
        except OSError as exc:
            log.warning("cannot start the warm template (%s); workers start cold", exc)
            self.template = None
        self._told_not_ready = False

    def state(self) -> dict[str, Any]:
        template = self.template
        if template is not None and template.alive:
            with contextlib.suppress(OSError, ValueError):
                template.pump(wait_for_lock=False)  # never wait for a fork in progress
        if template is None or not template.alive:
            return {"warm_workers": "restarting"}
        if not template.ready:
            return {"warm_workers": "starting"}
        return {"warm_workers": "ready" if template.problem is None else "unusable", "warm_template_pid": template.pid}

    def launch(self, request: LaunchRequest) -> WorkerHandle:
        template = self._usable_template()
        if template is None:
            return self.cold.launch(request)
        job_dir = JobDir(request.job_dir)
        try:
            pid, started = template.spawn({
                "argv": worker_arguments(request), "env": job_environment(request),
                "job_dir": str(job_dir.root), "log": str(job_dir.log_path),
            })
            return WarmWorker(template, pid, started, job_dir.root)
        except (TemplateError, OSError, ValueError) as exc:
            log.warning("job %s: warm start failed (%s); starting it cold and restarting the warm template",
                        request.job_id, exc)
        self._replace_template()
        # The template may have forked the worker before it failed: never start a second one.
        adopted = self.cold.adopt(request.job_dir, None)
        return adopted if adopted is not None else self.cold.launch(request)

    def _usable_template(self) -> WarmTemplate | None:
        template = self.template
        if template is None:
            return None
        with contextlib.suppress(OSError, ValueError):
            template.pump()
        if not template.alive:
            log.warning("the warm template exited (code %s); restarting it, starting workers cold meanwhile",
                        template.process.returncode)
            self._replace_template()
            return None
        if not template.ready or template.problem is not None:
            if not self._told_not_ready:
                log.info("warm template %s; starting workers cold until it is ready",
                         template.problem or "still importing")
                self._told_not_ready = True
            return None
        return template

    def _replace_template(self) -> None:
        if self.template is not None:
            self.template.close()
        self.start_template()

    def adopt(self, job_dir: Path, pid: int | None) -> WorkerHandle | None:
        return self.cold.adopt(job_dir, pid)

    def close(self) -> None:
        if self.template is not None:
            self.template.close()
            self.template = None
