"""Bad requests get a 4xx with a JSON message that says what is wrong, and the server keeps serving."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from service_harness import ServerProcess, free_port, module_server, train_spec

from posttrain.client import Client, ServiceError

KEY = "pt-test-key-0123456789"
OTHER_KEY = "pt-second-key-abcdef"


@pytest.fixture(scope="module")
def server(request, tmp_path_factory):
    keys = tmp_path_factory.mktemp("keys") / "keys.txt"
    # One key stored as its hash, one in plain text (hashed when the server reads it).
    keys.write_text(f"# team keys\nsha256:{hashlib.sha256(KEY.encode()).hexdigest()}\n{OTHER_KEY}\n")
    yield from module_server(request, tmp_path_factory, "--api-key-file", str(keys), "--max-upload-mb", "1",
                             "--max-body-mb", "1", "--allow-path", str(tmp_path_factory.getbasetemp()),
                             api_key=KEY)


@pytest.fixture
def http(server: ServerProcess):
    with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {KEY}"}, timeout=30) as client:
        yield client


def error_of(response: httpx.Response) -> str:
    body = response.json()
    assert isinstance(body["detail"], str) and body["detail"]
    return body["detail"]


def expect_error(call, status: int) -> str:
    with pytest.raises(ServiceError) as caught:
        call()
    assert caught.value.status_code == status, caught.value.message
    return caught.value.message


def test_malformed_json_is_400(http: httpx.Client):
    response = http.post("/v1/jobs", content=b'{"spec": {"training": ', headers={"Content-Type": "application/json"})
    assert response.status_code == 400
    assert "not valid JSON" in error_of(response)


def test_wrong_body_shape_is_422(http: httpx.Client):
    response = http.post("/v1/jobs", json={"spec": {}, "yaml": "training: {}"})
    assert response.status_code == 422 and "either 'spec' or 'yaml'" in error_of(response)
    response = http.post("/v1/jobs", json={"specs": {}})
    assert response.status_code == 422 and "specs: unknown field" in error_of(response)


def test_unknown_spec_key_names_its_dotted_path(server: ServerProcess):
    with server.client() as client:
        message = expect_error(lambda: client.submit({"training": {"max_stepz": 3}}), 422)
        assert "training.max_stepz" in message and "training.max_steps" in message
        message = expect_error(lambda: client.submit(yaml="training:\n  max_steps: 2\n", overrides=["training.lr=1"]), 422)
        assert "training.lr" in message
        message = expect_error(lambda: client.submit(yaml="training: [1, 2\n"), 422)
        assert "not valid YAML" in message


def test_output_dir_outside_the_data_dir_is_refused(server: ServerProcess, tmp_path: Path):
    with server.client() as client:
        message = expect_error(lambda: client.submit({"output": {"dir": str(tmp_path / "elsewhere")}}), 422)
    assert "output.dir" in message and "remove output.dir" in message
    assert not (tmp_path / "elsewhere").exists()


def test_a_keyed_server_reads_only_uploads_and_allowed_folders(server: ServerProcess):
    with server.client() as client:
        message = expect_error(lambda: client.submit({"data": {"source": "/etc"}}), 422)
        assert "data.source" in message and "outside the folders jobs may read" in message
        assert "passwd" not in message
        message = expect_error(lambda: client.submit({"model": {"name_or_path": "/usr/lib"}}), 422)
        assert "model.name_or_path" in message
        assert client.list_jobs().total == 0


def test_missing_dataset_and_bad_rows_are_rejected_at_submit(server: ServerProcess, tmp_path: Path):
    bad_rows = tmp_path / "bad.jsonl"
    bad_rows.write_text('{"instruction": "a", "output": "b"}\n{"instruction": "c", "output": "d"}\n{"colour": "red"}\n')
    with server.client() as client:
        message = expect_error(lambda: client.submit({"data": {"source": str(tmp_path / "nope.jsonl")}}), 422)
        assert "nope.jsonl" in message and "does not exist" in message
        message = expect_error(lambda: client.submit({"data": {"source": str(bad_rows), "format": "alpaca"}}), 422)
        assert "bad.jsonl" in message and "row 3" in message
        message = expect_error(lambda: client.submit({"data": {"source": "upload:file-0000"}}), 422)
        assert "data.source" in message and "file-0000" in message
        # Nothing was queued by any of the rejected submissions.
        assert client.list_jobs().total == 0


def test_oversize_upload_and_body_are_413(server: ServerProcess, tmp_path: Path, http: httpx.Client):
    big = tmp_path / "big.jsonl"
    big.write_bytes(b'{"text": "' + b"x" * (2 * 1024 * 1024) + b'"}\n')
    with server.client() as client:
        message = expect_error(lambda: client.upload(big), 413)
    assert "limit" in message
    assert not any((server.data_dir / "files").iterdir())  # nothing half-written is kept
    response = http.post("/v1/jobs", json={"yaml": "# " + "y" * (2 * 1024 * 1024)})
    assert response.status_code == 413 and "request body" in error_of(response)


def test_missing_and_wrong_keys(server: ServerProcess):
    with httpx.Client(base_url=server.url) as anonymous:
        response = anonymous.get("/v1/jobs")
        assert response.status_code == 401 and "Authorization: Bearer" in error_of(response)
        assert response.headers["www-authenticate"] == "Bearer"
        assert anonymous.get("/healthz").status_code == 200  # health checks need no key
        assert anonymous.get("/readyz").status_code == 200
    with Client(server.url, api_key="not-a-key") as wrong:
        assert "not accepted" in expect_error(wrong.list_jobs, 403)
    with Client(server.url, api_key=OTHER_KEY) as other:
        assert other.list_jobs().total == 0  # accepted, and sees only its own owner's jobs (none)


def test_artifact_paths_cannot_leave_the_job_dir(server: ServerProcess, http: httpx.Client):
    with server.client() as client:
        job = client.submit(train_spec(max_steps=2))
        client.cancel(job.id)
        job = client.wait(job.id, timeout=60)
        job_dir = server.data_dir / "jobs" / job.id
        (job_dir / "escape").symlink_to(server.data_dir / "posttrain.db")

        base = f"/v1/jobs/{job.id}/artifacts/"
        for path, status in [("%2e%2e/%2e%2e/posttrain.db", 400), ("..%2F..%2Fposttrain.db", 400),
                             ("%2Fetc%2Fpasswd", 400), ("escape", 404), ("checkpoints/nothing", 404)]:
            response = http.get(base + path)
            assert response.status_code == status, (path, response.text)
            error_of(response)
        assert http.get(base + "spec.json").json()["output"]["dir"] == str(job_dir)
        assert expect_error(lambda: client.get_job("../../etc"), 404)
        assert "no job" in expect_error(lambda: client.get_job("job-missing"), 404)
        client.delete(job.id)


def test_server_keeps_serving_after_bad_requests(server: ServerProcess):
    with server.client() as client:
        assert client.ready()
        assert client.list_jobs().total == 0


def test_refuses_a_public_bind_without_keys(tmp_path: Path):
    result = subprocess.run(
        [sys.executable, "-m", "posttrain.cli", "serve", "--host", "0.0.0.0", "--port", str(free_port()),
         "--data-dir", str(tmp_path / "data")],
        capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 2
    assert "refusing to listen on 0.0.0.0 without API keys" in result.stderr
    assert "--insecure" in result.stderr


def test_error_bodies_are_json_with_a_message(http: httpx.Client):
    for response in (http.get("/v1/nothing"), http.delete("/v1/jobs/job-missing"), http.get("/v1/jobs?limit=0")):
        assert 400 <= response.status_code < 500
        assert response.headers["content-type"].startswith("application/json")
        error_of(response)
    assert json.loads(http.get("/openapi.json").text)["paths"]["/v1/jobs"]


def test_a_second_server_on_the_same_data_dir_is_refused(server: ServerProcess):
    result = subprocess.run(
        [sys.executable, "-m", "posttrain.cli", "serve", "--port", str(free_port()), "--data-dir", str(server.data_dir)],
        capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 2
    assert f"another posttrain server (pid {server.process.pid}) is using data dir" in result.stderr


def test_yaml_anchors_and_aliases_are_refused_before_anything_expands_them(server: ServerProcess):
    bomb = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"{chr(98 + i)}: &{chr(98 + i)} [*{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, "
        f"*{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}]\n" for i in range(8))
    assert len(bomb) < 600  # ~9^9 = 387 million strings once expanded
    with server.client() as client:
        for text in (bomb, "training: &t {max_steps: 2}\nother: *t\n", "a: &a [*a]\n"):
            message = expect_error(lambda text=text: client.submit(yaml=text), 422)
            assert "anchors and aliases" in message
        message = expect_error(lambda: client.submit(overrides=["training.max_steps=&n 5"]), 422)
        assert "anchors and aliases" in message
        assert client.list_jobs().total == 0


def test_huge_numbers_are_4xx_not_500(http: httpx.Client):
    for query in ("offset=10298380732861884729959383040", "limit=99999999999999999999", "offset=-1"):
        response = http.get(f"/v1/jobs?{query}")
        assert response.status_code == 422, (query, response.text)
        assert "offset" in error_of(response) or "limit" in error_of(response)
    response = http.get("/v1/jobs/job-x/metrics?since_step=99999999999999999999999")
    assert response.status_code in (404, 422)
    for spec, key in [({"training": {"max_steps": 3_000_000_000}}, "training.max_steps"),
                      ({"training": {"seed": 2**70}}, "training.seed"),
                      ({"peft": {"r": 10**30}}, "peft.r"),
                      ({"training": {"learning_rate": "Infinity"}}, "training.learning_rate")]:
        response = http.post("/v1/jobs", json={"spec": spec})
        assert response.status_code == 422, (spec, response.text)
        assert key in error_of(response)
    response = http.post("/v1/jobs", json={"spec": {}, "priority": 10**40})
    assert response.status_code == 422 and "priority" in error_of(response)


def test_deep_nesting_is_a_typed_4xx(http: httpx.Client):
    deep_json = '{"spec": {"data": {"columns": ' + "[" * 100_000 + "]" * 100_000 + "}}}"
    response = http.post("/v1/jobs", content=deep_json, headers={"Content-Type": "application/json"})
    assert 400 <= response.status_code < 500, response.text
    error_of(response)
    nested = {"spec": {"data": {"columns": {"a": json.loads("[" * 200 + "]" * 200)}}}}
    response = http.post("/v1/jobs", json=nested)
    assert response.status_code == 422 and "nested more than" in error_of(response)
    for text in ("[" * 50_000, "a:\n" + "".join(" " * i + "- \n" for i in range(1, 400))):
        response = http.post("/v1/jobs", json={"yaml": text})
        assert response.status_code == 422, response.text[:300]
        assert "nested more than" in error_of(response) or "not valid YAML" in error_of(response)


def test_bad_data_files_are_named_422s(server: ServerProcess, tmp_path: Path):
    huge_field = tmp_path / "huge.csv"
    huge_field.write_text('instruction,output\nhi,there\n"' + "x" * 200_000 + '",y\n')
    deep_row = tmp_path / "deep.jsonl"
    deep_row.write_text('{"instruction": "a", "output": "b"}\n' + '{"instruction": ' + "[" * 100_000 + "]" * 100_000
                        + ', "output": "c"}\n')
    with server.client() as client:
        for path, where in [(huge_field, "row 2"), (deep_row, "row 2")]:
            upload = client.upload(path)
            message = expect_error(lambda upload=upload: client.submit(
                {"data": {"source": upload.source, "format": "alpaca"}}), 422)
            assert path.name in message and where in message, message
            client.delete_file(upload.id)


def test_a_large_dataset_is_checked_at_submit_only_as_a_sample_and_the_worker_names_the_bad_row(
        server: ServerProcess, tmp_path: Path):
    rows = tmp_path / "many.jsonl"
    lines = [json.dumps({"instruction": f"Say {i}.", "output": str(i)}) for i in range(6000)]
    lines[4999] = json.dumps({"colour": "red"})  # row 5000: beyond the submit-time sample
    rows.write_text("\n".join(lines) + "\n")
    with server.client() as client:
        upload = client.upload(rows)
        job = client.submit({**train_spec(max_steps=2), "data": {"source": upload.source, "format": "alpaca"}})
        job = client.wait(job.id, timeout=180)
        assert job.state == "failed" and "row 5000" in job.error and "many.jsonl" in job.error
        client.delete(job.id)
        # A hub dataset id is not downloaded by the API process: accepted, and left to the worker.
        job = client.submit({**train_spec(max_steps=2), "data": {"source": "someone/not-a-real-dataset"}})
        job = client.wait(job.id, timeout=180)
        assert job.state == "failed" and "someone/not-a-real-dataset" in job.error
        client.delete(job.id)
        client.delete_file(upload.id)


def test_listing_reads_only_the_database(server: ServerProcess):
    with server.client() as client:
        job = client.submit(train_spec(max_steps=1))
        client.wait(job.id, timeout=180)
        assert client.get_job(job.id).metrics is not None  # one job: its directory is read
        listed = next(j for j in client.list_jobs().jobs if j.id == job.id)
        assert listed.metrics is None and listed.started_at is None  # a page of jobs: only their records
        assert listed.step == client.get_job(job.id).step
        client.delete(job.id)


def test_every_route_but_health_needs_a_key(server: ServerProcess):
    # Auth is a dependency of the routers, not of each route: a route added later is not public by accident.
    paths = json.loads(httpx.get(f"{server.url}/openapi.json").text)["paths"]
    with httpx.Client(base_url=server.url) as anonymous:
        checked = 0
        for path, operations in paths.items():
            url = path.replace("{job_id}", "job-x").replace("{file_id}", "file-x").replace("{path}", "final/x")
            for method in operations:
                response = anonymous.request(method.upper(), url)
                expected = 200 if path in ("/healthz", "/readyz") else 401
                assert response.status_code == expected, (method, path, response.status_code)
                checked += 1
    assert checked >= 14
