"""Run a set of cooperating child processes as one: start in order, wait for each to be healthy, watch them,
and stop every one of them (and whatever they started) when the run ends, fails or is interrupted.

Each child runs in its own session, so a Ctrl-C in the terminal reaches only the supervisor, which then stops
the children itself, in reverse start order: SIGTERM to the child's process group, SIGKILL after a grace
period. Processes a child started in sessions of their own (a trainer restarting its inference server) are
found through the process tree before anything is signalled and stopped the same way, so none is left behind.
Ports the children listen on are checked free before the start and again after the stop.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import psutil

from posttrain.errors import PosttrainError
from posttrain.ports import port_in_use

# What a child exiting with status 0 means: the run is complete (the trainer), nothing (an environment that
# has produced all the data it was asked for), or a failure (a server must never stop by itself).
ExitZero = Literal["ends_run", "allowed", "failure"]
Report = Callable[[str], None]


class SupervisorError(PosttrainError):
    """A child could not be started, never became healthy, or failed."""


class Interrupted(BaseException):  # like KeyboardInterrupt: raised by a signal, not an error
    """SIGTERM (or SIGINT) reached the supervisor."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


@dataclass
class ChildSpec:
    """One child process of the run."""

    name: str
    command: list[str]
    log_path: Path
    # True once the child serves (polled while it starts); None: healthy as soon as it runs.
    health: Callable[[], bool] | None = None
    exit_zero: ExitZero = "failure"
    ports: tuple[tuple[str, int], ...] = ()  # (host, port) it listens on: must be free before, freed after
    env: dict[str, str] = field(default_factory=dict)
    cwd: Path | None = None
    start_timeout: float = 600.0
    # False: start the next child right away and wait for this one's health together with the next's (a slow
    # starter that the next one waits for itself anyway, as environments wait for the trainer to register).
    ready_before_next: bool = True


@dataclass
class Child:
    spec: ChildSpec
    process: subprocess.Popen
    started_at: float
    healthy_at: float | None = None
    exit_code: int | None = None


@dataclass
class Outcome:
    """How the run ended: ``completed`` (a child that ends the run exited 0), ``failed`` or ``interrupted``."""

    state: Literal["completed", "failed", "interrupted"]
    message: str
    exit_code: int


