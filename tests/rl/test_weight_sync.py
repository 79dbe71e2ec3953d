"""Each weight-sync mode really makes the server serve the trainer's new weights.

The "trainer" here is the test: it loads the same model the server loads, takes a few SGD steps (a
deliberate weight change), syncs, and checks the server's greedy output changed and now equals what the
trainer's own weights generate.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from pathlib import Path

import httpx
import pytest
import torch
from inference_harness import (
    free_port,
    get,
    greedy,
    local_greedy,
    serve_command,
    sgd_steps,
    start_server,
)
from transformers import AutoModelForCausalLM, AutoTokenizer
from waiting import wait_for

from posttrain.errors import ConfigError
from posttrain.modeling import resolve_model_path
from posttrain.weight_sync.strategies import SyncConfig, WeightSyncError, make_weight_sync

PROMPT = [1, 17, 42, 99, 7]
TARGET = "the cat sat on the mat and the dog sat on the log"


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(resolve_model_path("posttrain:tiny"))


def trainer_model(lora: bool = False):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(resolve_model_path("posttrain:tiny"), dtype=torch.float32)
    if lora:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"],
                                                 init_lora_weights=False))
    return model


def assert_serves_trainer_weights(url: str, model, tokenizer, before: list[int]) -> list[int]:
    after = greedy(url, PROMPT)
    assert after != before, "the server's output did not change after the sync"
    assert after == local_greedy(model, tokenizer, PROMPT), "the server does not serve the trainer's weights"
    return after


def test_shared_vllm_trains_the_served_weights_in_place(tmp_path: Path, tokenizer):
    server = start_server("posttrain:tiny", tmp_path, "--shared-weights", "--shared-weights-dir", str(tmp_path))
    sync = make_weight_sync(SyncConfig("shared_vllm", server_url=server.url, shared_weights_dir=tmp_path))
    try:
        model = sync.attach(trainer_model())
        before = greedy(server.url, PROMPT)
        assert before == local_greedy(model, tokenizer, PROMPT)

        sgd_steps(model, tokenizer, TARGET, steps=1, sync=sync)  # pauses generation before the step
        seconds = sync.after_update(model, step=1)

        assert seconds > 0  # a sync happened and was timed
        first = assert_serves_trainer_weights(server.url, model, tokenizer, before)
        sgd_steps(model, tokenizer, TARGET, steps=1, sync=sync)
        sync.after_update(model, step=2)
        assert_serves_trainer_weights(server.url, model, tokenizer, first)
    finally:
        sync.close()
        server.stop()
    assert not list(tmp_path.glob("*-weights-*")), "the server left its shared weights files behind"


def test_a_request_arriving_during_the_pause_is_served_by_the_new_weights(tmp_path: Path, tokenizer):
    server = start_server("posttrain:tiny", tmp_path, "--shared-weights", "--shared-weights-dir", str(tmp_path))
    sync = make_weight_sync(SyncConfig("shared_vllm", server_url=server.url, shared_weights_dir=tmp_path))
    try:
        model = sync.attach(trainer_model())
        before = greedy(server.url, PROMPT)
        sync.before_update()
        answer: list[list[int]] = []
        waiting = threading.Thread(target=lambda: answer.append(greedy(server.url, PROMPT)))
        waiting.start()
        wait_for(lambda: get(f"{server.url}/weights/info").json()["pending_requests"] == 1,
                 what="the request to reach the paused server")
        torch.manual_seed(1)
        with torch.no_grad():  # the optimizer step, by hand, while the request waits
            for param in model.parameters():
                param.add_(torch.randn_like(param) * 0.1)
        sync.after_update(model, step=1)
        waiting.join(timeout=120)
        assert answer and answer[0] != before
        assert answer[0] == local_greedy(model, tokenizer, PROMPT)
    finally:
        sync.close()
        server.stop()


def test_shared_vllm_refuses_a_server_without_shared_weights_and_a_mismatched_model(tmp_path: Path):
    server = start_server("posttrain:tiny", tmp_path)
    try:
        with pytest.raises(WeightSyncError, match="--shared-weights"):
            make_weight_sync(SyncConfig("shared_vllm", server_url=server.url, shared_weights_dir=tmp_path)).attach(trainer_model())
    finally:
        server.stop()
    server = start_server("posttrain:tiny", tmp_path, "--shared-weights", "--shared-weights-dir", str(tmp_path))
    try:
        with pytest.raises(Exception, match="does not match the served weights"):
            make_weight_sync(SyncConfig("shared_vllm", server_url=server.url, shared_weights_dir=tmp_path)).attach(trainer_model(lora=True))
    finally:
        server.stop()


def test_broadcast_sends_every_tensor_over_gloo(tmp_path: Path, tokenizer):
    server = start_server("posttrain:tiny", tmp_path)
    sync = make_weight_sync(SyncConfig("broadcast", server_url=server.url))
    try:
        model = sync.attach(trainer_model())
        before = greedy(server.url, PROMPT)
        sgd_steps(model, tokenizer, TARGET, steps=2)
        seconds = sync.after_update(model, step=1)
        assert seconds > 0
        first = assert_serves_trainer_weights(server.url, model, tokenizer, before)
        sgd_steps(model, tokenizer, TARGET, steps=2)
        sync.after_update(model, step=2)
        assert_serves_trainer_weights(server.url, model, tokenizer, first)
        assert get(f"{server.url}/weights/info").json()["version"] == 2
    finally:
        sync.close()
        server.stop()


def test_a_resumed_trainer_takes_over_the_broadcast_and_a_refused_init_fails_at_once(tmp_path: Path, tokenizer):
    """A trainer that crashed left its group on the server: the next one (--resume) must still attach.
    And when the server refuses the init (here: no API key), the trainer says why instead of waiting for
    the group's timeout."""
    server = start_server("posttrain:tiny", tmp_path, "--api-key", "k")
    headers = {"Authorization": "Bearer k"}

    def served() -> list[int]:
        body = {"prompt": {"prompt_token_ids": PROMPT}, "max_tokens": 8, "temperature": 0, "ignore_eos": True}
        return httpx.post(f"{server.url}/generate", json=body, headers=headers, timeout=120).json()["token_ids"][0]

    keyless = make_weight_sync(SyncConfig("broadcast", server_url=server.url, api_key=None))
    crashed = make_weight_sync(SyncConfig("broadcast", server_url=server.url, api_key="k"))
    resumed = make_weight_sync(SyncConfig("broadcast", server_url=server.url, api_key="k"))
    try:
        with pytest.raises(WeightSyncError, match=r"401.*API key"):
            keyless.attach(trainer_model())
        crashed.attach(trainer_model())
        crashed.group = None  # it dies without closing its group on the server
        model = resumed.attach(trainer_model())
        before = served()
        sgd_steps(model, tokenizer, TARGET, steps=2)
        resumed.after_update(model, step=1)
        after = served()
        assert after != before and after == local_greedy(model, tokenizer, PROMPT)
    finally:
        for sync in (keyless, crashed, resumed):
            sync.close()
        server.stop()


