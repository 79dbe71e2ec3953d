"""``posttrain serve --inference-backend vllm``. vLLM needs a CUDA GPU, which this machine and CI lack: here
``vllm`` is a stand-in executable on PATH (stand_in_vllm.py), and the tests check what posttrain does around
it: the exact ``vllm serve`` command line it starts through ``posttrain rl serve-inference`` (one server for a
base and its adapters, runtime LoRA loading on, the key in the environment), the adapter loaded through
vLLM's adapter route before its first request, the request's ``model`` rewritten to vLLM's name and the
answer's back to the caller's, streams included; and that a server whose workers cannot find vLLM refuses
to start, saying why. The last test runs the real vLLM where CUDA and vLLM exist and skips elsewhere."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import httpx
import openai
import pytest
from service_harness import ServerProcess, train_spec

STAND_IN = Path(__file__).with_name("stand_in_vllm.py")


def openai_client(server: ServerProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=120)


def test_a_server_whose_workers_cannot_find_vllm_refuses_to_start(tmp_path: Path):
    path = os.pathsep.join([str(Path(sys.executable).parent), "/usr/bin", "/bin"])  # no vllm in any of them
    done = subprocess.run([sys.executable, "-m", "posttrain.cli", "serve", "--inference-backend", "vllm",
                           "--data-dir", str(tmp_path / "data")], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PATH": path})
    assert done.returncode == 2, done.stderr
    message = " ".join(done.stderr.split())
    assert "--inference-backend vllm needs vLLM installed" in message and "pip install vllm" in message
    assert "serve-inference --backend vllm --model posttrain:smollm2" in message  # what it would have run


def test_vllm_serves_the_base_and_its_adapters_through_one_server(start_server, tmp_path: Path):
    from posttrain.modeling import resolve_model_path

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "vllm").write_text(f"#!/bin/sh\nexec {sys.executable} {STAND_IN} \"$@\"\n")
    (bin_dir / "vllm").chmod(0o755)
    record = tmp_path / "vllm-calls.jsonl"
    # An adapter folder over posttrain:tiny (the stand-in never reads its weights), asked for by a link to
    # it: the name the caller uses differs from the folder vLLM loads it from.
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": "posttrain:tiny",
                                                             "peft_type": "LORA"}))
    (tmp_path / "link").symlink_to(adapter)
    asked_as = str(tmp_path / "link")
    server = start_server("--inference-backend", "vllm", "--no-warm-workers", env={
        "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "STAND_IN_VLLM_RECORD": str(record)})

    with openai_client(server) as client:
        reply = client.chat.completions.create(model="posttrain:tiny", messages=[{"role": "user", "content": "hi"}])
        assert reply.model == "posttrain:tiny" and reply.choices[0].message.content == "answered by posttrain:tiny"
        for _ in range(2):
            reply = client.chat.completions.create(model=asked_as, messages=[{"role": "user", "content": "hi"}])
            assert reply.model == asked_as
            assert reply.choices[0].message.content == f"answered by {adapter}"
        chunks = list(client.chat.completions.create(model=asked_as, stream=True,
                                                     messages=[{"role": "user", "content": "hi"}]))
        assert {chunk.model for chunk in chunks} == {asked_as}
        assert " ".join(chunk.choices[0].delta.content for chunk in chunks) == f"answered by {adapter}"
    assert server.readiness()["inference_backend"] == "vllm"

    calls = [json.loads(line) for line in record.read_text().splitlines()]
    started = [call for call in calls if "argv" in call]
    assert len(started) == 1  # the adapter joined its base's server
    port = started[0]["argv"][started[0]["argv"].index("--port") + 1]
    assert started[0] == {"argv": ["serve", resolve_model_path("posttrain:tiny"), "--host", "127.0.0.1", "--port", port,
                                   "--served-model-name", "posttrain:tiny", "--dtype", "auto", "--enable-lora",
                                   "--max-lora-rank", "64"],
                          "lora_updating": "True", "key": True}
    requests = [call for call in calls if "path" in call]
    assert all(call["authorized"] for call in requests)
    assert [(call["path"], call["body"].get("model") or call["body"]["lora_name"]) for call in requests] == [
        ("/v1/chat/completions", "posttrain:tiny"),
        ("/v1/load_lora_adapter", str(adapter)),  # once, before the adapter's first request
        ("/v1/chat/completions", str(adapter)), ("/v1/chat/completions", str(adapter)),
        ("/v1/chat/completions", str(adapter))]
    assert requests[1]["body"] == {"lora_name": str(adapter), "lora_path": str(adapter)}


def cuda_and_vllm() -> str | None:
    """Why the real-vLLM test cannot run here; None where it can."""
    import torch

    from posttrain.service.vllm_backend import find_vllm

    if not torch.cuda.is_available():
        return "needs a CUDA GPU (vLLM does not run on CPU)"
    if find_vllm(sys.executable) is None:
        return "needs vLLM installed (pip install vllm)"
    return None


@pytest.mark.gpu
def test_real_vllm_answers_for_the_base_and_a_trained_lora(start_server):
    missing = cuda_and_vllm()
    if missing:
        pytest.skip(missing)
    server = start_server("--inference-backend", "vllm", "--inference-device", "cuda")
    with server.client() as client:
        job = client.submit(train_spec(max_steps=2) | {"peft": {"type": "lora", "r": 8}})
        assert client.wait(job.id, timeout=600).state == "succeeded"
    with openai_client(server) as sdk:
        for model in ("posttrain:tiny", job.id):
            reply = sdk.chat.completions.create(model=model, max_tokens=8, temperature=0,
                                                messages=[{"role": "user", "content": "Say hello."}])
            assert reply.model == model and reply.usage.completion_tokens >= 1
    assert httpx.get(f"{server.url}/readyz", timeout=5).json()["inference_worker"] == "ready"
