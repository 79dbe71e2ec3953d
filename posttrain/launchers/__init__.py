"""Launchers start the worker for one job and hand back a handle the scheduler can watch and stop.

Every launcher ends in the same worker entrypoint (``python -m posttrain.worker``) and the same job
directory; they differ in how the process is started (a local subprocess, torchrun, a cluster job).
The scheduler only sees this interface.
"""

from __future__ import annotations

import signal
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class LaunchRequest:
    job_id: str
    job_dir: Path
    resume: bool = False  # continue from the newest complete checkpoint
    env: dict[str, str] = field(default_factory=dict)  # extra environment (e.g. CUDA_VISIBLE_DEVICES)


@dataclass(frozen=True)
class WorkerExit:
    """How a worker ended. ``code`` is None when it is unknown (a re-adopted worker is not our child)."""

    code: int | None
    gone: bool = False  # no worker was found at all (after a server restart, or an exit that was lost)

    @property
    def signal(self) -> int | None:
        return -self.code if self.code is not None and self.code < 0 else None

    def describe(self) -> str:
        if self.gone:
            return "the worker was no longer running when the server looked for it"
        if self.code is None:
            return "worker exited (exit code unknown: it was re-adopted after a server restart)"
        if self.signal is not None:
            name = signal.Signals(self.signal).name if self.signal in signal.valid_signals() else str(self.signal)
            text = f"worker was killed by {name}"
            if self.signal == signal.SIGKILL:
                text += " (the OS kills with SIGKILL when it runs out of memory)"
            return text
        return f"worker exited with code {self.code}"


class WorkerHandle(ABC):
    """A running worker: its process group can be signalled and its exit polled. Once ``poll`` reports
    the exit, whatever else the worker started in its group (data loader processes, children of user
    code) has been killed too."""

    pid: int

    @abstractmethod
    def poll(self) -> WorkerExit | None:
        """None while the worker runs; how it ended once it has."""

    @abstractmethod
    def signal(self, sig: int) -> None:
        """Send ``sig`` to the worker's whole process group (no error if it is already gone), and only
        while the worker is still the process that was started or adopted (never to a reused pid)."""

    def signal_main(self, sig: int) -> None:
        """Send ``sig`` to the worker's main process only, under the same rule as ``signal``: for requests
        only the worker handles (a pause), which would kill helper processes that do not handle them.
        Launchers whose main process is not the worker itself (it forwards signals) keep this default."""
        self.signal(sig)


class Launcher(ABC):
    name: str

    @abstractmethod
    def launch(self, request: LaunchRequest) -> WorkerHandle:
        """Start the worker for ``request.job_dir`` (which holds spec.json)."""

    @abstractmethod
    def adopt(self, job_dir: Path, pid: int | None) -> WorkerHandle | None:
        """Find a worker of ``job_dir`` that outlived a previous server; None if there is none."""

    def state(self) -> dict[str, Any]:
        """What ``/readyz`` reports about the launcher (e.g. whether warm starts are ready)."""
        return {}

    def close(self) -> None:  # noqa: B027 - most launchers hold nothing
        """Release what the launcher holds when the server stops; running workers keep running."""
