"""The JobSpec: YAML + dotted overrides, and errors that name the key and suggest the right one."""

from __future__ import annotations

from pathlib import Path

import pytest

from posttrain.errors import ConfigError
from posttrain.spec import JobSpec, apply_overrides, describe_fields, load_spec, spec_from_dict

ROOT = Path(__file__).resolve().parents[1]


def test_defaults_train_the_embedded_model():
    spec = JobSpec()
    assert spec.model.name_or_path == "posttrain:tiny"
    assert spec.method.name == "sft"
    assert spec.peft.type == "lora"
    assert spec.tracking.report_to == ["tensorboard"]


def test_yaml_with_overrides(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("method:\n  name: dpo\n  beta: 0.1\ntraining:\n  learning_rate: 2.0e-4\n")
    spec = load_spec(config, ["training.learning_rate=1e-4", "training.max_steps=50", "method.beta=0.3",
                              "peft.target_modules=[q_proj,v_proj]", "tracking.report_to=none"])
    assert spec.name == "run"
    assert spec.method.name == "dpo" and spec.method.beta == 0.3
    assert spec.training.learning_rate == 1e-4 and spec.training.max_steps == 50
    assert spec.peft.target_modules == ["q_proj", "v_proj"]
    assert spec.tracking.report_to == []


def test_method_shorthand_and_override_of_its_name():
    assert spec_from_dict({"method": "grpo"}).method.num_generations == 4
    spec = spec_from_dict({"method": "sft"}, ["method.name=reward"])
    assert spec.method.name == "reward"


@pytest.mark.parametrize(
    ("data", "overrides", "expected"),
    [
        ({"trainig": {}}, [], "unknown key 'trainig'; did you mean 'training'?"),
        ({}, ["training.learning_rat=1e-4"], "did you mean 'training.learning_rate'?"),
        ({"method": "dpo"}, ["method.num_generations=4"], "unknown key 'method.num_generations'"),
        ({"method": "kto"}, [], "unknown method 'kto'; expected one of sft, dpo, reward, grpo"),
        ({}, ["training.max_steps=lots"], "training.max_steps: Input should be a valid integer"),
        ({}, ["peft.type=qlora", "quantization.load_in_4bit=false"], "needs quantization.load_in_4bit=true"),
        ({}, ["peft.type=none", "quantization.load_in_4bit=true"], "cannot be trained in full"),
        ({"method": {"name": "grpo", "reward_weights": [1.0]}}, [], "reward_weights has 1 entries"),
        ({}, ["training"], "is not of the form key.path=value"),
        ({"training": 3}, ["training.max_steps=2"], "'training' is a value, not a section"),
    ],
)
def test_bad_config_names_the_dotted_path(data, overrides, expected):
    with pytest.raises(ConfigError) as info:
        spec_from_dict(data, overrides)
    assert expected in str(info.value)


def test_qlora_turns_on_4bit():
    spec = spec_from_dict({"peft": {"type": "qlora"}})
    assert spec.quantization.load_in_4bit and spec.quantization.quant_type == "nf4"


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_spec(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("training:\n  max_steps: [1,\n")
    with pytest.raises(ConfigError, match=r"bad.yaml:\d+: not valid YAML"):
        load_spec(bad)
    listing = tmp_path / "list.yaml"
    listing.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="must be a mapping"):
        load_spec(listing)


def test_overrides_do_not_mutate_input():
    data = {"training": {"max_steps": 3}}
    assert apply_overrides(data, ["training.max_steps=5"])["training"]["max_steps"] == 5
    assert data["training"]["max_steps"] == 3


def test_every_field_is_described():
    rows = describe_fields()
    keys = {row[0] for row in rows}
    assert {"model.name_or_path", "method.beta", "method.num_generations", "peft.r", "quantization.quant_type",
            "data.on_bad_row", "training.num_threads", "output.dir", "tracking.report_to"} <= keys
    assert all(description for _, _, _, description in rows)


def test_a_spec_bound_to_its_job_dir_holds_absolute_local_paths_and_leaves_other_names(tmp_path, monkeypatch):
    from posttrain.job_paths import bind_job_dir

    monkeypatch.chdir(tmp_path)
    (tmp_path / "base").mkdir()  # no slash, but it exists here: a local folder
    spec = spec_from_dict({
        "model": {"name_or_path": "base"}, "peft": {"type": "none"}, "training": {"max_steps": 1},
        "method": {"name": "ppo", "reward_model": "runs/rw/final", "critic_model": "meta-llama/Llama-3.2-1B",
                   "rollout_backend": "server", "sync_dir": "weights"},
        "data": {"source": "data/train.jsonl", "validation": {"source": "posttrain:alpaca"}}})
    bound = bind_job_dir(spec, "runs/job")
    assert bound.output.dir == str(tmp_path / "runs" / "job")
    assert bound.model.name_or_path == str(tmp_path / "base")
    assert bound.method.reward_model == str(tmp_path / "runs" / "rw" / "final")  # need not exist yet
    assert bound.data.source == str(tmp_path / "data" / "train.jsonl")
    assert bound.method.sync_dir == str(tmp_path / "runs" / "job" / "weights")  # relative: in the job dir
    # Hub ids and embedded names are not paths.
    assert (bound.method.critic_model, bound.data.validation.source) == ("meta-llama/Llama-3.2-1B", "posttrain:alpaca")
    assert spec.model.name_or_path == "base"  # a copy: the caller's spec is unchanged
    monkeypatch.chdir(tmp_path / "base")
    assert bind_job_dir(bound, bound.output.dir) == bound  # binding again, from anywhere, changes nothing


def test_docs_config_reference_is_generated_from_the_schema():
    from posttrain.commands.train import config_keys_text

    docs = (ROOT / "docs" / "config.md").read_text()
    assert config_keys_text() in docs, "docs/config.md is stale: run `posttrain config-keys` and paste its output"



@pytest.mark.parametrize("data", [
    {},
    {"method": "dpo"},
    {"method": "reward"},
    {"method": "grpo"},
    {"method": {"name": "online_grpo"}, "peft": {"type": "none"}, "training": {"max_steps": 2}},
    {"method": {"name": "ppo", "reward_model": "posttrain:tiny"}, "peft": {"type": "none"},
     "training": {"max_steps": 2}},
    {"method": {"name": "ppo", "reward_model": "posttrain:tiny", "rollout_backend": "server",
                "weight_bridge_mode": "lora_only"}, "training": {"max_steps": 2}},
], ids=["sft", "dpo", "reward", "grpo", "online_grpo", "ppo", "ppo-server"])
def test_a_spec_written_out_in_full_reads_back_the_same(data):
    # spec.json and the service's re-validation carry every key, defaults included: no validator may refuse that.
    spec = spec_from_dict(data)
    assert JobSpec.model_validate_json(spec.model_dump_json()) == spec
