"""The service on a real PostgreSQL server (Debian's `postgresql` package, started here on loopback)."""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from service_harness import free_port, train_spec


def postgres_bin_dir() -> Path | None:
    found = shutil.which("initdb")
    if found:
        return Path(os.path.realpath(found)).parent
    candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    return Path(candidates[-1]).parent if candidates else None


@pytest.fixture(scope="module")
def postgres_url() -> Iterator[str]:
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

    try:
        pg("initdb", "-D", str(data), "-U", "posttrain", "-A", "trust", "--no-sync", "-E", "UTF8")
        pg("pg_ctl", "-D", str(data), "-l", str(root / "server.log"), "-w", "-t", "60", "start", "-o",
           f"-p {port} -c listen_addresses=127.0.0.1 -k {root} -F")
        try:
            pg("createdb", "-h", "127.0.0.1", "-p", str(port), "-U", "posttrain", "posttrain")
            yield f"postgresql://posttrain@127.0.0.1:{port}/posttrain"
        finally:
            pg("pg_ctl", "-D", str(data), "-m", "fast", "-w", "stop")
    finally:
        shutil.rmtree(root, ignore_errors=True)


def test_jobs_are_stored_in_postgres_and_survive_a_restart(start_server, postgres_url: str, tmp_path: Path):
    import psycopg

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
