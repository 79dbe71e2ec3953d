"""Every example config trains: with the model and data swapped for the embedded ones and 2 steps, so
each example's own options (optimizers, quantization, LoRA targets, eval, reward functions) really run."""

from __future__ import annotations

from pathlib import Path

import pytest

from posttrain.spec import load_spec, load_yaml
from posttrain.worker import run_worker

ROOT = Path(__file__).resolve().parents[1]
SAMPLE_FOR_METHOD = {"sft": "posttrain:alpaca", "dpo": "posttrain:preference", "reward": "posttrain:preference",
                     "grpo": "posttrain:gsm8k", "ppo": "posttrain:preference"}


# rl-*.yaml configure `posttrain rl run` (a whole online loop), not one job: tests/rl/test_run_config.py loads them.
# Pipeline files (a stages: list, like tiny-rlhf.yaml) run in tests/test_pipeline.py.
JOB_EXAMPLES = [path for path in sorted((ROOT / "examples").glob("*.yaml"))
                if not path.name.startswith("rl-") and "stages" not in load_yaml(path.read_text())]


@pytest.mark.parametrize("example", JOB_EXAMPLES, ids=lambda p: p.name)
def test_examples_are_valid_job_specs(example):
    spec = load_spec(example)
    assert spec.name == example.stem


@pytest.mark.parametrize("example", JOB_EXAMPLES, ids=lambda p: p.stem)
def test_example_trains_on_the_embedded_model(tmp_path, example):
    method = load_spec(example).method.name
    overrides = ["model.name_or_path=posttrain:tiny", f"data.source={SAMPLE_FOR_METHOD[method]}",
                 "training.max_steps=2", "training.save_steps=2", "tracking.report_to=none",
                 "training.per_device_train_batch_size=8"]
    if method == "dpo":
        overrides.append("method.reference_model=posttrain:tiny")
    if method == "grpo":
        overrides += ["method.num_generations=4", "method.max_completion_length=16"]
    if method == "ppo":
        overrides += ["method.reward_model=posttrain:tiny", "method.response_length=8"]
    spec = load_spec(example, overrides)
    result = run_worker(spec, tmp_path / "run")
    assert result.state == "succeeded", result.error
    assert (result.final_dir / "adapter_config.json").exists()
