"""The `posttrain` command as a user runs it: a real subprocess per command."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
POSTTRAIN = [sys.executable, "-m", "posttrain.cli"]


def posttrain(*args: str, cwd: Path, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run([*POSTTRAIN, *args], cwd=cwd, capture_output=True, text=True, timeout=300,
                          env={**__import__("os").environ, "COLUMNS": "200"})
    if check:
        assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory) -> Path:
    """One SFT run made through the CLI, shared by the tests that read its outputs."""
    workdir = tmp_path_factory.mktemp("cli")
    shutil.copy(ROOT / "examples" / "tiny-sft.yaml", workdir / "tiny-sft.yaml")
    proc = posttrain("train", "tiny-sft.yaml", "training.max_steps=12", "training.save_steps=6",
                     "tracking.report_to=none", cwd=workdir)
    assert "succeeded" in proc.stderr and "runs/tiny-sft/final" in proc.stderr
    return workdir / "runs" / "tiny-sft"


def test_train_writes_the_job_directory(trained_run):
    for name in ("spec.json", "status.json", "metrics.jsonl", "worker.log", "final/adapter_config.json"):
        assert (trained_run / name).exists(), name
    assert [p.name for p in sorted((trained_run / "checkpoints").glob("checkpoint-*"))] == [
        "checkpoint-12", "checkpoint-6"]


def test_resume_of_a_finished_run_keeps_its_step_count(trained_run):
    proc = posttrain("train", "tiny-sft.yaml", "training.max_steps=14", "tracking.report_to=none", "--resume",
                     cwd=trained_run.parent.parent)
    assert "14/14" in proc.stderr
    assert '"step": 14' in (trained_run / "status.json").read_text()


def test_merge_gives_a_standalone_model_with_the_adapter_s_outputs(trained_run, tmp_path):
    from peft import AutoPeftModelForCausalLM
    from transformers import AutoModelForCausalLM, AutoTokenizer

    posttrain("merge", str(trained_run / "final"), "--output", str(tmp_path / "merged"), cwd=tmp_path)
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    adapter = AutoPeftModelForCausalLM.from_pretrained(trained_run / "final")
    ids = AutoTokenizer.from_pretrained(tmp_path / "merged")("The capital of France", return_tensors="pt")
    with torch.no_grad():
        torch.testing.assert_close(merged(**ids).logits, adapter(**ids).logits, rtol=1e-4, atol=1e-4)
    again = posttrain("merge", str(trained_run / "final"), "--output", str(tmp_path / "merged"), cwd=tmp_path,
                      check=False)
    assert again.returncode == 2 and "exists and is not empty" in again.stderr


def test_plot_writes_a_png(trained_run, tmp_path):
    posttrain("plot", str(trained_run), "--output", str(tmp_path / "curves.png"), cwd=tmp_path)
    assert (tmp_path / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_validate_reports_rows_and_steps_without_training(tmp_path):
    proc = posttrain("validate", str(ROOT / "examples" / "tiny-sft.yaml"), cwd=tmp_path)
    assert "config is valid" in proc.stderr and "200 training rows" in proc.stderr
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["train", "training.learning_rat=1e-4"], "did you mean 'training.learning_rate'?"),
        (["validate", "method=kto"], "unknown method 'kto'"),
        (["train", "missing.yaml"], "config file missing.yaml does not exist"),
        (["validate", "data.source=./nowhere.jsonl"], "nowhere.jsonl"),
        (["merge", "nowhere", "--output", "out"], "not a LoRA adapter folder"),
        (["plot", "nowhere"], "no metrics to plot"),
    ],
)
def test_user_errors_are_one_clear_line_without_a_traceback(tmp_path, args, message):
    proc = posttrain(*args, cwd=tmp_path, check=False)
    assert proc.returncode == 2
    assert message in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "runs").exists() and not (tmp_path / "out").exists()


def test_train_help_lists_every_config_key_from_the_schema(tmp_path):
    from posttrain.spec import describe_fields

    text = posttrain("train", "--help", cwd=tmp_path).stdout
    for key, *_ in describe_fields():
        assert key in text, key


def test_demo_runs_the_three_stages_and_shows_what_moved(tmp_path):
    proc = posttrain("demo", "--model", "tiny", "--steps", "15", "--output", str(tmp_path / "demo"), cwd=tmp_path)
    for title in ("what moved", "held-out measures after each stage", "before / after", "What is the capital"):
        assert title in proc.stderr, title
    for stage in ("sft", "dpo", "grpo"):
        assert '"state": "succeeded"' in (tmp_path / "demo" / stage / "status.json").read_text()
        assert (tmp_path / "demo" / f"{stage}-merged" / "config.json").exists()


def test_demo_help_names_the_models_steps_and_output(tmp_path):
    text = posttrain("demo", "--help", cwd=tmp_path).stdout
    for option in ("--model", "tiny", "smollm2", "--steps", "--output"):
        assert option in text, option


def test_overwrite_deletes_only_a_previous_run(tmp_path):
    keep = tmp_path / "notes"
    keep.mkdir()
    (keep / "important.txt").write_text("keep me")
    proc = posttrain("train", "training.max_steps=1", "--overwrite", "-o", str(keep), cwd=tmp_path, check=False)
    assert proc.returncode == 2 and "is not a posttrain run" in proc.stderr
    assert (keep / "important.txt").read_text() == "keep me"
