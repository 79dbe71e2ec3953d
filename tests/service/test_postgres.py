"""The service on a real PostgreSQL server (Debian's `postgresql` package, started here on loopback)."""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import tempfile
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from service_harness import free_port, train_spec, write_key_file
from waiting import wait_for

from posttrain.client import ServiceError


def postgres_bin_dir() -> Path | None:
    found = shutil.which("initdb")
    if found:
        return Path(os.path.realpath(found)).parent
    candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    return Path(candidates[-1]).parent if candidates else None


@pytest.fixture(scope="module")
def postgres() -> Iterator[PostgresServer]:
    bin_dir = postgres_bin_dir()
    if bin_dir is None:
        pytest.skip("PostgreSQL binaries not found (apt-get install postgresql; .ci/run does this)")
    # PostgreSQL refuses to run as root: run it as the 'postgres' user the package creates.
    run_as: dict = {}
    if os.geteuid() == 0:
        try:
            import pwd

            pwd.getpwnam("postgres")
        except KeyError:
            pytest.skip("running as root and there is no 'postgres' user to run PostgreSQL as")
        run_as = {"user": "postgres", "group": "postgres"}
    root = Path(tempfile.mkdtemp(prefix="posttrain-pg-"))
    if run_as:
        shutil.chown(root, "postgres", "postgres")
    data, port = root / "data", free_port()

    def pg(*argv: str, timeout: float = 60) -> None:
        subprocess.run([str(bin_dir / argv[0]), *argv[1:]], check=True, capture_output=True, timeout=timeout,
                       cwd=root, **run_as)

    def start() -> None:
        pg("pg_ctl", "-D", str(data), "-l", str(root / "server.log"), "-w", "-t", "60", "start", "-o",
           f"-p {port} -c listen_addresses=127.0.0.1 -k {root} -F")

    def stop() -> None:
        pg("pg_ctl", "-D", str(data), "-m", "fast", "-w", "stop")

    try:
        pg("initdb", "-D", str(data), "-U", "posttrain", "-A", "trust", "--no-sync", "-E", "UTF8")
        start()
        try:
            pg("createdb", "-h", "127.0.0.1", "-p", str(port), "-U", "posttrain", "posttrain")
            yield PostgresServer(f"postgresql://posttrain@127.0.0.1:{port}/posttrain", start, stop)
        finally:
            stop()
    finally:
        shutil.rmtree(root, ignore_errors=True)


@dataclass
class PostgresServer:
    url: str
    start: Callable[[], None]
    stop: Callable[[], None]


