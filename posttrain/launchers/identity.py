"""Which process is a job's worker: its pid and its start time, recorded in the job directory.

A worker started from the warm template (see :mod:`posttrain.launchers.zygote`) is a forked copy of
that process: its command line is the template's, so it cannot be recognised by ``--job-dir`` the way a
cold-started worker is. It records ``worker-process.json`` itself before it does anything else. A pid
alone could be reused by an unrelated process after the worker ended; together with the process's
start time (from the kernel, as psutil reads it) it names exactly one process for the machine's uptime.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import psutil

from posttrain.job.directory import JobDir, atomic_write_json

IDENTITY_FILE = "worker-process.json"


@dataclass(frozen=True)
class ProcessIdentity:
    pid: int
    create_time: float  # psutil's: the kernel's start time of the process, in seconds since the epoch

    @classmethod
    def of(cls, pid: int) -> ProcessIdentity:
        return cls(pid, psutil.Process(pid).create_time())

    def matches(self, process: psutil.Process) -> bool:
        """Whether ``process`` is this very process (not another that got the same pid later)."""
        try:
            return process.pid == self.pid and process.create_time() == self.create_time
        except psutil.Error:
            return False


def identity_path(job_dir: Path) -> Path:
    return JobDir(job_dir).root / IDENTITY_FILE


def record_worker_identity(job_dir: Path) -> ProcessIdentity:
    """Called by the worker process itself: who it is, durably, before it starts any work."""
    identity = ProcessIdentity.of(os.getpid())
    atomic_write_json(identity_path(job_dir), {"pid": identity.pid, "create_time": identity.create_time})
    return identity


def recorded_worker_identity(job_dir: Path) -> ProcessIdentity | None:
    try:
        payload = json.loads(identity_path(job_dir).read_text())
        return ProcessIdentity(int(payload["pid"]), float(payload["create_time"]))
    except (OSError, ValueError, KeyError, TypeError):
        return None
