"""Scheduler: starts queued jobs in free slots, watches their workers, stops them, recovers after a restart.

One background thread owns every worker handle; request threads only write the store (submit, cancel
flag) and wake it. Order: higher priority first, then first come first served. A worker that dies
without recording a result (SIGKILL, OOM, server restart) is requeued to resume from its newest
complete checkpoint, at most ``max_retries`` times, then the job fails with the reason. Errors are handled
per job: one job that cannot be polled, synced or recorded never stops the tick, and a job the store
calls running without a worker here is settled on the next tick, so no job stays running for ever.
A cancel always wins over a retry (the requeue is conditional on no cancel having been requested).

A cancel (``cancel_requested``) sends the worker's process group SIGTERM; the worker stops at the next
step boundary and records ``cancelled``. A pause (``pause_requested``) sends the worker's main process
SIGUSR1 once the worker says it runs (before, SIGUSR1 would kill it); the worker saves a complete
checkpoint at the next step boundary, records ``paused`` and exits, and the job becomes ``paused`` with
its slot freed. A worker that dies while a pause is pending is paused too (never retried), to resume
from its newest complete checkpoint. A pause is never escalated to a kill, and a cancel wins over it.

No stop request is signalled only once: the worker acknowledges the one it received (``stop-received.json``,
see :mod:`posttrain.job.signals`), and every tick sends the signal again, at most every ``SIGNAL_RESEND_S``,
while the live worker has not acknowledged it. An acknowledged cancel is never sent again (the worker
takes a second SIGTERM for "stop at once"); ``cancel_grace_s`` after the first attempt the group gets
SIGKILL, and again on every tick until the worker is gone.

A server only runs and recovers jobs whose directory is under its own data dir, so several servers
(each with its own data dir) can share one PostgreSQL database without touching each other's jobs.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from posttrain.job.directory import JobDir, JobStatus
from posttrain.job.signals import PAUSE_SIGNAL
from posttrain.launchers import Launcher, LaunchRequest, WorkerExit, WorkerHandle
from posttrain.service.settings import ServiceSettings
from posttrain.service.store import JobRecord, JobStore

log = logging.getLogger("posttrain.service")
PROGRESS_SYNC_S = 1.0
# How long an unacknowledged stop signal waits before it is sent again. Not every tick: a worker busy in
# one long native call runs its handler (and acknowledges) only when that call returns; a signal sent
# again meanwhile merges with the pending one, but one sent just as the handler ran would be a second.
SIGNAL_RESEND_S = 2.0


@dataclass
class _Running:
    handle: WorkerHandle
    slot: int
    cancel_since: float | None = None  # first attempt to stop it (the grace period counts from here)
    term_sent_at: float | None = None  # last SIGTERM
    kill_sent: bool = False
    pause_sent_at: float | None = None  # last SIGUSR1


class Scheduler:
    def __init__(self, store: JobStore, launcher: Launcher, settings: ServiceSettings) -> None:
        self.store = store
        self.launcher = launcher
        self.settings = settings
        self._running: dict[str, _Running] = {}
        # Workers that ended but whose end is not recorded yet (the store failed): retried every tick.
        self._exits: dict[str, WorkerExit] = {}
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._last_sync = 0.0
        self._mine = str(settings.jobs_dir)  # the jobs this server runs

    # -- lifecycle ----------------------------------------------------------------------------------
    def start(self) -> None:
        self.recover()
        self._thread = threading.Thread(target=self._loop, name="posttrain-scheduler", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop scheduling. Workers keep running in their own sessions; the next server re-adopts them."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=10)

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def wake(self) -> None:
        self._wake.set()

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.tick()
            except Exception:  # the loop must outlive a database hiccup
                log.exception("scheduler tick failed; retrying")
            self._wake.wait(self.settings.poll_interval_s)
            self._wake.clear()

    def tick(self) -> None:
        """One pass. Each job is handled on its own: an error with one job is logged and retried on the
        next tick, and never stops the others (or the queue) from moving."""
        self._reap()
        records = {record.id: record for record in self.store.jobs_in_state("running", self._mine)}
        self._settle_orphans(records)
        if self._running:
            self._stop_cancelled(records)
            self._pause_requested(records)
            self._sync_progress(records)
        self._fill_slots()

    def _each(self, what: str, job_id: str, action: Callable[[], object]) -> None:
        try:
            action()
        except Exception:
            log.exception("job %s: %s failed; retrying on the next tick", job_id, what)

    # -- recovery -----------------------------------------------------------------------------------
    def recover(self) -> None:
        """Reconcile jobs the store says are running with what is actually running."""
        for record in self.store.jobs_in_state("running", self._mine):
            self._each("recovery", record.id, lambda record=record: self._reconcile(record, None))

    def _reconcile(self, record: JobRecord, exit_info: WorkerExit | None) -> None:
        """A job the store calls running that has no worker handle here: re-adopt its worker if one is
        still alive, else record how it ended (a terminal state, a cancel, or a retry)."""
        job_dir = Path(record.job_dir)
        handle = self.launcher.adopt(job_dir, record.pid) if exit_info is None else None
        if handle is not None:
            log.info("re-adopted worker pid %s of job %s", handle.pid, record.id)
            used = {running.slot for running in self._running.values()}
            slot = record.slot if record.slot is not None and record.slot not in used else self._free_slot()
            self.store.update_job(record.id, pid=handle.pid, slot=slot)
            self._running[record.id] = _Running(handle, slot if slot is not None else -1)
            return
        self._on_exit(record, exit_info or WorkerExit(None, gone=True))

    def _settle_orphans(self, records: dict[str, JobRecord]) -> None:
        """Running jobs without a worker handle: ones whose end could not be recorded before, or whose
        recovery failed. They are settled here, so no job stays 'running' for ever."""
        for job_id, record in records.items():
            if job_id in self._running:
                continue
            exit_info = self._exits.get(job_id)
            self._each("recording its end", job_id, lambda r=record, e=exit_info: self._reconcile(r, e))
        for job_id in list(self._exits):
            if job_id not in records or job_id in self._running:
                self._exits.pop(job_id, None)

    # -- steps of a tick ----------------------------------------------------------------------------
    def _reap(self) -> None:
        for job_id, running in list(self._running.items()):
            try:
                exit_info = running.handle.poll()
            except Exception:
                log.exception("job %s: cannot poll its worker", job_id)
                continue
            if exit_info is None:
                continue
            del self._running[job_id]
            self._exits[job_id] = exit_info  # until the end is recorded (below, or by _settle_orphans)
            self._each("recording its end", job_id, lambda job_id=job_id, exit_info=exit_info:
                       self._record_exit(job_id, exit_info))

    def _record_exit(self, job_id: str, exit_info: WorkerExit) -> None:
        record = self.store.get_job(job_id)
        if record is not None and record.state == "running":
            self._on_exit(record, exit_info)
        self._exits.pop(job_id, None)

    def _on_exit(self, record: JobRecord, exit_info: WorkerExit) -> None:
        job_dir = JobDir(record.job_dir)
        status = job_dir.read_status()
        state = status.state if status is not None else None
        if state == "succeeded":
            self._finish(record, "succeeded", None, status)
        elif record.cancel_requested:
            if state != "cancelled":  # killed before it could record it itself
                status = note_status(job_dir, record.id, state="cancelled", pid=None) or status
            self._finish(record, "cancelled", None, status)
        elif state in ("failed", "cancelled"):
            # The worker recorded its own end (bad input, an exception, an outside SIGTERM).
            error = status.error if status is not None else None
            self._finish(record, state, error or exit_info.describe(), status)
        elif state == "paused" or record.pause_requested:
            # Paused by itself, or killed while pausing: either way it resumes from its newest checkpoint.
            self._paused(record, None if state == "paused" else exit_info.describe() + " while pausing")
        else:
            self._worker_died(record, exit_info.describe() + " before recording a result")
        self._exits.pop(record.id, None)

    def _finish(self, record: JobRecord, state: str, error: str | None, status: JobStatus | None) -> None:
        values: dict[str, object] = {"error": error}
        if status is not None:
            values.update(step=status.step, total_steps=status.total_steps)
        self.store.finish(record.id, state, **values)
        log.info("job %s %s%s", record.id, state, f": {error}" if error else "")

    def _worker_died(self, record: JobRecord, reason: str) -> None:
        job_dir = JobDir(record.job_dir)
        if record.retries >= self.settings.max_retries:
            error = reason if record.retries == 0 else f"{reason}; gave up after {record.retries} retries"
            note_status(job_dir, record.id, state="failed", error=error, pid=None)
            self._finish(record, "failed", error, job_dir.read_status())
            return
        retry = record.retries + 1
        checkpoint = job_dir.latest_checkpoint()
        where = f"resuming from {checkpoint.name}" if checkpoint else "restarting from the beginning"
        note = f"{reason}; requeued, {where} (retry {retry} of {self.settings.max_retries})"
        # Conditional: a cancel that landed since the record was read wins over the retry; a pause that
        # landed pauses the job instead.
        if not self.store.requeue(record.id, error=note, retries=retry, resume=True, pid=None, slot=None):
            current = self.store.get_job(record.id)
            if current is not None and current.state == "running":
                if current.pause_requested and not current.cancel_requested:
                    self._paused(current, reason + " while pausing")
                    return
                status = note_status(job_dir, record.id, state="cancelled", pid=None)
                self._finish(current, "cancelled", None, status)
            return
        note_status(job_dir, record.id, state="queued", error=note, pid=None)
        log.warning("job %s: %s", record.id, note)

    def _paused(self, record: JobRecord, reason: str | None) -> None:
        """Record a stopped worker's job as paused. ``reason`` says how it ended when it did not record the
        pause itself (killed while pausing): its step is then that of the checkpoint it will resume from."""
        job_dir = JobDir(record.job_dir)
        status = job_dir.read_status()
        checkpoint = job_dir.latest_checkpoint()
        values: dict[str, object] = {"error": None}
        if reason is not None:
            where = f"it resumes from {checkpoint.name}" if checkpoint else "it restarts from the beginning"
            values.update(error=f"{reason}; {where}", step=job_dir.checkpoint_step(checkpoint) if checkpoint else 0)
        elif status is not None:
            values.update(step=status.step)
        if status is not None:
            values.update(total_steps=status.total_steps)
        if not self.store.mark_paused(record.id, **values):
            # A cancel landed since the record was read: it wins.
            current = self.store.get_job(record.id)
            if current is not None and current.state == "running":
                self._finish(current, "cancelled", None, note_status(job_dir, record.id, state="cancelled", pid=None))
            return
        note_status(job_dir, record.id, state="paused", pid=None, **values)
        log.info("job %s paused at step %s%s", record.id, values.get("step"), f": {reason}" if reason else "")

    def _pause_requested(self, records: dict[str, JobRecord]) -> None:
        now = time.monotonic()
        for job_id, running in list(self._running.items()):
            record = records.get(job_id)
            if record is None or not record.pause_requested or record.cancel_requested:
                continue
            self._each("pausing it", job_id, lambda job_id=job_id, running=running, record=record:
                       self._signal_pause(job_id, running, record, now))

    def _signal_pause(self, job_id: str, running: _Running, record: JobRecord, now: float) -> None:
        # Not before the worker handles the signal: it installs its handler before it records 'running'
        # with its pid, and until then SIGUSR1's default action would kill it. The pause stays pending.
        job_dir = JobDir(record.job_dir)
        status = job_dir.read_status()
        if status is None or status.state != "running" or status.pid != running.handle.pid:
            return
        if _acknowledged(job_dir, running, ("pause", "cancel")) or not _due(running.pause_sent_at, now):
            return
        # The main process only: the worker handles the signal, its helper processes might not (and die of it).
        running.handle.signal_main(PAUSE_SIGNAL)
        again = running.pause_sent_at is not None
        running.pause_sent_at = now
        if again:
            log.warning("job %s: %s sent again to worker %s (not acknowledged)", job_id, PAUSE_SIGNAL.name,
                        running.handle.pid)
        else:
            log.info("job %s: %s sent to worker %s", job_id, PAUSE_SIGNAL.name, running.handle.pid)

    def _stop_cancelled(self, records: dict[str, JobRecord]) -> None:
        now = time.monotonic()
        for job_id, running in list(self._running.items()):
            record = records.get(job_id)
            if record is None or not record.cancel_requested:
                continue
            self._each("stopping it", job_id, lambda job_id=job_id, running=running, record=record:
                       self._signal_cancel(job_id, running, record, now))

    def _signal_cancel(self, job_id: str, running: _Running, record: JobRecord, now: float) -> None:
        if running.cancel_since is None:
            running.cancel_since = now
        if now - running.cancel_since >= self.settings.cancel_grace_s:
            # Every tick until the worker is gone: a kill that did not land is never the last word.
            running.handle.signal(signal.SIGKILL)
            if not running.kill_sent:
                running.kill_sent = True
                log.warning("job %s: worker did not stop within %.0fs of the cancel; SIGKILL sent", job_id,
                            self.settings.cancel_grace_s)
            return
        if _acknowledged(JobDir(record.job_dir), running, ("cancel",)) or not _due(running.term_sent_at, now):
            return
        # The worker stops at the next step boundary and records "cancelled" itself.
        running.handle.signal(signal.SIGTERM)
        again = running.term_sent_at is not None
        running.term_sent_at = now
        if again:
            log.warning("job %s: SIGTERM sent again to worker group %s (not acknowledged)", job_id,
                        running.handle.pid)
        else:
            log.info("job %s: SIGTERM sent to worker group %s", job_id, running.handle.pid)

    def _sync_progress(self, records: dict[str, JobRecord]) -> None:
        now = time.time()
        if now - self._last_sync < PROGRESS_SYNC_S:
            return
        self._last_sync = now
        for job_id in list(self._running):
            record = records.get(job_id)
            if record is not None:
                self._each("syncing its progress", job_id, lambda record=record: self._sync_one(record))

    def _sync_one(self, record: JobRecord) -> None:
        status = JobDir(record.job_dir).read_status()
        if status is not None and (status.step, status.total_steps) != (record.step, record.total_steps):
            self.store.update_job(record.id, step=status.step, total_steps=status.total_steps)

    def _free_slot(self) -> int | None:
        used = {running.slot for running in self._running.values()}
        return next((slot for slot in range(self.settings.slots) if slot not in used), None)

    def _fill_slots(self) -> None:
        used = {running.slot for running in self._running.values()}
        free = [slot for slot in range(self.settings.slots) if slot not in used]
        if not free:
            return
        for record, slot in zip(self.store.next_queued(len(free), self._mine), free, strict=False):
            self._each("starting it", record.id, lambda record=record, slot=slot: self._launch(record, slot))

    def _launch(self, record: JobRecord, slot: int) -> None:
        job_dir = JobDir(record.job_dir)
        # A retried job always resumes: the worker continues from the newest complete checkpoint, or
        # from the start when there is none, and clears checkpoints a crash left incomplete.
        resume = record.resume
        if not self.store.claim(record.id, slot):
            return  # cancelled (or claimed elsewhere) since we listed it
        with contextlib.suppress(OSError):  # an earlier attempt's; this worker acknowledges its own
            job_dir.clear_stop_received()
        env = {"CUDA_VISIBLE_DEVICES": self.settings.devices[slot]} if self.settings.devices else {}
        env.update(spec_environment(record.spec_json))
        try:
            handle = self.launcher.launch(LaunchRequest(record.id, Path(record.job_dir), resume, env))
        except OSError as exc:
            error = f"could not start the worker ({self.launcher.name} launcher): {exc}"
            note_status(job_dir, record.id, state="failed", error=error)
            self._finish(record, "failed", error, None)
            return
        self._running[record.id] = _Running(handle, slot)
        self.store.update_job(record.id, pid=handle.pid)
        log.info("job %s started in slot %d (pid %d%s)", record.id, slot, handle.pid,
                 ", resuming" if resume else "")


def _acknowledged(job_dir: JobDir, running: _Running, requests: tuple[str, ...]) -> bool:
    """Whether the worker of ``running`` recorded that one of ``requests`` reached it."""
    received = job_dir.read_stop_received()
    return received is not None and received.pid == running.handle.pid and received.request in requests


def _due(last_sent: float | None, now: float) -> bool:
    return last_sent is None or now - last_sent >= SIGNAL_RESEND_S


def note_status(job_dir: JobDir, job_id: str, **changes: object) -> JobStatus | None:
    """Mirror a state the service decided into status.json. Best effort: the store is what the API
    reads, so a job dir that cannot be written (deleted, disk full) must not keep the job from moving on."""
    try:
        return job_dir.update_status(**changes)
    except (OSError, ValueError) as exc:
        log.warning("job %s: could not write %s: %s", job_id, job_dir.status_path, exc)
        return None


def spec_environment(spec_json: str) -> dict[str, str]:
    """Environment a job's spec asks for beyond the worker's minimal one: its trackers' settings."""
    import json

    try:
        spec = json.loads(spec_json)
        # A pipeline's plan (posttrain.pipeline) holds one spec per stage: any stage's trackers count.
        specs = [stage["spec"] for stage in spec["stages"]] if "stages" in spec else [spec]
        report_to = [tracker for one in specs for tracker in one.get("tracking", {}).get("report_to", [])]
    except (ValueError, AttributeError, KeyError, TypeError):
        return {}
    prefixes = tuple(f"{tracker.upper()}_" for tracker in report_to if tracker in ("wandb", "mlflow"))
    return {key: value for key, value in os.environ.items() if prefixes and key.startswith(prefixes)}
