"""Fast reads of one job for status pollers: recent records kept in memory, dropped on every write.

``GET /v1/jobs/{id}`` is what every client polls, often many at once. Reading the record through an
ORM session in the request thread pool costs most of a millisecond of CPU and a thread hop per call;
serving a record read moments ago costs microseconds and can run right in the event loop.

A cached record is served for at most ``MAX_AGE_S`` and is dropped as soon as this process writes any
job (every INSERT/UPDATE/DELETE on the store's engine bumps a generation), so a client sees its own
submit, cancel or delete at once and the scheduler's state changes within a tick (the generation is
bumped again when the write commits, so a read that ran in between is not kept either). Only writes
made by another server sharing the database can take up to ``MAX_AGE_S`` to show.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from sqlalchemy import event
from starlette.concurrency import run_in_threadpool

from posttrain.service.store import JobRecord, JobStore

MAX_AGE_S = 0.25
_WRITES = ("INSERT", "UPDATE", "DELETE")
_WROTE = "posttrain_wrote_jobs"


class RecentJobs:
    def __init__(self, store: JobStore, max_age_s: float = MAX_AGE_S) -> None:
        self.store = store
        self.max_age_s = max_age_s
        self.generation = 0
        self._records: dict[str, tuple[int, float, JobRecord]] = {}
        # Reads in flight, with the generation they started in (event loop only).
        self._pending: dict[str, tuple[int, asyncio.Future[JobRecord | None]]] = {}
        event.listen(store.engine, "after_cursor_execute", self._after_execute)
        event.listen(store.engine, "commit", self._on_commit)

    def _after_execute(self, conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        if statement.lstrip()[:6].upper() in _WRITES:
            conn.info[_WROTE] = True
            self._invalidate()

    def _on_commit(self, conn: Any) -> None:
        # Again at commit: a read between the write and its commit saw (and may have cached) the old row.
        if conn.info.pop(_WROTE, False):
            self._invalidate()

    def _invalidate(self) -> None:
        self.generation += 1
        self._records.clear()

    def cached(self, job_id: str) -> JobRecord | None:
        """The record if it was read recently and nothing was written since; None otherwise."""
        entry = self._records.get(job_id)
        if entry is None:
            return None
        generation, read_at, record = entry
        if generation != self.generation or time.monotonic() - read_at > self.max_age_s:
            self._records.pop(job_id, None)
            return None
        return record

    async def get(self, job_id: str) -> JobRecord | None:
        """The record, from memory when it is recent; otherwise read in the thread pool, once for all the
        requests that want it at the same moment (when an entry expires, every poller misses together)."""
        record = self.cached(job_id)
        if record is not None:
            return record
        # A read that started before a write since then may return the old row: join only one that
        # started after the latest write, so a client sees its own cancel (or delete) at once.
        generation = self.generation
        entry = self._pending.get(job_id)
        if entry is None or entry[0] != generation:
            pending = asyncio.ensure_future(run_in_threadpool(self.read, job_id))
            self._pending[job_id] = (generation, pending)
            pending.add_done_callback(lambda done: self._forget(job_id, done))
        else:
            pending = entry[1]
        return await asyncio.shield(pending)

    def _forget(self, job_id: str, done: asyncio.Future[JobRecord | None]) -> None:
        entry = self._pending.get(job_id)
        if entry is not None and entry[1] is done:
            del self._pending[job_id]

    def read(self, job_id: str) -> JobRecord | None:
        """Read from the store (blocking: call it from a worker thread) and remember the result."""
        generation = self.generation
        record = self.store.get_job(job_id)
        if record is not None and generation == self.generation:
            self._records[job_id] = (generation, time.monotonic(), record)
        return record
