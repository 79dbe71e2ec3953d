"""The Llama Stack -> JobSpec mapping, row by row, in posttrain's own environment (no Llama Stack import:
requests are the dicts a request's model_dump(mode="json") gives)."""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path

import pytest
import yaml

from posttrain.llama_stack.config import InlineProviderConfig, TrainingDefaults
from posttrain.llama_stack.mapping import (
    RequestError,
    job_spec,
    job_status,
    posttrain_rows,
    split_validation,
    training_metrics,
)
from posttrain.llama_stack.run_config import run_config

DEFAULTS = TrainingDefaults()


def request(**changes) -> dict:
    base = {
        "job_uuid": "job-1", "model": "posttrain:tiny", "checkpoint_dir": None,
        "hyperparam_search_config": {}, "logger_config": {},
        "training_config": {
            "n_epochs": 2, "max_steps_per_epoch": 5, "gradient_accumulation_steps": 3, "max_validation_steps": 1,
            "dtype": "bf16",
            "data_config": {"dataset_id": "d", "batch_size": 4, "shuffle": True, "data_format": "instruct",
                            "validation_dataset_id": None, "packed": False, "train_on_input": False},
            "optimizer_config": {"optimizer_type": "adamw", "lr": 3e-4, "weight_decay": 0.01, "num_warmup_steps": 2},
            "efficiency_config": None,
        },
        "algorithm_config": {"type": "LoRA", "lora_attn_modules": ["q_proj", "k_proj", "v_proj", "output_proj"],
                             "apply_lora_to_mlp": False, "apply_lora_to_output": False, "rank": 8, "alpha": 16,
                             "use_dora": False, "quantize_base": False},
    }
    for key, value in changes.items():
        section, _, name = key.rpartition("__")
        target = base
        for part in section.split("__") if section else []:
            target = target[part]
        target[name] = value
    return base


def sft(**changes) -> dict:
    return job_spec("sft", request(**changes), DEFAULTS, data_source="train.jsonl", validation_source="val.jsonl")


def test_training_config_maps_to_the_schedule_batch_and_optimizer():
    spec = sft()
    training = spec["training"]
    assert training["max_steps"] == 10 and training["num_train_epochs"] == 2.0  # n_epochs x max_steps_per_epoch
    assert training["gradient_accumulation_steps"] == 3
    assert training["per_device_train_batch_size"] == training["per_device_eval_batch_size"] == 4
    assert (training["optim"], training["learning_rate"], training["weight_decay"], training["warmup_steps"]) == \
        ("adamw_torch", 3e-4, 0.01, 2)
    assert training["eval_steps"] == 10  # the validation loss is measured once, at the last step
    assert spec["model"] == {**spec["model"], "name_or_path": "posttrain:tiny", "dtype": "bf16"}
    assert spec["name"] == "llama-stack/job-1"
    assert spec["data"]["source"] == "train.jsonl" and spec["data"]["validation"]["source"] == "val.jsonl"
    assert spec["method"] == {"name": "sft", "completion_only_loss": True, "assistant_only_loss": False}


@pytest.mark.parametrize(("dtype", "expected"), [("bf16", "bf16"), ("fp16", "fp16"), ("fp32", "fp32"),
                                                 ("float32", "fp32"), (None, "auto")])
def test_dtype(dtype, expected):
    assert sft(training_config__dtype=dtype)["model"]["dtype"] == expected


def test_provider_dtype_and_device_win_over_the_request():
    spec = job_spec("sft", request(), TrainingDefaults(dtype="fp32", device="cpu"), data_source="t",
                    validation_source=None)
    assert spec["model"]["dtype"] == "fp32" and spec["model"]["device"] == "cpu"
    assert spec["data"]["validation"]["source"] is None and spec["training"]["eval_steps"] is None


@pytest.mark.parametrize(("kind", "optim"), [("adamw", "adamw_torch"), ("sgd", "sgd")])
def test_optimizers(kind, optim):
    assert sft(training_config__optimizer_config__optimizer_type=kind)["training"]["optim"] == optim


def test_adam_without_weight_decay_is_adamw_and_with_it_an_error():
    spec = sft(training_config__optimizer_config__optimizer_type="adam",
               training_config__optimizer_config__weight_decay=0.0)
    assert spec["training"]["optim"] == "adamw_torch"
    with pytest.raises(RequestError, match=r"optimizer_type.*weight_decay"):
        sft(training_config__optimizer_config__optimizer_type="adam")


def test_lora_maps_torchtune_names_mlp_and_output():
    spec = sft(algorithm_config__apply_lora_to_mlp=True, algorithm_config__apply_lora_to_output=True,
               algorithm_config__rank=4, algorithm_config__alpha=32)
    assert spec["peft"]["type"] == "lora" and spec["peft"]["r"] == 4 and spec["peft"]["alpha"] == 32
    assert spec["peft"]["target_modules"] == ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                              "down_proj", "lm_head"]


