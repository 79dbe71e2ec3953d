"""PPO (method ppo) with rollout_backend=server: answers sampled by a real `posttrain rl serve-inference`
process through its /generate, the actor's weights pushed to it by the online trainer's weight bridge.

The reward model is the tiny model with a (seeded, random) score head: these tests prove where the rollouts
came from and which weights the server holds afterwards, not that PPO learns (tests/test_ppo.py does that).
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from inference_harness import free_port, greedy, local_greedy, start_server
from waiting import stop_process, wait_for

from posttrain.errors import ConfigError
from posttrain.job.directory import JobDir
from posttrain.modeling import load_for_inference
from posttrain.spec import spec_from_dict
from posttrain.worker import run_worker

PROBE = [11, 12, 13, 14, 15]
PROMPTS = ["Describe the sky.", "Name a colour.", "Tell me about a car.", "Say something."]


def ppo_spec(prompts: Path, peft: str, **method) -> dict:
    return {
        "model": {"name_or_path": "posttrain:tiny"}, "peft": {"type": peft, "r": 8, "alpha": 16},
        "method": {"name": "ppo", "reward_model": "posttrain:tiny", "ppo_epochs": 2, "num_mini_batches": 2,
                   "response_length": 6, "temperature": 1.0, **method},
        "data": {"source": str(prompts)}, "tracking": {"report_to": []},
        "training": {"max_steps": 3, "per_device_train_batch_size": 2, "learning_rate": 2e-2, "logging_steps": 1,
                     "save_steps": None, "num_threads": 1},
    }


@pytest.fixture
def prompts_file(tmp_path: Path) -> Path:
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS))
    return path


@pytest.mark.parametrize("mode, peft, server_flags", [
    ("lora_only", "lora", ("--enable-lora", "--max-lora-rank", "8")),
    ("shared_vllm", "none", ("--shared-weights",)),
])
def test_ppo_samples_from_the_server_and_leaves_it_on_the_trained_weights(
        tmp_path: Path, tiny_model_dir: Path, prompts_file: Path, mode: str, peft: str,
        server_flags: tuple[str, ...]):
    server = start_server("posttrain:tiny", tmp_path, *server_flags)
    try:
        port = int(server.url.rsplit(":", 1)[1])
        spec = spec_from_dict(ppo_spec(prompts_file, peft, rollout_backend="server", weight_bridge_mode=mode,
                                       inference_port=port))
        result = run_worker(spec, tmp_path / "run", log_to_file=False)
        assert result.state == "succeeded", result.error
        metrics = JobDir(tmp_path / "run").read_metrics()
        assert [m["step"] for m in metrics] == [1, 2, 3]
        assert all(m["sync_seconds"] > 0 and m["generation_tokens_per_s"] > 0 for m in metrics), metrics
        assert all(m["response_length"] > 0 for m in metrics)
        served = greedy(server.url, PROBE)
        final, tokenizer = load_for_inference(JobDir(tmp_path / "run").final_dir)
        assert served == local_greedy(final, tokenizer, PROBE)
        base, tokenizer = load_for_inference(tiny_model_dir)
        assert served != local_greedy(base, tokenizer, PROBE)  # the server does not hold the untrained model
    finally:
        server.stop()
    assert not server.running


def test_none_mode_starts_restarts_and_stops_its_own_server(tmp_path: Path, prompts_file: Path):
    port = free_port()
    spec = spec_from_dict(ppo_spec(prompts_file, "none", rollout_backend="server", weight_bridge_mode="none",
                                   inference_port=port, restart_interval=2))
    result = run_worker(spec, tmp_path / "run", log_to_file=False)
    assert result.state == "succeeded", result.error
    metrics = JobDir(tmp_path / "run").read_metrics()
    # Restarted on the step-2 weights only; step 3 sampled from the restarted server.
    assert [m["sync_seconds"] > 0 for m in metrics] == [False, True, False]
    assert metrics[2]["generated_tokens"] > 0
    assert (tmp_path / "run" / "sync" / "server-weights" / "step-2" / "config.json").is_file()
    assert nothing_listens_on(port)  # the trainer stopped the server it started


def nothing_listens_on(port: int) -> bool:
    # Not a bind test: the killed server's keep-alive connections leave the port in TIME_WAIT for a minute.
    try:
        socket.create_connection(("127.0.0.1", port), timeout=5).close()
    except ConnectionRefusedError:
        return True
    return False


@pytest.mark.parametrize("method, peft, message", [
    ({"rollout_backend": "server", "weight_bridge_mode": "lora_only"}, "none", "lora_only trains an adapter"),
    ({"rollout_backend": "server", "weight_bridge_mode": "shared_vllm"}, "lora", "syncs the whole model"),
    ({"inference_port": 9100}, "lora", "method.inference_port only applies to method.rollout_backend=server"),
    ({"rollout_backend": "vllm"}, "lora", "method.rollout_backend"),
])
def test_server_rollout_settings_are_checked(tmp_path: Path, method: dict, peft: str, message: str):
    with pytest.raises(ConfigError, match=message.replace(".", r"\.")):
        spec_from_dict(ppo_spec(tmp_path / "prompts.jsonl", peft, **method))


def test_server_rollouts_are_the_tensors_in_process_sampling_builds(tmp_path: Path, tiny_model_dir: Path):
    """Greedy, so both samplers must agree token for token: ids, padding, answer mask, EOS flags, texts."""
    import torch

    from posttrain.rl.ppo.rollouts import inprocess_sampler, sample_rollouts
    from posttrain.rl.ppo.server_sampler import ServerSampler

    model, tokenizer = load_for_inference(tiny_model_dir)
    prompts = [[{"role": "user", "content": p}] for p in PROMPTS]
    server = start_server("posttrain:tiny", tmp_path)
    sampler = ServerSampler(server.url)
    try:
        remote = sample_rollouts(sampler.complete, tokenizer, prompts, 12, 0.0, 64, "cpu")
    finally:
        sampler.close()
        server.stop()
    local = sample_rollouts(inprocess_sampler(model, tokenizer), tokenizer, prompts, 12, 0.0, 64, "cpu")
    for name in ("input_ids", "attention_mask", "position_ids", "mask", "ended"):
        assert torch.equal(getattr(remote, name), getattr(local, name)), name
    assert remote.texts == local.texts and remote.context_length == local.context_length
    assert remote.generated_tokens > 0


def test_an_unreachable_server_fails_the_job_with_its_address(tmp_path: Path, prompts_file: Path):
    port = free_port()  # nothing listens there
    spec = spec_from_dict(ppo_spec(prompts_file, "lora", rollout_backend="server", weight_bridge_mode="lora_only",
                                   inference_port=port))
    result = run_worker(spec, tmp_path / "run", log_to_file=False)
    assert result.state == "failed"
    assert f"127.0.0.1:{port}" in result.error and "unreachable" in result.error, result.error


def test_a_server_without_generate_is_named_as_such(tmp_path: Path):
    """A server that lacks the route (as a plain `vllm serve`); Python's http.server stands in for one."""
    from posttrain.inference.generation import SamplingParams
    from posttrain.rl.ppo.server_sampler import GenerationError, ServerSampler

    port = free_port()
    other = subprocess.Popen([sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1",
                              "--directory", str(tmp_path)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    sampler = ServerSampler(f"http://127.0.0.1:{port}")
    try:
        wait_for(lambda: not nothing_listens_on(port), timeout=60, what="http.server")
        with pytest.raises(GenerationError, match="no POST /generate route"):
            sampler.complete([[11, 12]], SamplingParams(max_tokens=2))
    finally:
        sampler.close()
        stop_process(other, grace=10)