@pytest.mark.parametrize("inplace", [False, True], ids=["new-name-per-version", "in-place"])
def test_lora_only_hot_loads_each_new_adapter(tmp_path: Path, tokenizer, inplace: bool):
    server = start_server("posttrain:tiny", tmp_path, "--enable-lora")
    sync = make_weight_sync(SyncConfig("lora_only", server_url=server.url, save_dir=tmp_path / "run",
                                       lora_inplace=inplace))
    try:
        model = sync.attach(trainer_model(lora=True))
        base = greedy(server.url, PROMPT)
        sync.after_update(model, step=1)
        first = assert_serves_trainer_weights(server.url, model, tokenizer, base)
        sgd_steps(model, tokenizer, TARGET, steps=3, lr=2.0)
        sync.after_update(model, step=2)
        second = assert_serves_trainer_weights(server.url, model, tokenizer, first)
        sgd_steps(model, tokenizer, TARGET, steps=3, lr=2.0)
        sync.after_update(model, step=3)  # from here on the server reuses a freed adapter slot
        assert_serves_trainer_weights(server.url, model, tokenizer, second)

        served = [m["id"] for m in get(f"{server.url}/v1/models").json()["data"]]
        assert served == ["posttrain:tiny", "policy" if inplace else "policy-step-3"]
        assert len(list((tmp_path / "run" / "adapters").iterdir())) == 1, "old adapter folders are removed"
    finally:
        sync.close()
        server.stop()


