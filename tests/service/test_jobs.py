"""The job service end to end: a real server on loopback, driven through posttrain.client and the CLI."""

from __future__ import annotations

import json
import os
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest
import typer
from service_harness import HeldLog, ServerProcess, frozen, module_server, train_spec, worker_processes
from typer.testing import CliRunner
from waiting import wait_for

from posttrain.client import ServiceError
from posttrain.commands.jobs import jobs_app
from posttrain.job.directory import JobDir


@pytest.fixture(scope="module")
def server(request, tmp_path_factory):
    # One slot, a short cancel grace period; shared by this module's tests (each waits for its jobs).
    yield from module_server(request, tmp_path_factory, "--slots", "1", "--cancel-grace", "5",
                             "--max-log-followers", "1", clock_step=True)


def test_submit_uploaded_dataset_runs_to_success_with_artifacts(server: ServerProcess, tmp_path: Path):
    rows = [{"instruction": f"Add {i} and {i}.", "input": "", "output": str(2 * i)} for i in range(40)]
    dataset = tmp_path / "sums.jsonl"
    dataset.write_text("".join(json.dumps(row) + "\n" for row in rows))

    with server.client() as client:
        upload = client.upload(dataset)
        assert upload.source == f"upload:{upload.id}" and upload.size == dataset.stat().st_size

        spec = train_spec(max_steps=4, save_steps=2)
        spec["data"] = {"source": upload.source}
        job = client.submit(spec)
        assert job.state == "queued" and job.method == "sft"

        # Follow the log as server-sent events: it ends by itself when the job does.
        followed = list(client.follow_logs(job.id, tail=0))
        assert any("step 4/4" in line for line in followed)

        job = client.wait(job.id, timeout=180)
        assert job.state == "succeeded", job.error
        assert (job.step, job.total_steps) == (4, 4)
        assert job.attempt == 1 and job.launched_at <= job.started_at <= job.finished_at
        assert "loss" in (job.metrics or {}) or "train_loss" in (job.metrics or {})

        # The service put the job under its own data dir, with the uploaded file as its data.
        job_dir = JobDir(server.data_dir / "jobs" / job.id)
        written = job_dir.read_spec_dict()
        assert written["output"]["dir"] == str(job_dir.root)
        assert written["data"]["source"].startswith(str(server.data_dir / "files"))

        listing = client.artifacts(job.id)
        assert listing.final and listing.checkpoints == ["checkpoint-2", "checkpoint-4"]
        paths = {a.path: a.size for a in listing.artifacts}
        adapter = "final/adapter_model.safetensors"
        assert paths[adapter] > 0 and listing.total_size == sum(paths.values())

        target = client.download(job.id, adapter, tmp_path / "adapter.safetensors")
        assert target.read_bytes() == (job_dir.root / adapter).read_bytes()

        steps = [m["step"] for m in client.metrics(job.id) if "loss" in m]
        assert steps == [1, 2, 3, 4]
        # Metrics come in pages: 'more' says where to go on; the client follows them.
        with httpx.Client(base_url=server.url) as http:
            first = http.get(f"/v1/jobs/{job.id}/metrics", params={"limit": 2}).json()
            assert [m["step"] for m in first["metrics"]] == [1, 2] and first["more"] is True
            rest = http.get(f"/v1/jobs/{job.id}/metrics", params={"since_step": 2, "limit": 100}).json()
            assert [m["step"] for m in rest["metrics"] if "loss" in m] == [3, 4] and rest["more"] is False
            assert http.get(f"/v1/jobs/{job.id}/metrics", params={"limit": 10_001}).status_code == 422
        assert [m["step"] for m in client.metrics(job.id, since_step=1, limit=2)] == [2, 3]
        assert any("step 4/4" in line for line in client.logs(job.id, tail=50))
        assert job.id in [j.id for j in client.list_jobs(state="succeeded").jobs]

        client.delete(job.id)
        assert not job_dir.root.exists()
        with pytest.raises(ServiceError) as missing:
            client.get_job(job.id)
        assert missing.value.status_code == 404 and job.id in missing.value.message


