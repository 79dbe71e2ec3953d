"""The job store: a database made before owners (and pauses) existed is migrated in place; ownership is in the
queries."""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path

from sqlalchemy import inspect

from posttrain.service.store import JobRecord, JobStore

# The tables as the first release created them (no owner columns, no pause_requested).
OLD_SCHEMA = """
CREATE TABLE jobs (id VARCHAR(64) PRIMARY KEY, name VARCHAR(256), method VARCHAR(32) NOT NULL,
  state VARCHAR(16) NOT NULL, priority INTEGER NOT NULL, job_dir TEXT NOT NULL, spec_json TEXT NOT NULL,
  step INTEGER NOT NULL, total_steps INTEGER, error TEXT, attempt INTEGER NOT NULL, retries INTEGER NOT NULL,
  resume BOOLEAN NOT NULL, cancel_requested BOOLEAN NOT NULL, pid INTEGER, slot INTEGER, created_at FLOAT NOT NULL,
  launched_at FLOAT, finished_at FLOAT, updated_at FLOAT NOT NULL);
CREATE INDEX ix_jobs_state ON jobs (state);
CREATE INDEX ix_jobs_created_at ON jobs (created_at);
CREATE TABLE files (id VARCHAR(64) PRIMARY KEY, filename VARCHAR(256) NOT NULL, path TEXT NOT NULL,
  size INTEGER NOT NULL, sha256 VARCHAR(64) NOT NULL, created_at FLOAT NOT NULL);
INSERT INTO jobs VALUES ('job-old', 'old', 'sft', 'succeeded', 0, '/data/jobs/job-old', '{}', 4, 4, NULL, 1, 0,
  0, 0, NULL, NULL, 1.0, 1.0, 2.0, 2.0);
"""


def test_a_database_from_before_owners_is_migrated_and_its_jobs_are_admin_only(tmp_path: Path):
    path = tmp_path / "posttrain.db"
    with sqlite3.connect(path) as conn:
        conn.executescript(OLD_SCHEMA)
    store = JobStore(f"sqlite:///{path}")
    try:
        columns = {table: {c["name"] for c in inspect(store.engine).get_columns(table)} for table in ("jobs", "files")}
        assert "owner" in columns["jobs"] and "owner" in columns["files"] and "openai_json" in columns["jobs"]
        assert "pause_requested" in columns["jobs"]
        old = store.get_job("job-old")
        assert old is not None and old.owner is None and old.step == 4 and old.openai_json is None
        assert old.pause_requested is False
        assert store.list_openai_jobs(None, None, 10) == ([], False)  # not made through the OpenAI door
        assert store.get_job("job-old", owner="alice") is None  # no tenant owns a job from before owners
        assert store.list_jobs(owner="alice") == ([], 0)
        now = time.time()
        store.add_job(JobRecord(id="job-new", owner="alice", name="new", method="sft", state="queued", priority=0,
                                job_dir="/data/jobs/job-new", spec_json="{}", step=0, attempt=0, retries=0,
                                resume=False, cancel_requested=False, created_at=now, updated_at=now))
        assert [job.id for job in store.list_jobs(owner="alice")[0]] == ["job-new"]
        assert store.list_jobs()[1] == 2  # an admin sees both
        store.update_job("job-new", step=3_000_000_000, total_steps=2**40)  # 64-bit step columns
        assert store.get_job("job-new").total_steps == 2**40
    finally:
        store.close()
    JobStore(f"sqlite:///{path}").close()  # migrating again changes nothing


def test_file_listing_filters_kinds_before_the_limit_and_pages_only_from_the_callers_own_files(tmp_path: Path):
    from posttrain.service.schemas import RESULTS_PREFIX
    from posttrain.service.store import FileRecord

    store = JobStore(f"sqlite:///{tmp_path / 'jobs.db'}")
    try:
        # alice: two uploads, then two newer results files; bob: one upload in between.
        for at, (file_id, owner) in enumerate([("file-a1", "alice"), ("file-a2", "alice"), ("file-b1", "bob"),
                                               (f"{RESULTS_PREFIX}1", "alice"), (f"{RESULTS_PREFIX}2", "alice")]):
            store.add_file(FileRecord(id=file_id, owner=owner, filename="x.jsonl", path=f"/x/{file_id}", size=1,
                                      sha256="0" * 64, created_at=1000.0 + at))
        # The two newest of alice's files are results files: a page of uploads must still hold uploads.
        assert [f.id for f in store.list_files("alice", 2, not_id_prefix=RESULTS_PREFIX)] == ["file-a2", "file-a1"]
        assert [f.id for f in store.list_files("alice", 5, id_prefix=RESULTS_PREFIX)] == [f"{RESULTS_PREFIX}2",
                                                                                      f"{RESULTS_PREFIX}1"]
        # Paging after one's own file continues; after someone else's id it starts over (reveals nothing).
        assert [f.id for f in store.list_files("alice", 5, after="file-a2")] == ["file-a1"]
        assert [f.id for f in store.list_files("alice", 1, after="file-b1")] == [f"{RESULTS_PREFIX}2"]
        assert [f.id for f in store.list_files(None, 5, after="file-b1")] == ["file-a2", "file-a1"]  # admin
    finally:
        store.close()
