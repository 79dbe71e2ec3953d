"""Keys belong to owners: each owner reaches only their own jobs and uploads; an admin key reaches all.
A keyed server runs no code that a job brings along unless its operator allowed it."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import httpx
import pytest
from service_harness import ServerProcess, module_server, train_spec, write_key_file
from waiting import wait_for

from posttrain.client import ServiceError

ALICE, ALICE_LAPTOP, BOB, OPS, LEGACY = "pt-alice-1", "pt-alice-2", "pt-bob", "pt-ops", "pt-legacy-only-a-key"


@pytest.fixture(scope="module")
def server(request, tmp_path_factory):
    keys = write_key_file(tmp_path_factory.mktemp("tenant-keys") / "keys.txt", [
        f"{ALICE} alice",
        f"sha256:{hashlib.sha256(ALICE_LAPTOP.encode()).hexdigest()} alice",
        f"{BOB} bob",
        f"{OPS} ops admin",
        LEGACY,  # a line with only a key: still valid, its own owner
    ])
    yield from module_server(request, tmp_path_factory, "--api-key-file", str(keys), "--cancel-grace", "5",
                             api_key=ALICE)


def status_of(call) -> int:
    with pytest.raises(ServiceError) as caught:
        call()
    return caught.value.status_code


def test_other_owners_get_404_and_an_admin_sees_and_manages_everything(server: ServerProcess, tmp_path: Path):
    dataset = tmp_path / "rows.jsonl"
    dataset.write_text("".join(json.dumps({"instruction": f"Say {i}.", "output": str(i)}) + "\n" for i in range(32)))
    alice, laptop, bob, ops, legacy = (server.client(key) for key in (ALICE, ALICE_LAPTOP, BOB, OPS, LEGACY))
    with alice, laptop, bob, ops, legacy:
        upload = alice.upload(dataset)
        spec = train_spec(max_steps=100_000, save_steps=1_000)
        spec["data"] = {"source": upload.source}
        job = alice.submit(spec)
        wait_for(lambda: alice.get_job(job.id).state == "running", 120, "the job to start")

        # Bob: the job and the upload do not exist for him, whatever he tries.
        artifact = "spec.json"
        for call in (lambda: bob.get_job(job.id), lambda: bob.logs(job.id), lambda: bob.metrics(job.id),
                     lambda: bob.artifacts(job.id), lambda: bob.download(job.id, artifact, tmp_path / "x"),
                     lambda: bob.cancel(job.id), lambda: bob.delete(job.id),
                     lambda: list(bob.follow_logs(job.id)), lambda: bob.get_file(upload.id),
                     lambda: bob.delete_file(upload.id)):
            assert status_of(call) == 404
        assert bob.list_jobs().total == 0 and bob.list_jobs().jobs == []
        with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {BOB}"}) as raw:
            assert raw.get("/v1/files").json()["data"] == []
        stolen = train_spec(max_steps=2)
        stolen["data"] = {"source": upload.source}
        with pytest.raises(ServiceError) as caught:
            bob.submit(stolen)
        assert caught.value.status_code == 422 and f"no uploaded file {upload.id!r}" in caught.value.message
        assert legacy.list_jobs().total == 0  # a key-only line is an owner of its own

        # Alice's other key is the same owner.
        assert laptop.get_job(job.id).state == "running"
        assert [j.id for j in laptop.list_jobs().jobs] == [job.id]
        assert laptop.get_file(upload.id).sha256 == upload.sha256

        # The admin sees everyone's and can stop it.
        assert job.id in [j.id for j in ops.list_jobs().jobs]
        assert ops.get_file(upload.id).id == upload.id
        ops.cancel(job.id)
        assert alice.wait(job.id, timeout=120).state == "cancelled"

        assert status_of(lambda: bob.delete(job.id)) == 404
        alice.delete(job.id)
        alice.delete_file(upload.id)
        assert status_of(lambda: ops.get_job(job.id)) == 404


def test_a_keyed_server_refuses_code_a_job_brings_and_names_the_option(server: ServerProcess):
    with server.client() as client:
        for spec, option in [
            ({"model": {"trust_remote_code": True}}, "model.trust_remote_code"),
            ({"method": {"name": "grpo", "reward_functions": ["numeric_match", "os:system"]},
              "data": {"source": "posttrain:gsm8k"}}, "method.reward_functions"),
            # An evaluation's python grader is code the job brings too.
            ({"eval": {"data": "posttrain:gsm8k", "graders": [
                {"type": "python", "name": "mine", "source": "def grade(sample, item):\n    return 1.0\n"}]}},
             "eval.graders"),
        ]:
            with pytest.raises(ServiceError) as caught:
                client.submit(spec)
            assert caught.value.status_code == 403
            assert option in caught.value.message and "--allow-user-code" in caught.value.message
        with pytest.raises(ServiceError) as caught:
            client.submit(yaml="model:\n  trust_remote_code: true\n")
        assert caught.value.status_code == 403
        # Built-in rewards are posttrain's own code: accepted.
        job = client.submit({"method": {"name": "grpo", "reward_functions": ["numeric_match"]},
                             "data": {"source": "posttrain:gsm8k"}, "training": {"max_steps": 1}})
        client.cancel(job.id)
        assert client.wait(job.id, timeout=120).state == "cancelled"


def test_a_keyed_server_answers_any_host_name(server: ServerProcess):
    # Keys already stop a rebinding page (it has no key to send); a keyed server is reached by any name.
    with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {ALICE}", "Host": "gpu-box.example"}
                      ) as http:
        assert http.get("/v1/jobs").status_code == 200


def test_allow_user_code_lets_a_keyed_server_accept_it_without_importing_it(start_server, tmp_path: Path):
    code = tmp_path / "code"
    code.mkdir()
    marker = tmp_path / "imported-by.txt"
    # Importing this module records which process imported it.
    (code / "marker_reward.py").write_text(
        "import os\n"
        f"with open({str(marker)!r}, 'a') as out:\n    out.write(f'{{os.getpid()}}\\n')\n"
        "def score(completions, **kwargs):\n    return [0.0 for _ in completions]\n"
    )
    keys = write_key_file(tmp_path / "keys.txt", ["pt-user-code alice"])
    server = start_server("--api-key-file", str(keys), "--allow-user-code", api_key="pt-user-code",
                          env={"PYTHONPATH": str(code)})
    with server.client() as client:
        job = client.submit({"method": {"name": "grpo", "reward_functions": ["marker_reward:score"]},
                             "data": {"source": "posttrain:gsm8k"}, "training": {"max_steps": 1}})
        assert job.state == "queued"
        with pytest.raises(ServiceError) as caught:  # its syntax is still checked
            client.submit({"method": {"name": "grpo", "reward_functions": ["not a module"]},
                           "data": {"source": "posttrain:gsm8k"}})
        assert caught.value.status_code == 422 and "method.reward_functions" in caught.value.message
        # The worker imports it; the API process never does.
        wait_for(marker.exists, 120, "the worker to import the reward module")
        assert str(server.process.pid) not in marker.read_text().split()
        client.cancel(job.id)
        client.wait(job.id, timeout=120)

