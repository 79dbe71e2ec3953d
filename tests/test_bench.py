"""The SFT throughput benchmark runs end to end, and posttrain's faster SFT path computes the same loss and gradients."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from sft_trainers import build_sft_trainer
from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

REPO_ROOT = Path(__file__).resolve().parents[1]
VARIANTS = {"stock_trl", "tuned_trl", "plain_loop", "posttrain"}
ROW_KEYS = {"real_tokens_per_s", "peak_rss_mb", "final_loss", "eval_loss", "num_threads", "dtype"}


def test_quick_benchmark_writes_every_variant(tmp_path):
    output = tmp_path / "sft_throughput.json"
    # The real-model suite has its own test below; without --suite, --quick would run it here too.
    subprocess.run([sys.executable, str(REPO_ROOT / "bench" / "sft_throughput.py"), "--quick", "--suite", "synthetic",
                    "--output", str(output)], check=True, cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)

    report = json.loads(output.read_text())

    assert set(report["results"]) == VARIANTS
    for name, row in report["results"].items():
        assert set(row) >= ROW_KEYS, name
        assert row["real_tokens_per_s"] > 0 and row["final_loss"] > 0 and row["num_threads"] >= 1
    assert set(report["ratios"]) >= {"posttrain_over_plain_loop", "posttrain_over_tuned_trl"}
    assert report["machine"]["cpu_count"] >= 1


def test_quick_token_budget_suite_compares_both_batchings(tmp_path):
    output = tmp_path / "sft_throughput.json"
    subprocess.run([sys.executable, str(REPO_ROOT / "bench" / "sft_throughput.py"), "--quick", "--suite",
                    "token-budget", "--output", str(output)], check=True, cwd=REPO_ROOT, capture_output=True,
                   text=True, timeout=300)

    section = json.loads(output.read_text())["token_budget"]

    assert set(section["results"]) == {"fixed", "token_budget"}
    assert section["results"]["token_budget"]["tokens_per_batch"] == section["settings"]["tokens_per_batch"]
    assert section["results"]["fixed"]["tokens_per_batch"] is None
    for row in section["results"].values():
        assert row["real_tokens_per_s"] > 0 and row["steps"] > 0
    padding = section["epoch_padding"]
    assert padding["token_budget"]["max_padded_tokens"] <= section["settings"]["tokens_per_batch"]
    assert padding["token_budget"]["padding_fraction"] < padding["fixed_random"]["padding_fraction"]


def test_quick_eval_share_benchmark_reports_the_share_and_batched_generation(tmp_path):
    output = tmp_path / "eval_share.json"
    subprocess.run([sys.executable, str(REPO_ROOT / "bench" / "eval_share.py"), "--quick", "--output", str(output)],
                   check=True, cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)

    report = json.loads(output.read_text())

    assert report["with_eval"]["evaluations"] == 2 and report["without_eval"]["evaluations"] == 0
    assert 0 < report["eval_share_of_wall_time"] < 1
    assert report["generation"]["same_answers"] and report["generation"]["prompts"] == 4


@pytest.fixture(scope="module")
def sft_trainer(tmp_path_factory):
    return build_sft_trainer(tmp_path_factory.mktemp("job"), {"type": "none"})


def batch_loss(trainer, batch, fused_loss: bool) -> float:
    labels = batch["labels"]
    # The Trainer passes the batch's label count; padding-free batches already mask each row's first label.
    num_items = (labels[:, 1:] != -100).sum()
    default, trainer.fused_loss = trainer.fused_loss, fused_loss
    try:
        with torch.no_grad():
            return trainer.compute_loss(trainer.model, dict(batch), num_items_in_batch=num_items).item()
    finally:
        trainer.fused_loss = default


def batch_gradients(trainer, batch, fused_loss: bool) -> dict[str, torch.Tensor]:
    default, trainer.fused_loss = trainer.fused_loss, fused_loss
    try:
        trainer.model.zero_grad(set_to_none=True)
        trainer.compute_loss(trainer.model, dict(batch)).backward()
        return {name: p.grad.clone() for name, p in trainer.model.named_parameters() if p.grad is not None}
    finally:
        trainer.model.zero_grad(set_to_none=True)
        trainer.fused_loss = default


def test_fast_sft_loss_equals_fused_head_padded_and_padding_free_losses(sft_trainer):
    examples = [sft_trainer.train_dataset[i] for i in range(4)]
    assert len({len(example["input_ids"]) for example in examples}) > 1, "need rows of different lengths"
    collator = sft_trainer.data_collator
    assert isinstance(collator, DataCollatorForLanguageModeling)
    padded = collator(examples)
    padding_free = dataclasses.replace(collator, padding_free=True)(examples)
    assert (padded["labels"] == -100).any(), "prompt tokens and padding are masked out of the loss"

    ours = batch_loss(sft_trainer, padded, fused_loss=True)
    trl = batch_loss(sft_trainer, padded, fused_loss=False)
    packed = batch_loss(sft_trainer, padding_free, fused_loss=True)
    # Reference: every row on its own (no padding, no packing), token-mean over the batch.
    total, count = 0.0, 0
    with torch.no_grad():
        for example in examples:
            ids = torch.tensor([example["input_ids"]])
            labels = torch.tensor([example.get("labels", example["input_ids"])])
            logits = sft_trainer.model(input_ids=ids).logits[0, :-1]
            target = labels[0, 1:]
            total += torch.nn.functional.cross_entropy(logits, target, ignore_index=-100, reduction="sum").item()
            count += int((target != -100).sum())

    assert ours == pytest.approx(trl, rel=1e-5)
    assert ours == pytest.approx(total / count, rel=1e-5)
    assert packed == pytest.approx(total / count, rel=1e-5)


def test_trained_positions_loss_has_trl_gradients_including_the_tied_head(sft_trainer):
    batch = sft_trainer.data_collator([sft_trainer.train_dataset[i] for i in range(4)])
    ours = batch_gradients(sft_trainer, batch, fused_loss=True)
    trl = batch_gradients(sft_trainer, batch, fused_loss=False)
    assert sft_trainer.model.config.tie_word_embeddings and "model.embed_tokens.weight" in ours
    assert set(ours) == set(trl)
    for name, grad in trl.items():
        torch.testing.assert_close(ours[name], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_cpu_sft_defaults_group_rows_by_length_without_padding_free(sft_trainer):
    assert sft_trainer.args.train_sampling_strategy == "group_by_length"
    assert sft_trainer.padding_free is False
    assert not sft_trainer.args.activation_checkpointing
    assert sft_trainer.fused_loss is True


def test_quick_real_model_suite_writes_runs_with_medians_mfu_and_a_generated_table(tmp_path, smollm2_dir):
    output = tmp_path / "sft_throughput.json"
    output.write_text(json.dumps({"results": {"kept": {}}}))  # a real-suite run keeps the synthetic results
    # One line of each kind (SFT, a TRL method line, rollout generation): `make bench-quick` runs them all.
    subprocess.run([sys.executable, str(REPO_ROOT / "bench" / "sft_throughput.py"), "--quick", "--suite", "real",
                    "--real-methods", "lora,grpo,rollout", "--output", str(output)],
                   check=True, cwd=REPO_ROOT, capture_output=True, text=True, timeout=900)

    report = json.loads(output.read_text())

    assert report["results"] == {"kept": {}}
    real = report["real_model"]
    assert set(real) >= {"lora", "grpo", "rollout", "settings", "data"} and "dpo" not in real
    for line, baseline in (("lora", "tuned_trl"), ("grpo", "tuned_trl"), ("rollout", "hf_generate")):
        section = real[line]
        assert section["baseline"] == baseline
        assert set(section["runs"]) == {baseline, "posttrain"}, line  # quick: no stock TRL
        for variant, rows in section["runs"].items():
            assert len(rows) == real["settings"]["repeats"] == 1, (line, variant)  # quick: one run each
            for row in rows:
                assert row[section["metric"]] > 0 and 0 < row["mfu"] < 1 and row["peak_rss_mb"] > 100, (line, variant)
            summary = section["summary"][variant][section["metric"]]
            assert summary["min"] <= summary["median"] <= summary["max"] and len(summary["runs"]) == 1
        verdict = section["posttrain_over_baseline"]
        assert verdict["ratio_of_medians"] > 0 and verdict["slowest_over_fastest"] <= verdict["ratio_of_medians"]
    assert real["lora"]["summary"]["posttrain"]["eval_loss"]["median"] > 0
    assert real["grpo"]["summary"]["posttrain"]["generated_tokens_per_s"]["median"] > 0

    from bench.readme_table import table

    text = table(real)
    assert "SFT, LoRA r16" in text and "rollout generation" in text and "target 2x" in text


def test_a_target_is_met_only_when_the_slowest_run_clears_it_or_the_spreads_part():
    from bench.real_model import compare, spread

    assert spread([3.0, 1.0, 2.0]) == {"runs": [3.0, 1.0, 2.0], "median": 2.0, "min": 1.0, "max": 3.0}
    assert spread([4.0, 1.0, 2.0, 3.0])["median"] == 2.5

    assert compare([2.2, 2.3, 2.4], [1.0, 1.05, 1.1], 2.0)["met"]  # slowest 2.2 / fastest 1.1 = 2.0
    # Medians 2.17x and the spreads apart (2.1 > 1.3): met, though the slowest/fastest ratio is 1.6x.
    assert compare([2.1, 2.6, 2.7], [1.0, 1.2, 1.3], 2.0)["met"]
    assert not compare([1.2, 2.6, 2.7], [1.0, 1.2, 1.3], 2.0)["met"]  # medians 2.17x, spreads overlap
    assert not compare([2.3, 2.3, 2.4], [1.0, 1.2, 1.3], 2.0)["met"]  # medians 1.92x
    assert compare([1.0], [1.0], None)["met"] is None  # a line without a target


def test_model_flops_count_every_weight_of_smollm2_once_per_matmul(smollm2_dir):
    from transformers import AutoConfig

    from bench.real_model import model_flops_per_token

    config = AutoConfig.from_pretrained(smollm2_dir)
    params, norms = 134_515_008, 30 * 2 * 576 + 576  # embedding (tied head) + linear layers + RMSNorm gains
    no_attention = {"trained_fraction": 1.0, "mean_context": 0.0}
    # Full fine-tune: forward 2, input gradient 2, weight gradient 2 FLOPs per weight and token.
    assert model_flops_per_token(config, "full", no_attention, 0) == 6 * (params - norms)
    lora = model_flops_per_token(config, "lora", no_attention, 1000)
    assert lora == 4 * (params - norms) + 6 * 1000
    half_trained = model_flops_per_token(config, "full", {"trained_fraction": 0.5, "mean_context": 0.0}, 0)
    assert half_trained == 6 * (params - norms) - 3 * 576 * 49152
