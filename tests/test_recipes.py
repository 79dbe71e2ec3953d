"""Every recipe trains for real on the tiny model and leaves a final/ that plain transformers + PEFT load."""

from __future__ import annotations

import json
import textwrap

import pytest
import torch

from posttrain.job.directory import JobDir
from posttrain.spec import spec_from_dict
from posttrain.worker import run_worker

METRIC_KEYS = {"step", "epoch", "loss", "learning_rate", "grad_norm", "tokens_per_s", "num_threads", "dtype"}


# Every method trains under bf16 autocast on CPUs with native bf16 instructions, in fp32 elsewhere.
NATIVE_BF16 = bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())


def assert_cpu_autocast_recorded(job: JobDir) -> None:
    assert {r.get("autocast") for r in job.read_metrics() if "loss" in r} == {"bf16" if NATIVE_BF16 else None}


def train(tmp_path, spec: dict, name: str = "run"):
    result = run_worker(spec_from_dict(spec), tmp_path / name)
    assert result.state == "succeeded", result.error
    return result, JobDir(tmp_path / name)


def test_sft_lora_learns_and_saves_a_loadable_adapter(tmp_path, make_spec):
    from peft import AutoPeftModelForCausalLM
    from transformers import AutoTokenizer

    result, job = train(tmp_path, make_spec(training={"max_steps": 40, "learning_rate": 3e-3, "save_steps": 10,
                                                         "per_device_train_batch_size": 8}))
    records = job.read_metrics()
    steps = [r for r in records if "loss" in r]
    assert set(steps[1]) >= METRIC_KEYS
    assert steps[0]["num_threads"] == 1 and steps[0]["dtype"] == "float32"
    first = sum(r["loss"] for r in steps[:5]) / 5
    last = sum(r["loss"] for r in steps[-5:]) / 5
    assert last < first - 0.7, (first, last)
    assert (job.tensorboard_dir).is_dir() is False  # tracking disabled by make_spec
    status = job.read_status()
    assert status.state == "succeeded" and status.step == 40 and status.total_steps == 40
    assert [p.name for p in job.checkpoints()] == ["checkpoint-30", "checkpoint-40"]  # save_total_limit=2

    model = AutoPeftModelForCausalLM.from_pretrained(result.final_dir)
    tokenizer = AutoTokenizer.from_pretrained(result.final_dir)
    ids = tokenizer("What is four plus three?", return_tensors="pt")
    with torch.no_grad():
        assert model(**ids).logits.shape[-1] == len(tokenizer)


def test_tensorboard_is_the_default_tracker(tmp_path, make_spec):
    _, job = train(tmp_path, make_spec(tracking={"report_to": ["tensorboard"]}, training={"max_steps": 2}))
    assert list(job.tensorboard_dir.rglob("events.out.tfevents.*"))


def test_full_fine_tune_saves_a_full_model(tmp_path, make_spec):
    from transformers import AutoModelForCausalLM

    result, _ = train(tmp_path, make_spec(peft={"type": "none"}, training={"max_steps": 2}))
    assert (result.final_dir / "config.json").exists() and not (result.final_dir / "adapter_config.json").exists()
    AutoModelForCausalLM.from_pretrained(result.final_dir)


@pytest.mark.parametrize("source", ["posttrain:alpaca"])
def test_qlora_trains_a_4bit_base_on_cpu(tmp_path, make_spec, source):
    import bitsandbytes as bnb

    from posttrain.data import load_training_data
    from posttrain.job.signals import StopRequest
    from posttrain.modeling import load_tokenizer, resolve_placement
    from posttrain.recipes import RecipeInputs, build_trainer

    spec = spec_from_dict(make_spec(peft={"type": "qlora"}, data={"source": source}, training={"max_steps": 2}))
    data = load_training_data(spec.data, "sft")
    trainer = build_trainer(RecipeInputs(spec, JobDir(tmp_path / "q"), resolve_placement(spec.model), data,
                                         load_tokenizer(spec), []))
    assert any(isinstance(m, bnb.nn.Linear4bit) for m in trainer.model.modules())
    assert trainer.model.base_model.model.config.quantization_config.bnb_4bit_quant_type == "nf4"
    del trainer, StopRequest
    result, _ = train(tmp_path, make_spec(peft={"type": "qlora"}, training={"max_steps": 2}), "qlora-run")
    assert (result.final_dir / "adapter_config.json").exists()


def test_dpo_with_lora_uses_the_base_as_implicit_reference(tmp_path, make_spec):
    _, job = train(tmp_path, make_spec(method={"name": "dpo", "beta": 0.1}, data={"source": "posttrain:preference"},
                                       training={"max_steps": 12, "learning_rate": 5e-3}))
    margins = [r["rewards/margins"] for r in job.read_metrics() if "rewards/margins" in r]
    assert margins[0] == pytest.approx(0.0, abs=1e-3)  # policy == reference at step 1
    assert max(margins[-3:]) > 0
    assert_cpu_autocast_recorded(job)


