"""On a keyed (shared) server a job writes only in its own directory, forks no more ranks than the operator
allows, and connects only to loopback hosts or those the operator listed. A real server process."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from service_harness import ServerProcess, module_server, write_key_file

from posttrain.client import ServiceError

KEY = "pt-reach-alice"
ALLOWED_HOST = "trajectories.internal"


@pytest.fixture(scope="module")
def allowed_folder(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("readable")


@pytest.fixture(scope="module")
def server(request, tmp_path_factory, allowed_folder):
    keys = write_key_file(tmp_path_factory.mktemp("reach-keys") / "keys.txt", [f"{KEY} alice"])
    yield from module_server(request, tmp_path_factory, "--api-key-file", str(keys), "--cancel-grace", "5",
                             "--allow-path", str(allowed_folder), "--max-processes-per-job", "2",
                             "--max-restarts-per-job", "1", "--allow-network-host", ALLOWED_HOST, api_key=KEY)


def online(**method: object) -> dict:
    return {"model": {"name_or_path": "posttrain:tiny"}, "peft": {"type": "none"},
            "method": {"name": "online_grpo", "sync_weights": False, **method},
            "training": {"max_steps": 1, "num_threads": 1}, "tracking": {"report_to": []}}


def ppo_on_a_server(**method: object) -> dict:
    """PPO sampling from an inference server: it syncs weights there, like online_grpo."""
    return {"model": {"name_or_path": "posttrain:tiny"}, "peft": {"type": "none"},
            "data": {"source": "posttrain:preference"},
            "method": {"name": "ppo", "reward_model": "posttrain:tiny", "rollout_backend": "server",
                       "weight_bridge_mode": "shared_vllm", **method},
            "training": {"max_steps": 1, "num_threads": 1}, "tracking": {"report_to": []}}


def torchrun(**distributed: object) -> dict:
    return {"training": {"max_steps": 1, "num_threads": 1}, "tracking": {"report_to": []},
            "distributed": {"launcher": "torchrun", **distributed}}


def refusal(server: ServerProcess, spec: dict) -> ServiceError:
    with server.client() as client, pytest.raises(ServiceError) as caught:
        client.submit(spec)
    return caught.value


def test_sync_dir_outside_the_job_s_own_directory_is_refused(server: ServerProcess, allowed_folder: Path):
    # The uploads folder and --allow-path folders are readable, never writable: the trainer empties sync_dir.
    for sync_dir in (str(server.data_dir / "files"), str(allowed_folder), "../../files", "/tmp"):
        for spec in (online(sync_dir=sync_dir), ppo_on_a_server(sync_dir=sync_dir)):
            error = refusal(server, spec)
            assert error.status_code == 422, (sync_dir, spec["method"]["name"])
            assert "method.sync_dir" in error.message and "outside this job's own directory" in error.message


def test_a_relative_sync_dir_lands_in_the_job_s_directory(server: ServerProcess):
    with server.client() as client:
        job = client.submit(online(sync_dir="weights"))
        try:
            job_dir = server.data_dir / "jobs" / job.id
            spec = json.loads((job_dir / "spec.json").read_text())
            assert spec["method"]["sync_dir"] == str((job_dir / "weights").resolve())
        finally:
            client.cancel(job.id)
            client.wait(job.id, timeout=120)


@pytest.mark.parametrize("distributed, message", [
    ({"nproc_per_node": 3}, "= 3 processes; this server allows at most 2 per job (--max-processes-per-job)"),
    ({"nproc_per_node": 2, "nnodes": 2, "rdzv_endpoint": "127.0.0.1:29400"}, "= 4 processes"),
    ({"nproc_per_node": 1, "max_restarts": 500}, "distributed.max_restarts=500; this server allows at most 1"),
])
def test_too_many_processes_are_refused(server: ServerProcess, distributed: dict, message: str):
    error = refusal(server, torchrun(**distributed))
    assert error.status_code == 403 and message in error.message


@pytest.mark.parametrize("spec, key", [
    (online(api_url="http://10.0.0.5:8000"), "method.api_url: host '10.0.0.5'"),
    (online(sync_weights=True, inference_host="gpu-7.example"), "method.inference_host: host 'gpu-7.example'"),
    (ppo_on_a_server(inference_host="gpu-7.example"), "method.inference_host: host 'gpu-7.example'"),
    (torchrun(nproc_per_node=1, nnodes=2, rdzv_endpoint="10.1.1.1:29400"), "distributed.rdzv_endpoint: host"),
])
def test_network_targets_the_operator_did_not_allow_are_refused(server: ServerProcess, spec: dict, key: str):
    error = refusal(server, spec)
    assert error.status_code == 403 and key in error.message and "--allow-network-host" in error.message


def test_loopback_and_allowed_hosts_are_accepted(server: ServerProcess):
    with server.client() as client:
        for spec in (online(api_url="http://localhost:8000"), online(api_url=f"http://{ALLOWED_HOST}:8000")):
            job = client.submit(spec)
            client.cancel(job.id)
            client.wait(job.id, timeout=120)


def test_a_server_without_keys_keeps_its_one_user_s_freedom(start_server, tmp_path: Path):
    server = start_server("--max-processes-per-job", "1")
    with server.client() as client:
        job = client.submit(online(api_url="http://10.0.0.5:8000", sync_dir=str(tmp_path / "sync")))
        client.cancel(job.id)
        client.wait(job.id, timeout=120)
