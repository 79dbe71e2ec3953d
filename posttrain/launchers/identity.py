"""Which process is a job's worker: its pid and its start time, recorded in the job directory.

A worker started from the warm template (see :mod:`posttrain.launchers.zygote`) is a forked copy of
that process: its command line is the template's, so it cannot be recognised by ``--job-dir`` the way a
cold-started worker is. It records ``worker-process.json`` itself before it does anything else. A pid
alone could be reused by an unrelated process after the worker ended; together with the process's
start time it names exactly one process for the machine's uptime.

The start time is the kernel's, counted from boot (:func:`process_start`), never a wall-clock time:
psutil's ``create_time()`` adds the boot time as the wall clock puts it *now*, and that moves whenever
the clock is stepped (NTP, a virtual machine resumed). Two readings of one process then differ, and a
server comparing them would take its own worker for a stranger: never signal it (a cancel lost for
good) and never re-adopt it after a restart.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import psutil

from posttrain.job.directory import JobDir, atomic_write_json

IDENTITY_FILE = "worker-process.json"
CLOCK_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def process_start(pid: int) -> float:
    """When process ``pid`` started, in seconds after the machine booted; the same number in every process
    that asks, whatever the wall clock did meanwhile. psutil.NoSuchProcess when there is no such process.

    On Linux: field 22 of /proc/PID/stat (start time in clock ticks since boot). psutil keeps that value
    only behind a private name, so it is read here. Elsewhere psutil's create_time() stands in for it."""
    if not sys.platform.startswith("linux"):
        return psutil.Process(pid).create_time()
    try:
        stat = Path(f"/proc/{pid}/stat").read_bytes()
    except (FileNotFoundError, ProcessLookupError):
        raise psutil.NoSuchProcess(pid) from None
    # The command name (field 2) is in parentheses and may hold spaces or parentheses itself.
    fields = stat[stat.rindex(b")") + 2:].split()
    return int(fields[19]) / CLOCK_TICKS


@dataclass(frozen=True)
class ProcessIdentity:
    pid: int
    started: float | None  # process_start(pid); None in a record written by posttrain before it had it
    create_time: float | None = None  # psutil's (wall clock): what those earlier records compare

    @classmethod
    def of(cls, pid: int) -> ProcessIdentity:
        return cls(pid, process_start(pid), psutil.Process(pid).create_time())

    def matches(self, process: psutil.Process) -> bool:
        """Whether ``process`` is this very process (not another that got the same pid later)."""
        try:
            if process.pid != self.pid:
                return False
            if self.started is not None:
                return process_start(self.pid) == self.started
            return process.create_time() == self.create_time
        except psutil.Error:
            return False


def identity_path(job_dir: Path) -> Path:
    return JobDir(job_dir).root / IDENTITY_FILE


def record_worker_identity(job_dir: Path) -> ProcessIdentity:
    """Called by the worker process itself: who it is, durably, before it starts any work."""
    identity = ProcessIdentity.of(os.getpid())
    atomic_write_json(identity_path(job_dir), {"pid": identity.pid, "started": identity.started,
                                               "create_time": identity.create_time})
    return identity


def recorded_worker_identity(job_dir: Path) -> ProcessIdentity | None:
    try:
        payload = json.loads(identity_path(job_dir).read_text())
        started, create_time = payload.get("started"), payload.get("create_time")
        if started is None and create_time is None:
            return None
        return ProcessIdentity(int(payload["pid"]), None if started is None else float(started),
                               None if create_time is None else float(create_time))
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None