def log_tail(path: Path, lines: int = 20) -> str:
    try:
        with open(path, "rb") as handle:
            handle.seek(0, os.SEEK_END)
            handle.seek(max(0, handle.tell() - 16384))
            text = handle.read().decode(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


class Supervisor:
    """Start ``children`` in order and watch them until the run completes, one fails, or a signal arrives.

    ``progress`` (optional) returns a status line; it is reported every ``progress_interval`` seconds when it
    changed. Everything the supervisor has to say goes through ``report``.
    """

    def __init__(
        self,
        children: list[ChildSpec],
        report: Report = print,
        progress: Callable[[], str | None] | None = None,
        progress_interval: float = 5.0,
        stop_grace: float = 15.0,
        poll_interval: float = 0.2,
    ) -> None:
        names = [spec.name for spec in children]
        if len(set(names)) != len(names):
            raise SupervisorError(f"child names must be unique, got {names}")
        self.specs = children
        self.report = report
        self.progress = progress
        self.progress_interval = progress_interval
        self.stop_grace = stop_grace
        self.poll_interval = poll_interval
        self.children: list[Child] = []
        self._stopping = False  # stop_all has begun
        self._hurry = False  # a second signal: kill instead of waiting out the grace period
        self._starting_child = False
        self._pending_signal: int | None = None

    # -- the whole run --------------------------------------------------------------------------------------
    def run(self) -> Outcome:
        """Start, watch, stop. Always stops every child before returning (or before an exception leaves)."""
        outcome: Outcome | None = None
        previous = {signum: signal.signal(signum, self._on_signal) for signum in (signal.SIGTERM, signal.SIGINT)}
        try:
            try:
                self.check_ports_free()
                for spec in self.specs:
                    self.start(spec)
                    if spec.ready_before_next:
                        self.wait_all_healthy()
                self.wait_all_healthy()
                outcome = self.watch()
            except Interrupted as stop:
                outcome = Outcome("interrupted", f"stopped by {stop}", 128 + stop.signum)
            except SupervisorError as exc:
                outcome = Outcome("failed", exc.message, 1)
        finally:
            self._stopping = True  # from here on a signal only hurries the stop along
            try:
                self.stop_all()
            finally:
                for signum, old in previous.items():
                    signal.signal(signum, old)
        self.report_ports_freed()
        return outcome

    def _on_signal(self, signum: int, _frame: object) -> None:
        if self._stopping:
            self._hurry = True
            self.report(f"{signal.Signals(signum).name} again: killing what is left")
        elif self._starting_child:
            self._pending_signal = signum  # raised once the new child is on the list of children to stop
        else:
            raise Interrupted(signum)

    def check_ports_free(self) -> None:
        for spec in self.specs:
            for host, port in spec.ports:
                if port_in_use(host, port):
                    raise SupervisorError(f"{spec.name}: port {port} on {host} is already in use by another "
                                          "process; stop it or choose another port")

    # -- starting ---------------------------------------------------------------------------------------------
    def start(self, spec: ChildSpec) -> Child:
        spec.log_path.parent.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"), "PYTHONUNBUFFERED": "1",
               **spec.env}
        self._starting_child = True  # a signal now must not leave a started process off self.children
        try:
            with open(spec.log_path, "ab") as log:
                try:
                    process = subprocess.Popen(
                        spec.command, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env,
                        cwd=spec.cwd, start_new_session=True,  # its own process group: a terminal Ctrl-C skips it
                    )
                except OSError as exc:
                    raise SupervisorError(f"{spec.name}: cannot start {spec.command[0]}: {exc}") from None
            child = Child(spec, process, time.monotonic())
            self.children.append(child)
        finally:
            self._starting_child = False
        if self._pending_signal is not None:
            raise Interrupted(self._pending_signal)
        self.report(f"started {spec.name} (pid {process.pid}), log: {spec.log_path}")
        return child

    def wait_all_healthy(self) -> None:
        """Wait for every started child that is not yet healthy, in start order."""
        for child in self.children:
            if child.healthy_at is None:
                self.wait_healthy(child)

    def wait_healthy(self, child: Child) -> None:
        """Until ``child`` is healthy; fails when it or any earlier child exits, or on its start timeout."""
        spec = child.spec
        deadline = child.started_at + spec.start_timeout
        while True:
            self.check_children()
            if spec.health is None or self._probe(spec.health):
                child.healthy_at = time.monotonic()
                self.report(f"{spec.name} is ready ({child.healthy_at - child.started_at:.1f} s)")
                return
            if time.monotonic() > deadline:
                raise SupervisorError(f"{spec.name} did not become ready within {spec.start_timeout:.0f} s "
                                      f"(log {spec.log_path}):\n{log_tail(spec.log_path)}")
            time.sleep(self.poll_interval)

    @staticmethod
    def _probe(health: Callable[[], bool]) -> bool:
        try:
            return bool(health())
        except Exception:  # a probe that cannot connect yet just means "not yet"
            return False

    # -- watching ---------------------------------------------------------------------------------------------
    def check_children(self) -> Outcome | None:
        """Note children that exited: an Outcome when one ended the run, SupervisorError when one failed."""
        for child in self.children:
            if child.exit_code is not None:
                continue
            code = child.process.poll()
            if code is None:
                continue
            child.exit_code = code
            spec = child.spec
            if code == 0 and spec.exit_zero == "ends_run":
                return Outcome("completed", f"{spec.name} finished", 0)
            if code == 0 and spec.exit_zero == "allowed":
                self.report(f"{spec.name} finished (exit 0)")
                continue
            how = f"exited with status {code}" if code >= 0 else f"was killed by {signal.Signals(-code).name}"
            raise SupervisorError(f"{spec.name} {how} (log {spec.log_path}):\n{log_tail(spec.log_path)}")
        return None

    def watch(self) -> Outcome:
        last_line, last_report = None, 0.0
        while True:
            outcome = self.check_children()
            if outcome is not None:
                return outcome
            now = time.monotonic()
            if self.progress is not None and now - last_report >= self.progress_interval:
                line = self._progress_line()
                if line and line != last_line:
                    self.report(line)
                    last_line = line
                last_report = now
            time.sleep(self.poll_interval)

    def _progress_line(self) -> str | None:
        try:
            return self.progress() if self.progress else None
        except Exception as exc:  # a progress view must never take the run down
            return f"(progress unavailable: {exc})"

    # -- stopping ---------------------------------------------------------------------------------------------
    def stop_all(self) -> None:
        """Stop every child, the last started first, each with its whole process tree."""
        for child in reversed(self.children):
            self.stop(child)

    def stop(self, child: Child) -> None:
        process = child.process
        # The tree first: once the child is gone its children are re-parented and can no longer be found.
        try:
            tree = psutil.Process(process.pid).children(recursive=True)
        except psutil.Error:
            tree = []
        if process.poll() is None:
            self.report(f"stopping {child.spec.name} (pid {process.pid})")
        self._signal_group(process.pid, signal.SIGTERM)
        for extra in tree:
            with contextlib.suppress(psutil.Error):
                extra.terminate()
        deadline = time.monotonic() + self.stop_grace
        while time.monotonic() < deadline and not self._hurry:
            if process.poll() is not None and not any(_running(p) for p in tree):
                break
            time.sleep(0.1)
        if process.poll() is None or any(_running(p) for p in tree):
            self.report(f"{child.spec.name} did not stop within {self.stop_grace:.0f} s: killing it")
            self._signal_group(process.pid, signal.SIGKILL)
            for extra in tree:
                with contextlib.suppress(psutil.Error):
                    extra.kill()
        process.wait()
        psutil.wait_procs(tree, timeout=5)
        if child.exit_code is None:
            child.exit_code = process.returncode

    @staticmethod
    def _signal_group(pgid: int, signum: int) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pgid, signum)

    def report_ports_freed(self) -> None:
        busy = [f"{spec.name} {host}:{port}" for spec in self.specs for host, port in spec.ports
                if port_in_use(host, port)]
        if busy:
            self.report(f"warning: still in use after the stop: {', '.join(busy)}")


def _running(process: psutil.Process) -> bool:
    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False