def test_one_slot_queues_by_priority_then_fifo_and_cancel_stops_the_worker(server: ServerProcess):
    with server.client() as client:
        blocker = client.submit(train_spec(max_steps=100_000, save_steps=1_000))
        wait_for(lambda: client.get_job(blocker.id).step >= 2, 120, "the first job to train")
        low = client.submit(train_spec(max_steps=2))
        dropped = client.submit(train_spec(max_steps=2))
        high = client.submit(train_spec(max_steps=2), priority=5)
        assert {client.get_job(j.id).state for j in (low, dropped, high)} == {"queued"}

        # Cancelling a queued job takes it out of the queue; it never starts.
        assert client.cancel(dropped.id).state == "cancelled"

        # Cancelling a running job signals its worker group, which stops at the next step.
        pid = JobDir(server.data_dir / "jobs" / blocker.id).read_status().pid
        assert client.cancel(blocker.id).cancel_requested
        blocker = client.wait(blocker.id, timeout=60)
        assert blocker.state == "cancelled" and blocker.error is None and 0 < blocker.step < 100_000
        assert JobDir(server.data_dir / "jobs" / blocker.id).read_status().state == "cancelled"
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
        with pytest.raises(ServiceError) as again:
            client.cancel(blocker.id)
        assert again.value.status_code == 409 and "already finished" in again.value.message

        low, high = client.wait(low.id, timeout=180), client.wait(high.id, timeout=180)
        dropped = client.get_job(dropped.id)
    assert low.state == high.state == "succeeded", (low.error, high.error)
    # One slot: each job started only after the one before it ended; the higher priority went first.
    assert blocker.finished_at <= high.launched_at and high.finished_at <= low.launched_at
    assert dropped.state == "cancelled" and dropped.attempt == 0 and dropped.launched_at is None


def test_a_cancel_at_any_point_of_a_start_ends_the_job_and_the_next_one_starts(server: ServerProcess):
    """Queued, launching (claimed, its worker not forked yet), just forked (no signal handler yet) and
    running: each cancelled job ends cancelled with no worker left, and the next job starts. The server
    sees the wall clock stepped since its workers started: it used to take its own warm-started workers for
    strangers then (it compared wall-clock start times), so every cancel of a started job was lost, its
    SIGKILL too, and the job trained on with cancel_requested, holding the only slot."""
    jobs_dir = server.data_dir / "jobs"
    long = train_spec(max_steps=100_000, save_steps=100_000)

    def ends_cancelled(client, job_id: str) -> None:
        job = client.wait(job_id, timeout=60)
        assert (job.state, job.error) == ("cancelled", None), job.error
        assert JobDir(jobs_dir / job_id).read_status().state == "cancelled"
        assert not worker_processes(server.data_dir, jobs_dir / job_id)

    with server.client() as client, server.clock_step.stepped():
        with frozen(server.readiness()["warm_template_pid"]):  # the scheduler claims a job, then waits for its fork
            launching = client.submit(long)
            wait_for(lambda: client.get_job(launching.id).state == "running", 60, "the job to be claimed")
            queued = client.submit(long)
            assert client.cancel(queued.id).state == "cancelled"  # queued: at once
            forked = client.submit(long)
            held = HeldLog(jobs_dir / forked.id)
            assert client.cancel(launching.id).cancel_requested
            assert not (jobs_dir / launching.id / "worker-process.json").exists()  # not forked yet
        ends_cancelled(client, launching.id)

        # The next job started: its worker is held at its first instant, before it handles any signal.
        worker = wait_for(held.held_worker, 60, "the next job's worker to be forked")
        assert JobDir(jobs_dir / forked.id).read_status().state == "queued"  # it has not said it runs
        running = client.submit(long)
        assert client.cancel(forked.id).cancel_requested
        ends_cancelled(client, forked.id)
        assert not worker.is_running()
        held.close()

        wait_for(lambda: client.get_job(running.id).step >= 2, 120, "the next job to train")
        assert worker_processes(server.data_dir, jobs_dir / running.id)  # what ends_cancelled sees gone
        last = client.submit(train_spec(max_steps=2))
        assert client.cancel(running.id).cancel_requested
        ends_cancelled(client, running.id)
        received = JobDir(jobs_dir / running.id).read_stop_received()
        assert (received.request, received.signal) == ("cancel", "SIGTERM")  # acknowledged by the worker
        assert client.wait(last.id, timeout=180).state == "succeeded"
        queued = client.get_job(queued.id)
    assert queued.attempt == 0 and queued.launched_at is None