def test_jobs_are_stored_in_postgres_and_survive_a_restart(start_server, postgres: PostgresServer, tmp_path: Path):
    import psycopg

    postgres_url = postgres.url
    server = start_server("--db", postgres_url)
    with server.client() as client:
        job = client.submit(train_spec(max_steps=2))
        job = client.wait(job.id, timeout=180)
        assert job.state == "succeeded", job.error

        # Concurrent submissions through the Postgres store: each stored once.
        ids: list[str] = []
        def submit() -> None:
            with server.client() as own:
                ids.append(own.submit(train_spec(max_steps=2), priority=-1).id)

        threads = [threading.Thread(target=submit) for _ in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        assert len(set(ids)) == 8
        for job_id in ids:
            if client.get_job(job_id).state in ("queued", "running"):
                client.cancel(job_id)
        for job_id in ids:
            assert client.wait(job_id, timeout=60).state in ("cancelled", "succeeded")

    with psycopg.connect(postgres_url) as conn:
        rows = dict(conn.execute("SELECT id, state FROM jobs").fetchall())
    assert rows[job.id] == "succeeded" and len(rows) == 9

    server.stop()
    restarted = start_server("--db", postgres_url, data_dir=tmp_path / "other-data")
    with restarted.client() as client:
        assert client.get_job(job.id).state == "succeeded"
        assert client.list_jobs(limit=100).total == 9


def test_servers_sharing_a_database_cannot_cancel_or_delete_each_others_jobs(start_server, postgres: PostgresServer,
                                                                            tmp_path: Path):
    keys = write_key_file(tmp_path / "keys.txt", ["pt-team team"])
    first = start_server("--db", postgres.url, "--api-key-file", str(keys), api_key="pt-team")
    second = start_server("--db", postgres.url, "--api-key-file", str(keys), api_key="pt-team")
    with first.client() as mine, second.client() as theirs:
        job = mine.submit(train_spec(max_steps=100_000, save_steps=1_000))
        wait_for(lambda: mine.get_job(job.id).state == "running", 120, "the job to start")
        assert theirs.get_job(job.id).state == "running"  # the same owner may read it from either door
        for call in (lambda: theirs.cancel(job.id), lambda: theirs.delete(job.id)):
            with pytest.raises(ServiceError) as caught:
                call()
            assert caught.value.status_code == 409
        assert "another server" in caught.value.message or "cancel it before" in caught.value.message
        mine.cancel(job.id)
        assert mine.wait(job.id, timeout=120).state == "cancelled"
        with pytest.raises(ServiceError) as caught:
            theirs.delete(job.id)
        assert caught.value.status_code == 409 and "another server" in caught.value.message
        mine.delete(job.id)


def test_database_errors_are_logged_not_shown(start_server, postgres: PostgresServer):
    server = start_server("--db", postgres.url)
    postgres.stop()
    try:
        with httpx.Client(base_url=server.url, timeout=60) as http:
            ready = http.get("/readyz")
            assert ready.status_code == 503
            assert ready.json()["detail"] == "database unreachable (see the server log)"
            failed = http.get("/v1/jobs")
            assert failed.status_code == 500
            body = failed.json()
            assert body["type"] == "InternalError" and body["request_id"] in body["detail"]
            assert failed.headers["x-request-id"] == body["request_id"]
            for secret in ("psycopg", "OperationalError", "127.0.0.1", "connection", "SELECT"):
                assert secret not in ready.text and secret not in failed.text
        assert f"request id {body['request_id']}" in server.log()  # the details are in the log
    finally:
        postgres.start()
    with server.client() as client:
        wait_for(client.ready, 60, "the database to be back")


# The jobs table as an earlier release created it on PostgreSQL: no owner, no pause_requested, 32-bit steps.
OLD_JOBS_TABLE = """
CREATE TABLE jobs (id VARCHAR(64) PRIMARY KEY, name VARCHAR(256), method VARCHAR(32) NOT NULL,
  state VARCHAR(16) NOT NULL, priority INTEGER NOT NULL, job_dir TEXT NOT NULL, spec_json TEXT NOT NULL,
  step INTEGER NOT NULL, total_steps INTEGER, error TEXT, attempt INTEGER NOT NULL, retries INTEGER NOT NULL,
  resume BOOLEAN NOT NULL, cancel_requested BOOLEAN NOT NULL, pid INTEGER, slot INTEGER,
  created_at FLOAT NOT NULL, launched_at FLOAT, finished_at FLOAT, updated_at FLOAT NOT NULL);
INSERT INTO jobs VALUES ('job-old', 'old', 'sft', 'running', 0, '/data/jobs/job-old', '{}', 4, 8, NULL, 1, 0,
  false, false, NULL, NULL, 1.0, 1.0, NULL, 2.0);
"""


def test_an_older_postgres_database_is_migrated_for_pauses(postgres: PostgresServer):
    import psycopg

    from posttrain.service.settings import normalize_db_url
    from posttrain.service.store import JobStore

    with psycopg.connect(postgres.url, autocommit=True) as conn:
        conn.execute("CREATE DATABASE before_pauses")
    url = postgres.url.rsplit("/", 1)[0] + "/before_pauses"
    with psycopg.connect(url) as conn:
        conn.execute(OLD_JOBS_TABLE)
    store = JobStore(normalize_db_url(url))
    try:
        old = store.get_job("job-old")
        assert old is not None and old.pause_requested is False and old.owner is None
        assert store.pause("job-old") == "running" and store.get_job("job-old").pause_requested
        assert store.mark_paused("job-old", step=4) and store.get_job("job-old").state == "paused"
    finally:
        store.close()
    JobStore(normalize_db_url(url)).close()  # migrating again changes nothing
