"""Durable job store: SQLAlchemy 2 over SQLite (default) or PostgreSQL.

The database indexes jobs and mirrors their state so listing and scheduling are queries; the job
directory stays the truth about a run (the scheduler copies its status back here). Every state change
that could race (claiming a queued job, cancelling, pausing, resuming or requeueing one) is a conditional
UPDATE, so two threads or two server processes can never both start the same job, and a cancel is never
lost (nor a pause: a pause never wins over a cancel).

Ownership lives in the queries: every read and change a request makes names the caller's owner
(``owner=None`` only for admins and the scheduler), so another tenant's job is simply not found.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from sqlalchemy import (
    BigInteger,
    Boolean,
    Float,
    Integer,
    String,
    Text,
    create_engine,
    event,
    func,
    inspect,
    select,
    text,
    update,
)
from sqlalchemy.engine import Engine
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker
from sqlalchemy.sql.elements import ColumnElement


class Base(DeclarativeBase):
    pass


class JobRecord(Base):
    __tablename__ = "jobs"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    # None: created before owners existed (by the one user of an unkeyed server); only admins see it.
    owner: Mapped[str | None] = mapped_column(String(64), index=True)
    name: Mapped[str | None] = mapped_column(String(256))
    method: Mapped[str] = mapped_column(String(32))
    state: Mapped[str] = mapped_column(String(16), index=True)
    priority: Mapped[int] = mapped_column(Integer, default=0)
    job_dir: Mapped[str] = mapped_column(Text)
    spec_json: Mapped[str] = mapped_column(Text)
    step: Mapped[int] = mapped_column(BigInteger, default=0)
    total_steps: Mapped[int | None] = mapped_column(BigInteger)
    error: Mapped[str | None] = mapped_column(Text)
    attempt: Mapped[int] = mapped_column(Integer, default=0)  # launches so far
    retries: Mapped[int] = mapped_column(Integer, default=0)  # requeues after a worker died
    resume: Mapped[bool] = mapped_column(Boolean, default=False)  # next launch resumes from a checkpoint
    cancel_requested: Mapped[bool] = mapped_column(Boolean, default=False)
    # A running job asked to pause: the scheduler signals its worker, which checkpoints and exits.
    pause_requested: Mapped[bool] = mapped_column(Boolean, default=False)
    pid: Mapped[int | None] = mapped_column(Integer)
    slot: Mapped[int | None] = mapped_column(Integer)
    created_at: Mapped[float] = mapped_column(Float, index=True)
    launched_at: Mapped[float | None] = mapped_column(Float)
    finished_at: Mapped[float | None] = mapped_column(Float)
    updated_at: Mapped[float] = mapped_column(Float)
    # What only the OpenAI door knows of a job it created (file ids, suffix, metadata, the method and
    # hyperparameters as reported back), as JSON; None for jobs submitted otherwise. Kept here rather
    # than in the job dir so that listing fine-tuning jobs stays one query.
    openai_json: Mapped[str | None] = mapped_column(Text, nullable=True)


class FileRecord(Base):
    __tablename__ = "files"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    owner: Mapped[str | None] = mapped_column(String(64), index=True)
    filename: Mapped[str] = mapped_column(String(256))
    path: Mapped[str] = mapped_column(Text)
    size: Mapped[int] = mapped_column(BigInteger)
    sha256: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[float] = mapped_column(Float)


def make_engine(url: str) -> Engine:
    if url.startswith("sqlite"):
        # One file shared by the request threads and the scheduler thread: WAL lets readers run
        # beside the writer, and a generous busy timeout queues concurrent writers instead of failing.
        # Pool as large as the request thread pool (40), so connections are reused, not reopened.
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30}, pool_size=40,
                               max_overflow=10)

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
            cursor = dbapi_connection.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA synchronous=NORMAL")
            cursor.close()

        return engine
    return create_engine(url, pool_pre_ping=True, pool_size=20, max_overflow=30)


def migrate(engine: Engine) -> None:
    """Bring a database made by an earlier version up to this schema (create_all only adds tables):
    add the ``owner`` and ``openai_json`` columns and ``jobs.pause_requested``, and widen PostgreSQL's
    32-bit step and size columns to 64 bits."""
    inspector = inspect(engine)
    tables = set(inspector.get_table_names())
    with engine.begin() as conn:
        for table in ("jobs", "files"):
            if table not in tables:
                continue
            columns = {column["name"]: column for column in inspector.get_columns(table)}
            if "owner" not in columns:
                conn.execute(text(f"ALTER TABLE {table} ADD COLUMN owner VARCHAR(64)"))
                conn.execute(text(f"CREATE INDEX IF NOT EXISTS ix_{table}_owner ON {table} (owner)"))
            if table == "jobs" and "pause_requested" not in columns:
                conn.execute(text("ALTER TABLE jobs ADD COLUMN pause_requested BOOLEAN NOT NULL DEFAULT false"))
            if table == "jobs" and "openai_json" not in columns:
                conn.execute(text("ALTER TABLE jobs ADD COLUMN openai_json TEXT"))
            if engine.dialect.name == "postgresql":
                wide = ("step", "total_steps") if table == "jobs" else ("size",)
                for name in wide:
                    if isinstance(columns[name]["type"], Integer) and not isinstance(columns[name]["type"], BigInteger):
                        conn.execute(text(f"ALTER TABLE {table} ALTER COLUMN {name} TYPE BIGINT"))


def _owned(record: Any, owner: str | None) -> Any:
    """A paging cursor only from the caller's own records: another owner's id says nothing about theirs."""
    return record if record is None or owner is None or record.owner == owner else None


def _inside(folder: str) -> ColumnElement[bool]:
    prefix = folder.rstrip("/") + "/"
    escaped = prefix.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return JobRecord.job_dir.like(escaped + "%", escape="\\")


class JobStore:
    """Jobs and uploaded files, one short transaction per call; returns detached records."""

    def __init__(self, url: str) -> None:
        self.engine = make_engine(url)
        migrate(self.engine)
        Base.metadata.create_all(self.engine)
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)

    @contextmanager
    def _session(self) -> Iterator[Session]:
        with self._sessions() as session, session.begin():
            yield session

    def ping(self) -> None:
        with self.engine.connect() as conn:
            conn.execute(text("SELECT 1"))

    def close(self) -> None:
        self.engine.dispose()

    # -- jobs ---------------------------------------------------------------------------------------
    def add_job(self, record: JobRecord) -> JobRecord:
        with self._session() as session:
            session.add(record)
        return record

    def get_job(self, job_id: str, owner: str | None = None) -> JobRecord | None:
        """The job, or None if it does not exist or (with ``owner``) belongs to someone else."""
        with self._session() as session:
            record = session.get(JobRecord, job_id)
        return record if record is not None and (owner is None or record.owner == owner) else None

    def list_jobs(
        self, states: list[str] | None = None, limit: int = 50, offset: int = 0, owner: str | None = None
    ) -> tuple[list[JobRecord], int]:
        """Newest first, with the total count for paging; with ``owner``, only that owner's jobs."""
        query = select(JobRecord)
        count = select(func.count()).select_from(JobRecord)
        if states:
            query = query.where(JobRecord.state.in_(states))
            count = count.where(JobRecord.state.in_(states))
        if owner is not None:
            query = query.where(JobRecord.owner == owner)
            count = count.where(JobRecord.owner == owner)
        query = query.order_by(JobRecord.created_at.desc(), JobRecord.id.desc()).limit(limit).offset(offset)
        with self._session() as session:
            return list(session.scalars(query)), int(session.scalar(count) or 0)

    def list_openai_jobs(self, owner: str | None, after: str | None, limit: int) -> tuple[list[JobRecord], bool]:
        """Jobs created through the OpenAI door, newest first, those after job ``after`` (cursor paging);
        and whether more follow."""
        query = select(JobRecord).where(JobRecord.openai_json.is_not(None))
        if owner is not None:
            query = query.where(JobRecord.owner == owner)
        with self._session() as session:
            cursor = _owned(session.get(JobRecord, after) if after else None, owner)
            if cursor is not None:
                query = query.where((JobRecord.created_at < cursor.created_at)
                                    | ((JobRecord.created_at == cursor.created_at) & (JobRecord.id < cursor.id)))
            query = query.order_by(JobRecord.created_at.desc(), JobRecord.id.desc()).limit(limit + 1)
            records = list(session.scalars(query))
        return records[:limit], len(records) > limit

    def jobs_in_state(self, state: str, under: str | None = None) -> list[JobRecord]:
        """Jobs in ``state``; with ``under``, only those whose job dir is inside that folder."""
        query = select(JobRecord).where(JobRecord.state == state)
        if under is not None:
            query = query.where(_inside(under))
        with self._session() as session:
            return list(session.scalars(query))

    def next_queued(self, limit: int, under: str | None = None) -> list[JobRecord]:
        """Queued jobs in run order: higher priority first, then first come first served."""
        query = select(JobRecord).where(JobRecord.state == "queued")
        if under is not None:
            query = query.where(_inside(under))
        query = query.order_by(JobRecord.priority.desc(), JobRecord.created_at, JobRecord.id).limit(limit)
        with self._session() as session:
            return list(session.scalars(query))

    def claim(self, job_id: str, slot: int) -> bool:
        """queued -> running, only if still queued and not cancelled (so a job is started at most once)."""
        now = time.time()
        with self._session() as session:
            result = session.execute(
                update(JobRecord)
                .where(JobRecord.id == job_id, JobRecord.state == "queued", JobRecord.cancel_requested.is_(False))
                .values(state="running", slot=slot, pid=None, launched_at=now, updated_at=now,
                        attempt=JobRecord.attempt + 1)
            )
            return result.rowcount == 1

    def update_job(self, job_id: str, **values: Any) -> None:
        values["updated_at"] = time.time()
        with self._session() as session:
            session.execute(update(JobRecord).where(JobRecord.id == job_id).values(**values))

    def requeue(self, job_id: str, **values: Any) -> bool:
        """running -> queued for a retry, only if no cancel (which always wins) or pause (the job is then
        paused instead) was requested meanwhile."""
        values.update(state="queued", updated_at=time.time())
        with self._session() as session:
            result = session.execute(
                update(JobRecord)
                .where(JobRecord.id == job_id, JobRecord.state == "running", JobRecord.cancel_requested.is_(False),
                       JobRecord.pause_requested.is_(False))
                .values(**values)
            )
            return result.rowcount == 1

    def mark_paused(self, job_id: str, **values: Any) -> bool:
        """running -> paused once its worker has stopped, only if no cancel was requested meanwhile."""
        values.update(state="paused", pid=None, slot=None, pause_requested=False, updated_at=time.time())
        with self._session() as session:
            result = session.execute(
                update(JobRecord)
                .where(JobRecord.id == job_id, JobRecord.state == "running", JobRecord.cancel_requested.is_(False))
                .values(**values)
            )
            return result.rowcount == 1

    def finish(self, job_id: str, state: str, **values: Any) -> None:
        """Record a terminal state (succeeded, failed, cancelled). A pause still pending is moot then."""
        now = time.time()
        values.update(state=state, pid=None, finished_at=now, updated_at=now, pause_requested=False)
        with self._session() as session:
            session.execute(update(JobRecord).where(JobRecord.id == job_id).values(**values))

    def cancel(self, job_id: str) -> str | None:
        """Cancel a job: a queued or paused one at once (-> "cancelled"), a running one by flagging it for
        the scheduler (-> "running"); None if it had already finished. Each step is a conditional UPDATE, and
        a job requeued between them is caught on the next pass, so the request is never lost."""
        for _ in range(5):
            now = time.time()
            with self._session() as session:
                flag = {"cancel_requested": True, "updated_at": now}
                if session.execute(
                    update(JobRecord).where(JobRecord.id == job_id, JobRecord.state.in_(("queued", "paused")))
                    .values(state="cancelled", finished_at=now, pid=None, slot=None, **flag)
                ).rowcount == 1:
                    return "cancelled"
                if session.execute(
                    update(JobRecord).where(JobRecord.id == job_id, JobRecord.state == "running").values(**flag)
                ).rowcount == 1:
                    return "running"
                state = session.scalar(select(JobRecord.state).where(JobRecord.id == job_id))
            if state not in ("queued", "running", "paused"):
                return None
        return None

    def pause(self, job_id: str) -> str | None:
        """Pause a job: a queued one at once (-> "paused"), a running one by flagging it for the scheduler
        (-> "running"); None if it is in no state to pause (paused, finished, or being cancelled)."""
        for _ in range(5):
            now = time.time()
            with self._session() as session:
                if session.execute(
                    update(JobRecord)
                    .where(JobRecord.id == job_id, JobRecord.state == "queued", JobRecord.cancel_requested.is_(False))
                    .values(state="paused", updated_at=now)
                ).rowcount == 1:
                    return "paused"
                if session.execute(
                    update(JobRecord)
                    .where(JobRecord.id == job_id, JobRecord.state == "running", JobRecord.cancel_requested.is_(False))
                    .values(pause_requested=True, updated_at=now)
                ).rowcount == 1:
                    return "running"
                state = session.scalar(select(JobRecord.state).where(JobRecord.id == job_id))
            if state != "queued":  # queued: it was claimed or requeued between the two updates; again
                return None
        return None

    def resume(self, job_id: str) -> bool:
        """paused -> queued; its next worker continues from the newest complete checkpoint."""
        with self._session() as session:
            result = session.execute(
                update(JobRecord).where(JobRecord.id == job_id, JobRecord.state == "paused")
                .values(state="queued", resume=True, error=None, pause_requested=False, updated_at=time.time())
            )
            return result.rowcount == 1

    def delete_job(self, job_id: str) -> None:
        with self._session() as session:
            record = session.get(JobRecord, job_id)
            if record is not None:
                session.delete(record)

    # -- files --------------------------------------------------------------------------------------
    def add_file(self, record: FileRecord) -> FileRecord:
        with self._session() as session:
            session.add(record)
        return record

    def get_file(self, file_id: str) -> FileRecord | None:
        with self._session() as session:
            return session.get(FileRecord, file_id)

    def get_owned_file(self, file_id: str, owner: str | None) -> FileRecord | None:
        record = self.get_file(file_id)
        return record if record is not None and (owner is None or record.owner == owner) else None

    def list_files(self, owner: str | None = None, limit: int = 1000, after: str | None = None,
                   oldest_first: bool = False, id_prefix: str | None = None,
                   not_id_prefix: str | None = None) -> list[FileRecord]:
        """Newest first (or oldest first), those after file ``after`` (cursor paging); with ``id_prefix`` /
        ``not_id_prefix`` only the files whose id does / does not start with it (a kind of file)."""
        query = select(FileRecord)
        if owner is not None:
            query = query.where(FileRecord.owner == owner)
        if id_prefix is not None:
            query = query.where(FileRecord.id.startswith(id_prefix, autoescape=True))
        if not_id_prefix is not None:
            query = query.where(~FileRecord.id.startswith(not_id_prefix, autoescape=True))
        with self._session() as session:
            cursor = _owned(session.get(FileRecord, after) if after else None, owner)
            if cursor is not None:
                if oldest_first:
                    query = query.where((FileRecord.created_at > cursor.created_at)
                                        | ((FileRecord.created_at == cursor.created_at) & (FileRecord.id > cursor.id)))
                else:
                    query = query.where((FileRecord.created_at < cursor.created_at)
                                        | ((FileRecord.created_at == cursor.created_at) & (FileRecord.id > cursor.id)))
            order = (FileRecord.created_at, FileRecord.id) if oldest_first else (FileRecord.created_at.desc(),
                                                                                  FileRecord.id)
            return list(session.scalars(query.order_by(*order).limit(limit)))

    def delete_file(self, file_id: str) -> None:
        with self._session() as session:
            record = session.get(FileRecord, file_id)
            if record is not None:
                session.delete(record)