def test_none_saves_and_restarts_its_own_server_without_losing_a_request(tmp_path: Path, tokenizer):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    sync = make_weight_sync(SyncConfig("none", server_url=url, save_dir=tmp_path / "run", restart_interval=2,
                                       server_command=serve_command("posttrain:tiny", port),
                                       server_log=tmp_path / "server.log"))
    model = sync.attach(trainer_model())  # starts the server
    server_pid = sync.server.process.pid
    try:
        before = greedy(url, PROMPT)
        sgd_steps(model, tokenizer, TARGET, steps=2)
        assert sync.after_update(model, step=1) == 0.0, "step 1 is not a restart step with interval 2"
        assert greedy(url, PROMPT) == before

        answers: list[list[int]] = []
        stop = threading.Event()
        client = threading.Thread(target=retrying_client, args=(url, answers, stop))
        client.start()
        assert sync.after_update(model, step=2) > 0
        stop.set()
        client.join(timeout=120)

        assert_serves_trainer_weights(url, model, tokenizer, before)
        assert answers and all(len(a) == 8 for a in answers), "a request was lost during the restart"
        assert sync.server.process.pid != server_pid
    finally:
        sync.close()
    assert not sync.server.healthy()


def retrying_client(url: str, answers: list[list[int]], stop: threading.Event) -> None:
    """A client that retries until answered, as atroposlib's server clients do."""
    while not stop.is_set():
        for _attempt in range(600):
            try:
                answers.append(greedy(url, PROMPT))
                break
            except httpx.HTTPError:
                stop.wait(0.1)


def test_mode_mismatches_are_config_errors():
    with pytest.raises(ConfigError, match="server_command"):
        make_weight_sync(SyncConfig("none"))
    with pytest.raises(ConfigError, match="unknown weight bridge mode"):
        make_weight_sync(SyncConfig("nccl"))  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="LoRA"):
        make_weight_sync(SyncConfig("lora_only", server_url="http://127.0.0.1:9")).attach(trainer_model())


def test_bench_sync_measures_each_mode_and_checks_it_served_the_trainers_weights(tmp_path: Path):
    report_path = tmp_path / "weight_sync.json"
    result = subprocess.run([sys.executable, "-m", "posttrain.cli", "rl", "bench-sync", "--model", "posttrain:tiny",
                             "--steps", "1", "--modes", "lora_inplace,shared_vllm,broadcast", "-o", str(report_path)],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr

    report = json.loads(report_path.read_text())
    assert set(report["modes"]) == {"lora_inplace", "shared_vllm", "broadcast"}
    for mode, row in report["modes"].items():
        assert row["served_matches_trainer"] is True, mode
        assert row["runs"] == 1 and row["median_s"] > 0
    assert report["generation"]["single_request_tokens_per_s"] > 0
    assert "shared_vllm" in result.stdout


def test_bench_sync_refuses_unknown_modes():
    result = subprocess.run([sys.executable, "-m", "posttrain.cli", "rl", "bench-sync", "--modes", "fast"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "--modes 'fast'" in result.stderr