def test_cli_jobs_commands(server: ServerProcess, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("POSTTRAIN_SERVER", server.url)
    runner = CliRunner()
    data = tmp_path / "local.jsonl"
    data.write_text("".join(json.dumps({"instruction": f"Say {i}.", "output": str(i)}) + "\n" for i in range(16)))
    config = tmp_path / "quick.yaml"
    config.write_text("training:\n  save_steps: 2\n  num_threads: 1\n  per_device_train_batch_size: 2\n"
                      f"data:\n  source: {data}\ntracking:\n  report_to: []\n"
                      "eval:\n  data: posttrain:alpaca\n  max_samples: 2\n  graders: [text_similarity]\n"
                      "  max_new_tokens: 4\n  every_steps: 1\n")

    # --upload sends the local data.source file to the server, which may be on another machine.
    submitted = runner.invoke(jobs_app, ["submit", str(config), "training.max_steps=2", "--upload", "--follow"])
    assert submitted.exit_code == 0, submitted.output
    job_id = submitted.stdout.splitlines()[0]
    assert "succeeded step 2/2" in submitted.stdout
    assert f"uploaded {data} as file-" in submitted.stderr
    spec = JobDir(server.data_dir / "jobs" / job_id).read_spec_dict()
    assert spec["data"]["source"].startswith(str(server.data_dir / "files"))

    listed = runner.invoke(jobs_app, ["list", "--state", "succeeded"])
    assert listed.exit_code == 0 and job_id in listed.output
    status = runner.invoke(jobs_app, ["status", job_id, "--json"])
    assert json.loads(status.output)["state"] == "succeeded"
    # The latest evaluation is part of the job (status.json), and every eval record is in its metrics.
    evaluation = json.loads(status.output)["eval"]
    assert evaluation["step"] == 2 and evaluation["final"] and "text_similarity" in evaluation["metrics"]
    assert "eval@2 eval_loss" in runner.invoke(jobs_app, ["status", job_id]).output
    assert "step 2/2" in runner.invoke(jobs_app, ["logs", job_id]).output
    records = [json.loads(line) for line in runner.invoke(jobs_app, ["metrics", job_id]).output.splitlines()]
    assert records[0]["step"] == 1
    assert [(r["step"], "eval_text_similarity" in r) for r in records if r.get("kind") == "eval"] == [
        (1, True), (2, True)]
    # Each evaluation's answers are kept: the latest by default, any other by its step.
    shown = runner.invoke(jobs_app, ["eval", job_id])
    assert shown.exit_code == 0 and "eval at step 2 (final)" in shown.output
    assert "answers at step 2 (of steps 1, 2)" in shown.output and shown.output.count("[held_out]") == 2
    first = json.loads(runner.invoke(jobs_app, ["eval", job_id, "--step", "1", "--json"]).output)
    assert first["step"] == 1 and len(first["answers"]) == 2 and first["eval"]["step"] == 2
    assert "final/adapter_model.safetensors" in runner.invoke(jobs_app, ["artifacts", job_id]).output

    fetched = runner.invoke(jobs_app, ["download", job_id, "final", "-o", str(tmp_path / "out")])
    assert fetched.exit_code == 0, fetched.output
    assert (tmp_path / "out" / "final" / "adapter_config.json").is_file()

    unknown = runner.invoke(jobs_app, ["status", "job-doesnotexist"])
    assert unknown.exit_code == 1 and "no job 'job-doesnotexist'" in unknown.output
    assert runner.invoke(jobs_app, ["delete", job_id]).exit_code == 0


def test_cli_is_registered_on_the_main_app():
    from posttrain.cli import app

    command = typer.main.get_command(app)
    assert {"serve", "jobs"} <= set(command.commands)  # type: ignore[attr-defined]


def test_an_unkeyed_server_answers_only_loopback_host_names(server: ServerProcess):
    # DNS rebinding: a web page makes the browser send requests for its own name to 127.0.0.1.
    with httpx.Client(base_url=server.url) as http:
        for host in ("localhost", f"localhost:{server.port}", "127.0.0.1", f"127.0.0.1:{server.port}",
                     f"[::1]:{server.port}", "LOCALHOST"):
            assert http.get("/v1/jobs", headers={"Host": host}).status_code == 200, host
        for host in ("evil.example", f"evil.example:{server.port}", "127.0.0.1.evil.example", "localhost.evil"):
            response = http.get("/v1/jobs", headers={"Host": host})
            assert response.status_code == 400, host
            assert response.json()["type"] == "HostNotAllowed"
            assert http.post("/v1/jobs", json={}, headers={"Host": host}).status_code == 400
        assert http.get("/healthz", headers={"Host": "evil.example"}).status_code == 400


def test_an_unkeyed_server_refuses_changes_sent_by_other_web_sites(server: ServerProcess):
    # A page on another site can post a form to 127.0.0.1 under its real name; the browser says where from.
    with server.client() as client:
        job = client.submit(train_spec(max_steps=5000))
    own = f"http://127.0.0.1:{server.port}"
    with httpx.Client(base_url=server.url) as http:
        for headers in ({"Origin": "https://evil.example"}, {"Origin": "null"},
                        {"Origin": f"http://localhost:{server.port + 1}"}, {"Sec-Fetch-Site": "cross-site"}):
            response = http.post(f"/v1/jobs/{job.id}/cancel", headers=headers)
            assert response.status_code == 403, headers
            assert response.json()["type"] == "CrossSiteRequest"
            assert http.post("/v1/files", files={"file": ("a.jsonl", b"{}")}, headers=headers).status_code == 403
            # Reading is not a change (and the browser keeps the answer from the other site anyway).
            assert http.get(f"/v1/jobs/{job.id}", headers=headers).status_code == 200
        assert client_state(server, job.id) != "cancelled"
        # Its own pages (the dashboard) and programs (no Origin) may.
        response = http.post(f"/v1/jobs/{job.id}/cancel", headers={"Origin": own, "Sec-Fetch-Site": "same-origin"})
        assert response.status_code == 200 and response.json()["cancel_requested"]


def client_state(server: ServerProcess, job_id: str) -> str:
    with server.client() as client:
        return client.get_job(job_id).state


def test_an_unkeyed_server_runs_user_code_for_its_one_user(server: ServerProcess):
    with server.client() as client:
        job = client.submit({**train_spec(max_steps=1), "model": {"trust_remote_code": True}})
        assert job.state == "queued"
        client.cancel(job.id)
        assert client.wait(job.id, timeout=120).state == "cancelled"


def test_log_followers_are_capped(server: ServerProcess):
    with server.client() as client:
        job = client.submit(train_spec(max_steps=100_000, save_steps=1_000))
        wait_for(lambda: client.get_job(job.id).state == "running", 120, "the job to start")
        first = client.follow_logs(job.id, tail=0)
        with httpx.Client(base_url=server.url, timeout=30) as http:
            with http.stream("GET", f"/v1/jobs/{job.id}/logs", params={"follow": "true", "tail": 5}) as stream:
                assert stream.status_code == 200
                lines = stream.iter_lines()  # kept: dropping the iterator would close the stream
                assert next(lines).startswith("data:")  # streaming: it holds the one place
                with pytest.raises(ServiceError) as caught:  # this server allows one stream at a time
                    next(first)
                assert caught.value.status_code == 429 and "too many log streams" in caught.value.message
            # The stream closed: its place is free again.
            def second_stream_opens() -> bool:
                with http.stream("GET", f"/v1/jobs/{job.id}/logs", params={"follow": "true"}) as again:
                    return again.status_code == 200
            wait_for(second_stream_opens, 30, "the closed stream to be released")
        tail = client.logs(job.id, tail=5)
        assert 0 < len(tail) <= 5  # the worker has logged by now; only the last five lines come back
        client.cancel(job.id)
        client.wait(job.id, timeout=120)


def test_download_keeps_files_inside_the_output_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """A server (here a hostile stand-in on loopback) lists artifact paths that lead out of the folder."""
    listing = {"job_id": "job-1", "checkpoints": [], "final": True, "total_size": 2,
               "artifacts": [{"path": "final/ok.txt", "size": 1}, {"path": "final/../../.bashrc", "size": 1}]}

    class Hostile(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = json.dumps(listing).encode() if self.path.endswith("/artifacts") else b"x"
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    hostile = ThreadingHTTPServer(("127.0.0.1", 0), Hostile)
    threading.Thread(target=hostile.serve_forever, daemon=True).start()
    try:
        monkeypatch.setenv("POSTTRAIN_SERVER", f"http://127.0.0.1:{hostile.server_address[1]}")
        out = tmp_path / "a" / "b" / "out"
        result = CliRunner().invoke(jobs_app, ["download", "job-1", "final", "-o", str(out)])
    finally:
        hostile.shutdown()
    assert result.exit_code == 1
    assert "final/../../.bashrc" in result.output and "leads outside" in result.output
    assert not (tmp_path / "a" / "b" / ".bashrc").exists() and not (out / "final" / "ok.txt").exists()