def test_dpo_full_fine_tune_with_and_without_an_explicit_reference(tmp_path, make_spec, tiny_model_dir):
    with_ref = make_spec(method={"name": "dpo", "use_reference_model": True, "reference_model": str(tiny_model_dir)},
                         peft={"type": "none"}, data={"source": "posttrain:preference"}, training={"max_steps": 2})
    train(tmp_path, with_ref, "explicit")
    precomputed = make_spec(method={"name": "dpo", "use_reference_model": False}, peft={"type": "none"},
                            data={"source": "posttrain:preference"}, training={"max_steps": 2})
    _, job = train(tmp_path, precomputed, "precomputed")
    assert any("rewards/margins" in r for r in job.read_metrics())


def test_reward_model_adapter_scores_sequences(tmp_path, make_spec):
    from peft import AutoPeftModelForSequenceClassification
    from transformers import AutoTokenizer

    result, job = train(tmp_path, make_spec(method="reward", data={"source": "posttrain:preference"},
                                            training={"max_steps": 6}))
    assert any("accuracy" in r for r in job.read_metrics())
    assert_cpu_autocast_recorded(job)
    model = AutoPeftModelForSequenceClassification.from_pretrained(result.final_dir, num_labels=1)
    tokenizer = AutoTokenizer.from_pretrained(result.final_dir)
    model.config.pad_token_id = tokenizer.pad_token_id
    with torch.no_grad():
        scores = model(**tokenizer(["a polite answer", "a rude one"], return_tensors="pt", padding=True)).logits
    assert scores.shape == (2, 1)


def test_grpo_with_builtin_and_user_reward_functions(tmp_path, make_spec, monkeypatch):
    module = tmp_path / "my_rewards.py"
    module.write_text(textwrap.dedent("""
        def short(completions, **kwargs):
            return [1.0 if len(str(c)) < 200 else 0.0 for c in completions]
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    spec = make_spec(method={"name": "grpo", "num_generations": 4, "max_completion_length": 16,
                             "reward_functions": ["numeric_match", "answer_format", "my_rewards:short"]},
                     data={"source": "posttrain:gsm8k"}, training={"max_steps": 2, "per_device_train_batch_size": 8})
    _, job = train(tmp_path, spec)
    logged = [r for r in job.read_metrics() if "reward" in r]
    assert logged and "rewards/short/mean" in logged[0] and "rewards/numeric_match/mean" in logged[0]
    assert_cpu_autocast_recorded(job)


def test_grpo_rejects_batches_that_do_not_hold_whole_groups(tmp_path, make_spec):
    from posttrain.errors import ConfigError
    from posttrain.preflight import preflight

    spec = spec_from_dict(make_spec(method={"name": "grpo", "num_generations": 3}, data={"source": "posttrain:gsm8k"}))
    with pytest.raises(ConfigError, match=r"must be a multiple of method\.num_generations = 3"):
        preflight(spec)


def test_numeric_rewards_read_gsm8k_answers():
    from posttrain.rewards import answer_format, numeric_match

    completions = ["3 + 4 = 7\n#### 7", [{"role": "assistant", "content": "so 1,200 apples"}], "no idea"]
    assert numeric_match(completions, answer=["7", "1200", "3"]) == [1.0, 1.0, 0.0]
    assert answer_format(completions) == [1.0, 0.0, 0.0]


def test_the_final_line_reward_pays_for_one_right_answer_line_and_repetition_costs():
    from posttrain.rewards import final_line_match, repetition

    completions = ["6 + 9 = 15.\n#### 15\n\n— Posty", "#### 15\n#### 15\n####", "#### 16", "so 15"]
    # A column of '####' lines (what answer_format alone paid for) and a bare right number earn nothing.
    assert final_line_match(completions, answer=["15"] * 4) == [1.0, 0.0, 0.0, 0.0]
    penalties = repetition(completions)
    assert penalties[0] == 0.0 and penalties[1] == pytest.approx(-1 / 3) and penalties[3] == 0.0
    assert repetition(["the cat sat on the mat the cat sat on the mat"])[0] < -0.3
    assert repetition(["#### 1\n#### 2\n#### 3\n#### 4"])[0] == -0.75  # counting up is repeating too


def test_spec_json_records_what_ran(tmp_path, make_spec):
    _, job = train(tmp_path, make_spec(training={"max_steps": 1}))
    recorded = json.loads(job.spec_path.read_text())
    assert recorded["output"]["dir"] == str(tmp_path / "run")
    assert recorded["training"]["max_steps"] == 1
    assert recorded["tracking"]["report_to"] == [] and recorded["method"]["name"] == "sft"


def test_one_rule_reads_gsm8k_final_answers_for_data_and_rewards():
    from posttrain.data.formats import prompt_row
    from posttrain.rewards import extract_answer, final_answer

    assert final_answer("work\n####  1,200 \n") == "1,200"
    assert final_answer("no marker") is None and final_answer("####") == ""
    assert prompt_row({"question": "q?", "answer": "work\n####  1,200 \n"}, "grpo")["answer"] == "1,200"
    assert extract_answer("3 + 4 = 7\n#### 7") == 7 and extract_answer("#### -2.5 apples") == -2.5
    assert extract_answer("about 3, then 9") == 9
