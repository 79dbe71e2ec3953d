"""The online_grpo JobSpec: what `posttrain rl train` builds, what it refuses, and the same job submitted to
the job service (a real `posttrain serve`, a real run-api, a real worker)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from trajectory_api import TrajectoryAPI, scored_group

from posttrain.errors import ConfigError
from posttrain.spec import spec_from_dict

sys.path.insert(0, str(Path(__file__).parents[1] / "service"))
from service_harness import ServerProcess, kill_workers


def rl_train(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "posttrain.cli", "rl", "train", *args], capture_output=True,
                          text=True, timeout=120)


def test_rl_train_flags_build_a_job_spec_the_service_accepts():
    shown = rl_train("--model-name", "posttrain:smollm2", "--weight-bridge-mode", "lora_only", "--training-steps",
                     "50", "--batch-size", "8", "--lr", "1e-5", "--save-path", "runs/rl", "--lora-r", "8",
                     "--lora-alpha", "16", "--vllm-port", "9011", "--api-url", "http://10.0.0.5:8000",
                     "--checkpoint-interval", "5", "--print-spec", "method.clip_epsilon_high=0.28")
    assert shown.returncode == 0, shown.stderr
    data = yaml.safe_load(shown.stdout)
    assert "output" not in data  # the service chooses the job directory
    spec = spec_from_dict(data)
    assert spec.method.name == "online_grpo"
    assert (spec.method.weight_bridge_mode, spec.method.inference_port, spec.method.api_url) == \
        ("lora_only", 9011, "http://10.0.0.5:8000")
    assert spec.method.clip_epsilon_high == 0.28
    assert (spec.peft.type, spec.peft.r, spec.peft.alpha) == ("lora", 8, 16)
    assert (spec.training.max_steps, spec.training.per_device_train_batch_size, spec.training.learning_rate,
            spec.training.save_steps) == (50, 8, 1e-5, 5)


@pytest.mark.parametrize("changes, message", [
    ({"method": {"name": "online_grpo", "weight_bridge_mode": "lora_only"}, "peft": {"type": "none"}},
     "lora_only trains an adapter: set peft.type=lora"),
    ({"method": {"name": "online_grpo", "weight_bridge_mode": "shared_vllm"}, "peft": {"type": "lora"}},
     "syncs the whole model: set peft.type=none"),
    ({"method": {"name": "online_grpo"}, "peft": {"type": "none"}, "training": {"max_steps": -1}},
     "set training.max_steps"),
    ({"method": {"name": "online_grpo"}, "peft": {"type": "none"}, "training": {"max_steps": 3, "optim": "sgd"}},
     "training.optim must be one of"),
    ({"method": {"name": "online_grpo", "loss_typ": "dapo"}, "training": {"max_steps": 3}},
     "did you mean 'method.loss_type'"),
    ({"method": {"name": "online_grpo"}, "peft": {"type": "none"}, "distributed": {"launcher": "torchrun"}},
     "method online_grpo runs in a single process only"),
    ({"method": {"name": "ppo", "reward_model": "posttrain:tiny"}, "distributed": {"launcher": "torchrun",
                                                                                  "nproc_per_node": 2}},
     "method ppo runs in a single process only"),
])
def test_online_specs_that_cannot_work_are_refused_with_the_reason(changes, message):
    data = {"training": {"max_steps": 3}, **changes}
    with pytest.raises(ConfigError, match=message):
        spec_from_dict(data)


def test_a_bad_flag_value_is_an_error_without_a_traceback():
    result = rl_train("--model-name", "posttrain:tiny", "--weight-bridge-mode", "lora_only", "--lora-r", "0",
                      "--print-spec")
    assert result.returncode == 2 and "peft.r" in result.stderr and "Traceback" not in result.stderr


def test_an_online_job_runs_through_the_job_service(tmp_path: Path):
    server = ServerProcess(tmp_path / "data", "--slots", "1")
    with TrajectoryAPI(tmp_path / "api.log") as api:
        try:
            server.start()
            with server.client() as client:
                job = client.submit({
                    "name": "online", "model": {"name_or_path": "posttrain:tiny"},
                    "method": {"name": "online_grpo", "api_url": api.url, "sync_weights": False,
                               "poll_interval": 0.1},
                    "peft": {"type": "none"},
                    "training": {"max_steps": 2, "per_device_train_batch_size": 4, "max_seq_length": 64,
                                 "learning_rate": 1e-3, "num_threads": 1},
                    "tracking": {"report_to": []},
                })
                assert job.method == "online_grpo"
                api.wait_for_trainer()
                for _ in range(2):
                    api.post_group(scored_group([11, 12], [[21], [31], [21], [31]], [1.0, 0.0, 1.0, 0.0]))
                done = client.wait(job.id, timeout=300)
                assert done.state == "succeeded", client.logs(job.id)
                metrics = client.metrics(job.id)
                assert [m["step"] for m in metrics] == [1, 2]
                assert all(m["reward_mean"] == 0.5 and "mean_ratio" in m for m in metrics)
        finally:
            server.stop()
            kill_workers(server.data_dir)
