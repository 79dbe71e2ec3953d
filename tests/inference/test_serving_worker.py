"""The serving worker as the job service runs it: a real `python -m posttrain.inference.serving` process on a
loopback port with a key, talked to over HTTP (streams read line by line, as OpenAI's SDK reads them)."""

from __future__ import annotations

import json
import sys

import httpx
import pytest
from ports import free_port
from waiting import wait_for

from posttrain.inference.model_source import SOURCE_HEADER, ModelSource
from posttrain.inference.process import API_KEY_VARIABLE, InferenceServerProcess

KEY = "worker-test-key"
HEADERS = {"Authorization": f"Bearer {KEY}"}
CHAT = {"model": "posttrain:tiny", "messages": [{"role": "user", "content": "Hi"}], "temperature": 0}


@pytest.fixture(scope="module")
def worker(tmp_path_factory):
    port = free_port()
    process = InferenceServerProcess([sys.executable, "-m", "posttrain.inference.serving", "--port", str(port),
                                      "--memory-mb", "2048", "--dtype", "float32"], f"http://127.0.0.1:{port}",
                                     log_path=tmp_path_factory.mktemp("worker") / "worker.log",
                                     env={API_KEY_VARIABLE: KEY}, startup_timeout=180)
    process.start()
    yield process
    process.stop()


def events(response: httpx.Response) -> list[dict | str]:
    found: list[dict | str] = []
    for line in response.iter_lines():
        if line.startswith("data: "):
            data = line.removeprefix("data: ")
            found.append(data if data == "[DONE]" else json.loads(data))
    return found


def loaded(worker) -> dict:
    return httpx.get(f"{worker.url}/v1/models", headers=HEADERS, timeout=60).json()


def test_the_worker_needs_its_key(worker):
    assert httpx.post(f"{worker.url}/v1/chat/completions", json=CHAT, timeout=60).status_code == 401


def test_a_stream_of_n_completions_has_each_choice_then_done(worker):
    body = {**CHAT, "n": 2, "max_tokens": 5, "stream": True, "stream_options": {"include_usage": True},
            "temperature": 1.0, "seed": 3}
    with httpx.stream("POST", f"{worker.url}/v1/chat/completions", json=body, headers=HEADERS, timeout=120) as reply:
        assert reply.status_code == 200 and reply.headers["content-type"].startswith("text/event-stream")
        chunks = events(reply)
    assert chunks[-1] == "[DONE]"
    usage = chunks[-2]
    assert usage["choices"] == [] and usage["usage"]["completion_tokens"] == 10
    choices = [c["choices"][0] for c in chunks[:-2]]
    for index in (0, 1):  # each choice opens with its role, then its text
        assert next(c["delta"] for c in choices if c["index"] == index) == {"role": "assistant", "content": ""}
    assert sorted(c["index"] for c in choices if c["finish_reason"]) == [0, 1]
    plain = httpx.post(f"{worker.url}/v1/chat/completions", json={**body, "stream": False}, headers=HEADERS,
                       timeout=120).json()
    for index in (0, 1):
        streamed = "".join(c["delta"].get("content", "") for c in choices if c["index"] == index)
        assert streamed == plain["choices"][index]["message"]["content"]


def test_a_client_that_goes_away_stops_its_generation(worker):
    # SmolLM2 at ~10 tokens/s on one CPU thread: its 2000 tokens would take minutes if nobody stopped them.
    body = {**CHAT, "model": "posttrain:smollm2", "max_tokens": 2000, "stream": True, "ignore_eos": True}
    with httpx.stream("POST", f"{worker.url}/v1/chat/completions", json=body, headers=HEADERS, timeout=120) as reply:
        lines = reply.iter_lines()  # held open: closing this iterator would close the stream
        assert next(lines).startswith("data: ")
        wait_for(lambda: running(worker, "smollm2") == (1, 1), 60, "the request to be generating")
    # The connection is closed: the row leaves the batch at the next step.
    wait_for(lambda: running(worker, "smollm2") == (0, 0), 60, "the abandoned request to stop")


def running(worker, model: str) -> tuple[int, int]:
    entry = next(m for m in loaded(worker)["data"] if model in m["model"])
    return entry["running"], entry["pending"]


def test_an_adapter_named_in_the_header_is_loaded_over_the_base_and_evicted_on_request(worker, tmp_path):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from posttrain.modeling import resolve_model_path

    torch.manual_seed(5)
    base = AutoModelForCausalLM.from_pretrained(resolve_model_path("posttrain:tiny"), dtype=torch.float32)
    model = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    model.save_pretrained(tmp_path / "adapter")
    source = ModelSource("posttrain:tiny", adapter=str(tmp_path / "adapter"))
    body = {**CHAT, "model": "mine", "max_tokens": 6}
    with_adapter = httpx.post(f"{worker.url}/v1/chat/completions", json=body, timeout=120,
                              headers={**HEADERS, SOURCE_HEADER: source.to_header()}).json()
    assert with_adapter["model"] == "mine"
    plain = httpx.post(f"{worker.url}/v1/chat/completions", json={**CHAT, "max_tokens": 6}, headers=HEADERS,
                       timeout=120).json()
    assert with_adapter["choices"][0]["message"] != plain["choices"][0]["message"]
    tiny = next(m for m in loaded(worker)["data"] if "tiny" in m["model"])
    assert tiny["adapters"] == [str((tmp_path / "adapter").resolve())]
    evicted = httpx.post(f"{worker.url}/v1/models/evict", json={"base": source.base, "adapter": source.adapter},
                         headers=HEADERS, timeout=60).json()
    assert evicted == {"evicted": True}
    assert next(m for m in loaded(worker)["data"] if "tiny" in m["model"])["adapters"] == []