def test_quantize_base_is_qlora_and_no_algorithm_is_a_full_fine_tune():
    spec = sft(algorithm_config__quantize_base=True)
    assert spec["peft"]["type"] == "qlora" and spec["quantization"]["load_in_4bit"] is True
    assert sft(algorithm_config=None)["peft"]["type"] == "none"


def test_activation_checkpointing_and_packing_and_train_on_input():
    spec = sft(training_config__efficiency_config={"enable_activation_checkpointing": True},
               training_config__data_config__packed=True, training_config__data_config__train_on_input=True)
    assert spec["training"]["gradient_checkpointing"] is True and spec["training"]["packing"] is True
    assert spec["method"]["completion_only_loss"] is False


@pytest.mark.parametrize(("changes", "named"), [
    ({"algorithm_config": {"type": "QAT", "quantizer_name": "int8", "group_size": 32}}, "algorithm_config.type=\"QAT\""),
    ({"algorithm_config__use_dora": True}, "algorithm_config.use_dora"),
    ({"algorithm_config__lora_attn_modules": []}, "lora_attn_modules is empty"),
    ({"training_config__data_config__shuffle": False}, "data_config.shuffle"),
    ({"training_config__data_config": None}, "data_config.dataset_id is missing"),
    ({"training_config__n_epochs": 0}, "n_epochs=0"),
    ({"training_config__max_steps_per_epoch": "3"}, "max_steps_per_epoch=\"3\""),
    ({"training_config__data_config__batch_size": 0}, "batch_size=0"),
    ({"training_config__dtype": "int4"}, "training_config.dtype=\"int4\""),
    ({"training_config__optimizer_config__optimizer_type": "lion"}, "optimizer_type=\"lion\""),
    ({"training_config__optimizer_config__lr": -1.0}, "learning_rate"),
    ({"training_config__efficiency_config": {"enable_activation_offloading": True}}, "enable_activation_offloading"),
    ({"training_config__efficiency_config": {"memory_efficient_fsdp_wrap": True}}, "memory_efficient_fsdp_wrap"),
    ({"hyperparam_search_config": {"lr": [1, 2]}}, "hyperparam_search_config"),
    ({"logger_config": {"wandb": True}}, "logger_config"),
    ({"checkpoint_dir": "/tmp/out"}, "checkpoint_dir"),
    ({"model": None}, "model is missing"),
    ({"job_uuid": ""}, "job_uuid"),
    ({"training_config": "fast"}, "training_config is missing or not an object"),
])
def test_what_posttrain_cannot_honour_is_an_error_naming_it(changes, named):
    with pytest.raises(RequestError) as caught:
        sft(**changes)
    assert named in str(caught.value)
    assert caught.value.status_code == 400


def test_dpo_config_maps_beta_loss_and_reference_model():
    dpo_request = {**request(), "finetuned_model": "posttrain:tiny", "algorithm_config": {"beta": 0.3, "loss_type": "ipo"}}
    dpo_request.pop("model")
    spec = job_spec("dpo", dpo_request, TrainingDefaults(use_reference_model=False), data_source="t",
                    validation_source=None)
    assert spec["method"]["name"] == "dpo" and spec["method"]["beta"] == 0.3 and spec["method"]["loss_type"] == "ipo"
    assert spec["method"]["use_reference_model"] is False and spec["peft"]["type"] == "lora"
    assert spec["model"]["name_or_path"] == "posttrain:tiny"
    with pytest.raises(RequestError, match="kto_pair"):
        job_spec("dpo", {**dpo_request, "algorithm_config": {"beta": 0.1, "loss_type": "kto_pair"}}, DEFAULTS,
                 data_source="t", validation_source=None)
    with pytest.raises(RequestError, match="finetuned_model is missing"):
        job_spec("dpo", {**dpo_request, "finetuned_model": ""}, DEFAULTS, data_source="t", validation_source=None)


# ---------------------------------------------------------------------------------------------------
# Rows


