"""The config of `posttrain rl run`: the shipped examples load, the model and addresses reach every part, and
mistakes are reported with their key before anything starts."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from posttrain.errors import ConfigError
from posttrain.rl.loop.config import load_run_config, run_config_from_dict
from posttrain.rl.loop.runner import build_children

ROOT = Path(__file__).resolve().parents[2]
MINIMAL = {"environments": [{"name": "gsm8k"}],
           "trainer": {"method": {"name": "online_grpo", "weight_bridge_mode": "lora_only"}, "peft": {"type": "lora"},
                       "training": {"max_steps": 10}}}


@pytest.mark.parametrize("example", sorted((ROOT / "examples").glob("rl-*.yaml")), ids=lambda p: p.stem)
def test_the_examples_load(example):
    config = load_run_config(example)
    assert config.name == example.stem and config.directory() == Path("runs") / example.stem
    spec = config.trainer_spec()
    assert spec.method.name == "online_grpo" and spec.model.name_or_path == config.model


def test_the_model_and_addresses_are_filled_into_every_part(tmp_path):
    config = run_config_from_dict({**MINIMAL, "environments": [{"name": "gsm8k", "env": {"group_size": 2}}]},
                                  ["api.port=18001", "inference.port=18002"])
    spec = config.trainer_spec()
    assert (spec.method.api_url, spec.method.inference_port) == ("http://127.0.0.1:18001", 18002)
    children = {c.name: c for c in build_children(config, spec, tmp_path)}
    assert list(children) == ["api", "inference", "trainer", "env-gsm8k"]
    assert children["api"].ports == (("127.0.0.1", 18001),)
    inference = children["inference"].command
    assert inference[inference.index("--port") + 1] == "18002"
    assert inference[-3:] == ["--enable-lora", "--max-lora-rank", "16"]  # what lora_only needs of the server
    env = children["env-gsm8k"].command
    assert "--env.rollout_server_url=http://127.0.0.1:18001" in env
    assert "--openai.base_url=http://127.0.0.1:18002/v1" in env and "--openai.server_type=vllm" in env
    assert "--env.group_size=2" in env and "--env.total_steps=10" in env
    assert (tmp_path / "trainer" / "spec.json").exists()  # the worker's JobSpec, written before the start
    assert children["trainer"].command[-2:] == ["--job-dir", str(tmp_path / "trainer")]
    resumed = {c.name: c for c in build_children(config, spec, tmp_path, resume=True)}
    assert resumed["trainer"].command[-1] == "--resume"  # rl run --resume: from the newest checkpoint

    # Mode none: the trainer starts (and restarts) the server itself, on the run's inference port.
    none = run_config_from_dict({**MINIMAL, "trainer": {"method": "online_grpo", "training": {"max_steps": 1}}})
    children = {c.name: c for c in build_children(none, none.trainer_spec(), tmp_path / "none")}
    assert "inference" not in children and children["trainer"].ports == (("127.0.0.1", 9001),)
    assert none.trainer_spec().peft.type == "none"  # the whole model, as `posttrain rl train` chooses too
    shared = run_config_from_dict({**MINIMAL, "trainer": {"method": {"name": "online_grpo",
                                                                     "weight_bridge_mode": "shared_vllm"},
                                                          "training": {"max_steps": 1}}})
    children = {c.name: c for c in build_children(shared, shared.trainer_spec(), tmp_path / "shared")}
    assert children["inference"].command[-1] == "--shared-weights"


@pytest.mark.parametrize(("change", "message"), [
    ({"enviroments": []}, "unknown key 'enviroments'; did you mean 'environments'?"),
    ({"api": {"prot": 1}}, "unknown key 'api.prot'; did you mean 'port'?"),
    ({"api": {"port": 70000}}, "api.port: Input should be less than 65536"),
    ({"environments": []}, "environments: List should have at least 1 item"),
    ({"trainer": {"method": "sft"}}, "trainer.method.name must be online_grpo, got 'sft'"),
    ({"trainer": {"method": {"name": "online_grpo"}, "training": {"max_step": 3}}},
     "unknown key 'trainer.training.max_step'; did you mean 'trainer.training.max_steps'?"),
    ({"trainer": {"method": {"name": "online_grpo", "weight_bridge_mode": "lora_only"}, "peft": {"type": "none"},
                  "training": {"max_steps": 1}}},
     "trainer: method.weight_bridge_mode=lora_only trains an adapter: set peft.type=lora"),
    ({"trainer": {"method": "online_grpo"}},
     "trainer: method online_grpo trains a fixed number of batches: set training.max_steps (> 0)"),
])
def test_mistakes_are_named_with_their_key(change, message):
    with pytest.raises(ConfigError) as caught:
        run_config_from_dict({**MINIMAL, **change})
    assert message in caught.value.message


def test_rl_run_refuses_a_busy_port_before_starting_anything(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        config = tmp_path / "loop.yaml"
        config.write_text(yaml.safe_dump({**MINIMAL, "api": {"port": port}, "run_dir": str(tmp_path / "run")}))
        result = subprocess.run([sys.executable, "-m", "posttrain.cli", "rl", "run", str(config)], capture_output=True,
                                text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=120)
    assert result.returncode == 1
    assert f"api: port {port} on 127.0.0.1 is already in use by another process" in result.stderr
    assert "started" not in result.stderr
    bad = subprocess.run([sys.executable, "-m", "posttrain.cli", "rl", "run", str(tmp_path / "missing.yaml")],
                         capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=120)
    assert bad.returncode == 2 and "missing.yaml does not exist" in bad.stderr and "Traceback" not in bad.stderr


def test_one_api_key_per_run_reaches_the_server_trainer_and_environments(tmp_path, monkeypatch):
    from posttrain.rl.loop.runner import shared_weights_dir

    monkeypatch.delenv("POSTTRAIN_INFERENCE_API_KEY", raising=False)
    config = run_config_from_dict({**MINIMAL, "environments": [{"name": "gsm8k"}]})
    children = {c.name: c for c in build_children(config, config.trainer_spec(), tmp_path)}
    key = children["inference"].env["POSTTRAIN_INFERENCE_API_KEY"]
    assert len(key) >= 16 and children["trainer"].env["POSTTRAIN_INFERENCE_API_KEY"] == key
    assert f"--openai.api_key={key}" in children["env-gsm8k"].command
    # Where rl run sweeps a killed server's shared weights files after its children exit.
    assert shared_weights_dir([]) == "/dev/shm"
    assert shared_weights_dir(["--shared-weights-dir", "/a"]) == shared_weights_dir(["--shared-weights-dir=/a"]) == "/a"