MESSAGES = [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Hello."}]


@pytest.mark.parametrize(("row", "expected"), [
    ({"messages": MESSAGES}, {"messages": MESSAGES}),
    ({"messages": json.dumps(MESSAGES)}, {"messages": MESSAGES}),
    ({"messages": [{"role": "user", "content": [{"type": "text", "text": "Hi"}, {"type": "text", "text": "?"}]},
                   {"role": "assistant", "content": "Hello.", "stop_reason": "end_of_turn"}]}, {"messages": MESSAGES}),
    ({"chat_completion_input": json.dumps(MESSAGES[:1]), "expected_answer": "Hello."}, {"messages": MESSAGES}),
    ({"input_query": "Hi?", "expected_answer": "Hello.", "chat_completion_input": float("nan")}, {"messages": MESSAGES}),
    ({"input_query": "Hi?", "expected_answer": "Hello."}, {"messages": MESSAGES}),
    ({"dialog": json.dumps(MESSAGES)}, {"messages": MESSAGES}),
], ids=["messages", "messages-json", "content-items", "instruct", "instruct-empty-csv-cell", "input-query", "dialog"])
def test_llama_stack_row_shapes_become_posttrain_rows(row, expected):
    assert posttrain_rows([row], "sft", "d") == [expected]


def test_preference_rows_stay_preference_rows_for_dpo():
    rows = [{"prompt": "Say 1.", "chosen": "1", "rejected": "No."},
            {"prompt": json.dumps(MESSAGES[:1]), "chosen": json.dumps(MESSAGES[1:]),
             "rejected": json.dumps([{"role": "assistant", "content": "Bye."}])}]
    converted = posttrain_rows(rows, "dpo", "prefs")
    assert converted[0] == rows[0]
    assert converted[1]["prompt"] == MESSAGES[:1] and converted[1]["chosen"] == MESSAGES[1:]


@pytest.mark.parametrize(("rows", "method", "named"), [
    ([{"text_in": "x"}], "sft", "dataset 'd' row 1: has columns ['text_in']"),
    ([{"messages": MESSAGES}, {"messages": "[{not json"}], "sft", "row 2"),
    ([{"messages": [{"role": "user", "content": "only a question"}]}], "sft", "no assistant turn"),
    ([{"messages": [{"role": "user", "content": [{"type": "image", "image": {}}]}, MESSAGES[1]]}], "sft", "images"),
    ([{"messages": MESSAGES}], "dpo", "prompt/chosen/rejected"),
    ([{"prompt": "p", "chosen": "same", "rejected": "same"}], "dpo", "identical"),
    ([], "sft", "has no rows"),
])
def test_bad_rows_name_the_dataset_and_row(rows, method, named):
    with pytest.raises(RequestError) as caught:
        posttrain_rows(rows, method, "d")
    assert named in str(caught.value) and "'d'" in str(caught.value)


def test_instruct_format_error_says_what_instruct_rows_need():
    with pytest.raises(RequestError, match="chat_completion_input"):
        posttrain_rows([{"question": "q"}], "sft", "d", "instruct")


def test_validation_split_holds_out_a_capped_share():
    rows = [{"i": i} for i in range(20)]
    config = {"max_validation_steps": 1, "data_config": {"batch_size": 2}}
    train, held = split_validation(rows, TrainingDefaults(validation_split=0.2), config)
    assert len(held) == 2 and len(train) == 18 and not {r["i"] for r in held} & {r["i"] for r in train}
    train, held = split_validation(rows, TrainingDefaults(validation_split=0.2),
                                   {"max_validation_steps": 10, "data_config": {"batch_size": 2}})
    assert len(held) == 4 and len(train) == 16
    # A split of 0, or too few rows to spare one: validation runs on (a batch of) the training rows.
    train, held = split_validation(rows, TrainingDefaults(validation_split=0), config)
    assert train == rows and held == rows[:2]
    train, held = split_validation(rows[:1], TrainingDefaults(), config)
    assert train == rows[:1] and held == rows[:1]


def test_training_metrics_and_states():
    records = [{"step": 1, "loss": 2.0}, {"step": 2, "loss": 1.5}, {"step": 2, "eval_loss": 1.25}]
    metrics = training_metrics(records, 1)
    assert metrics == {"epoch": 1, "train_loss": 1.5, "validation_loss": 1.25, "perplexity": math.exp(1.25)}
    assert training_metrics(records[:2], 1) is None  # no placeholder without a validation loss
    assert [job_status(s) for s in ("queued", "paused", "running", "succeeded", "failed", "cancelled")] == \
        ["scheduled", "scheduled", "in_progress", "completed", "failed", "cancelled"]


# ---------------------------------------------------------------------------------------------------
# Configs and run.yaml


def test_run_config_binds_loopback_and_keeps_storage_under_the_data_dir(tmp_path):
    inline = run_config("inline", tmp_path, port=9999, worker_python="/opt/py/bin/python")
    assert inline["server"] == {"host": "127.0.0.1", "port": 9999}
    entry = inline["providers"]["post_training"][0]
    assert entry == {"provider_id": "posttrain", "provider_type": "inline::posttrain", "module": "posttrain.llama_stack",
                     "config": {"data_dir": str(tmp_path / "posttrain"), "worker_python": "/opt/py/bin/python"}}
    for backend in inline["storage"]["backends"].values():
        assert backend["db_path"].startswith(str(tmp_path))
    InlineProviderConfig(**entry["config"])  # what Llama Stack will validate it with
    # An inference provider serves what it trains (a module of its own: Llama Stack picks specs by type alone).
    assert "inference" in inline["apis"]
    assert inline["providers"]["inference"] == [{"provider_id": "posttrain", "provider_type": "inline::posttrain",
                                                 "config": {}, "module": "posttrain.llama_stack.inference"}]
    remote = run_config("remote", tmp_path, url="http://gpu-box:8322", providers_d=True)
    entry = remote["providers"]["post_training"][0]
    assert entry["provider_type"] == "remote::posttrain" and "module" not in entry
    assert entry["config"] == {"url": "http://gpu-box:8322"}
    spec = yaml.safe_load((Path(remote["external_providers_dir"]) / "remote/post_training/posttrain.yaml").read_text())
    assert spec["adapter_type"] == "posttrain" and spec["module"] == "posttrain.llama_stack.remote"
    assert remote["providers"]["inference"][0]["provider_type"] == "remote::posttrain"
    spec = yaml.safe_load((Path(remote["external_providers_dir"]) / "remote/inference/posttrain.yaml").read_text())
    assert spec["module"] == "posttrain.llama_stack.inference.remote" and spec["api_dependencies"] == ["post_training"]


def test_cli_prints_the_run_yaml(tmp_path):
    import subprocess

    done = subprocess.run([sys.executable, "-m", "posttrain.cli", "llama-stack", "config", "--provider", "remote",
                           "--data-dir", str(tmp_path)], capture_output=True, text=True, check=True)
    assert yaml.safe_load(done.stdout)["providers"]["post_training"][0]["provider_type"] == "remote::posttrain"
    bad = subprocess.run([sys.executable, "-m", "posttrain.cli", "llama-stack", "config", "--provider", "cloud"],
                         capture_output=True, text=True)
    assert bad.returncode == 2 and "'cloud': use inline or remote" in bad.stderr


def test_unknown_launcher_is_refused(tmp_path):
    from posttrain.errors import PosttrainError
    from posttrain.llama_stack.jobs import LocalJobs

    with pytest.raises(PosttrainError, match="launcher='torchrun' is not available yet"):
        LocalJobs(InlineProviderConfig(data_dir=str(tmp_path), launcher="torchrun"))


def test_worker_python_is_checked_when_the_provider_starts(tmp_path):
    from posttrain.errors import PosttrainError
    from posttrain.llama_stack.jobs import check_worker_python

    assert check_worker_python(sys.executable) == sys.executable  # this venv has torch and posttrain
    with pytest.raises(PosttrainError, match="is not an executable file"):
        check_worker_python(str(tmp_path / "no-python"))
    no_torch = tmp_path / "python-without-torch"
    no_torch.write_text("#!/bin/sh\nexit 3\n")  # stands in for a Llama Stack venv's python: no torch there
    no_torch.chmod(0o755)
    with pytest.raises(PosttrainError, match="cannot import torch and posttrain"):
        check_worker_python(str(no_torch))


def test_a_bare_worker_python_name_is_found_on_path(tmp_path, monkeypatch):
    # The sample run config says `python3`: a name on PATH, as a shell would run it.
    from posttrain.llama_stack.jobs import check_worker_python

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    wrapper = bin_dir / "posttrain-python"
    wrapper.write_text(f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')  # a symlink would lose the venv
    wrapper.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    assert check_worker_python("posttrain-python") == str(bin_dir / "posttrain-python")


def test_trained_models_are_named_by_their_checkpoint_identifiers():
    """What posttrain's inference providers list and call: a Llama Stack job's model and checkpoints by the
    identifiers its artifacts show, translated back into the job service's names for each request."""
    from types import SimpleNamespace

    from posttrain.llama_stack.served import llama_stack_names, service_name

    jobs = [SimpleNamespace(id="job-1", name="llama-stack/adds"), SimpleNamespace(id="job-2", name="other")]
    tuned = "ft:posttrain:tiny:local:llama-stack/adds:job-1"
    models = [{"id": "posttrain:tiny", "kind": "base", "job_id": None},
              {"id": tuned, "kind": "fine-tune", "job_id": "job-1"},
              {"id": f"{tuned}:ckpt-step-2", "kind": "checkpoint", "job_id": "job-1"},
              {"id": "ft:posttrain:tiny:local:other:job-2", "kind": "fine-tune", "job_id": "job-2"}]
    assert [name for name, _ in llama_stack_names(models, jobs)] == [
        "posttrain:tiny", "adds/final", "adds/checkpoint-2", "ft:posttrain:tiny:local:other:job-2"]
    find = {"adds": jobs[0]}.get
    assert [service_name(name, find) for name in ("adds/final", "adds/checkpoint-2", "adds", "posttrain:tiny",
                                                  tuned, "gone/final")] == [
        "job-1/final", "job-1/checkpoint-2", "job-1", "posttrain:tiny", tuned, "gone/final"]
