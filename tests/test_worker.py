"""The worker process and the job-directory contract: resume, cancellation, and bad input that loses nothing."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from waiting import wait_for

from posttrain.errors import ConfigError, PosttrainError
from posttrain.job.directory import COMPLETE_MARKER, JobDir
from posttrain.spec import spec_from_dict
from posttrain.worker import run_worker


def start_worker(job_dir: Path, spec: dict, *extra: str) -> subprocess.Popen:
    job_dir.mkdir(parents=True, exist_ok=True)
    spec_file = job_dir.parent / f"{job_dir.name}-spec.json"
    spec_file.write_text(json.dumps(spec))
    return subprocess.Popen(
        [sys.executable, "-m", "posttrain.worker", "--spec", str(spec_file), "--job-dir", str(job_dir), *extra],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )


def slow_spec(make_spec, steps: int = 200) -> dict:
    # Enough steps that the worker is still training when the test interrupts it.
    return make_spec(training={"max_steps": steps, "save_steps": 10, "logging_steps": 1,
                               "lr_scheduler_type": "linear", "learning_rate": 1e-3, "save_total_limit": 3})


def test_sigterm_cancels_cleanly_and_resume_continues_step_and_schedule(tmp_path, make_spec):
    job_dir = tmp_path / "job"
    spec = slow_spec(make_spec)
    proc = start_worker(job_dir, spec)
    job = JobDir(job_dir)
    wait_for(lambda: job.latest_checkpoint() is not None, what="a complete checkpoint")
    proc.send_signal(signal.SIGTERM)
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode == 143, output
    status = job.read_status()
    assert status.state == "cancelled"
    # Acknowledged as it arrived, for the process the service signals: what keeps it from sending it again.
    received = job.read_stop_received()
    assert (received.pid, received.request, received.signal) == (proc.pid, "cancel", "SIGTERM")
    assert not job.final_dir.exists()
    stopped_at = status.step
    checkpoint_step = int(job.latest_checkpoint().name.split("-")[1])
    assert 10 <= checkpoint_step <= stopped_at < 200

    # A crash mid-save leaves a checkpoint without its marker: it must be ignored and removed.
    torn = job.checkpoints_dir / f"checkpoint-{checkpoint_step + 1000}"
    torn.mkdir()
    (torn / "optimizer.pt").write_bytes(b"partial")

    resumed = spec_from_dict(spec)
    result = run_worker(resumed, job_dir, resume=True)
    assert result.state == "succeeded", result.error
    assert not torn.exists()
    assert job.read_status().step == 200 and job.read_status().attempt == 2

    logged_steps = [r["step"] for r in job.read_metrics() if "loss" in r]
    assert logged_steps == sorted(set(logged_steps)), "steps after the checkpoint were logged twice"
    records = [r for r in job.read_metrics() if "learning_rate" in r and "loss" in r]
    after = [r for r in records if r["step"] > checkpoint_step]
    assert after[0]["step"] == checkpoint_step + 1  # the step count continues
    # The linear schedule continues where it was: lr(step) = lr0 * (1 - (step - 1) / max_steps).
    for record in after[:3] + after[-3:]:
        expected = 1e-3 * (1 - (record["step"] - 1) / 200)
        assert record["learning_rate"] == pytest.approx(expected, rel=1e-3, abs=1e-9)


def test_second_sigint_stops_at_once_and_leaves_a_consistent_directory(tmp_path, make_spec):
    job_dir = tmp_path / "job"
    proc = start_worker(job_dir, slow_spec(make_spec, 100000))
    job = JobDir(job_dir)
    wait_for(lambda: (job.read_status() or None) and job.read_status().step > 2, what="training to start")
    proc.send_signal(signal.SIGINT)
    proc.send_signal(signal.SIGINT)
    proc.communicate(timeout=120)
    assert proc.returncode in (130, 143)
    assert job.read_status().state == "cancelled"
    for checkpoint in job.checkpoints():
        assert (checkpoint / COMPLETE_MARKER).exists()


def test_rerunning_into_an_existing_run_needs_resume(tmp_path, make_spec):
    first = run_worker(spec_from_dict(make_spec(training={"max_steps": 2})), tmp_path / "job")
    assert first.state == "succeeded"
    final_files = sorted(p.name for p in first.final_dir.iterdir())
    status = (tmp_path / "job" / "status.json").read_text()
    with pytest.raises(ConfigError, match=r"already holds a run.*--resume"):
        run_worker(spec_from_dict(make_spec(training={"max_steps": 2})), tmp_path / "job")
    assert sorted(p.name for p in first.final_dir.iterdir()) == final_files
    assert (tmp_path / "job" / "status.json").read_text() == status


@pytest.mark.parametrize(
    ("sections", "message"),
    [
        # The job's spec holds local paths absolute: the error names the folder it looked for.
        ({"model": {"name_or_path": "./no/such/model"}}, "/no/such/model' does not exist"),
        ({"data": {"source": "./missing.jsonl"}}, "missing.jsonl"),
        ({"method": "dpo"}, "cannot train method dpo"),
        ({"method": {"name": "grpo", "reward_functions": ["nope"]}, "data": {"source": "posttrain:gsm8k"}},
         "unknown reward function 'nope'"),
    ],
)
def test_bad_input_fails_before_training_with_a_clear_error(tmp_path, make_spec, sections, message):
    result = run_worker(spec_from_dict(make_spec(**sections)), tmp_path / "job")
    assert result.state == "failed" and result.exit_code == 2
    assert message in result.error
    job = JobDir(tmp_path / "job")
    assert job.read_status().state == "failed" and message in job.read_status().error
    assert not job.final_dir.exists() and not job.checkpoints(complete_only=False)


def test_malformed_row_is_named_by_file_and_row_before_any_training(tmp_path, make_spec):
    data = tmp_path / "train.jsonl"
    rows = [{"instruction": "Say hi", "input": "", "output": "Hi"}] * 5
    lines = [json.dumps(r) for r in rows]
    lines[2] = json.dumps({"instruction": "Say hi", "input": ""})
    data.write_text("\n".join(lines) + "\n")
    result = run_worker(spec_from_dict(make_spec(data={"source": str(data), "format": "alpaca"})), tmp_path / "job")
    assert result.state == "failed"
    assert "train.jsonl row 3" in result.error and "output" in result.error
    assert not JobDir(tmp_path / "job").metrics_path.exists()

    skipped = run_worker(spec_from_dict(make_spec(data={"source": str(data), "on_bad_row": "skip"},
                                                  training={"max_steps": 1})), tmp_path / "job2")
    assert skipped.state == "succeeded"


def test_worker_cli_rejects_an_unreadable_spec(tmp_path):
    spec = tmp_path / "spec.json"
    spec.write_text('{"training": {"max_step": 3}}')
    proc = subprocess.run([sys.executable, "-m", "posttrain.worker", "--spec", str(spec), "--job-dir",
                           str(tmp_path / "job")], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "unknown key 'training.max_step'; did you mean 'training.max_steps'?" in proc.stderr
    assert JobDir(tmp_path / "job").read_status().state == "failed"


def test_threads_default_to_one_on_cpu_and_follow_the_config(tmp_path, make_spec):
    result = run_worker(spec_from_dict(make_spec(training={"max_steps": 1, "num_threads": 2})), tmp_path / "job")
    assert result.state == "succeeded"
    assert JobDir(tmp_path / "job").read_metrics()[0]["num_threads"] == 2
    assert os.environ.get("OMP_NUM_THREADS") == "1"


def test_an_opt_in_tracker_that_is_not_installed_is_named(tmp_path, make_spec):
    import importlib.util

    if importlib.util.find_spec("wandb") is not None:
        pytest.skip("wandb is installed here, so there is nothing to refuse")
    result = run_worker(spec_from_dict(make_spec(tracking={"report_to": ["wandb"]})), tmp_path / "job")
    assert result.state == "failed" and "pip install 'posttrain[wandb]'" in result.error


def test_unreadable_inputs_are_named_not_tracebacks(tmp_path, make_spec):
    from posttrain.preflight import preflight

    latin1 = tmp_path / "latin1.jsonl"
    latin1.write_bytes('{"text": "caf\u00e9"}\n'.encode("latin-1"))
    broken_model = tmp_path / "broken-model"
    broken_model.mkdir()
    (broken_model / "config.json").write_text("{")
    cases = [
        ({"data": {"source": str(latin1)}}, "latin1.jsonl: not UTF-8 text"),
        ({"model": {"name_or_path": str(broken_model)}}, "config.json is not valid JSON"),
        ({"method": {"name": "grpo", "reward_functions": ["..x:f"]}, "data": {"source": "posttrain:gsm8k"}},
         "is not of the form 'package.module:function'"),
    ]
    for sections, message in cases:
        with pytest.raises(PosttrainError, match=re.escape(message)):
            preflight(spec_from_dict(make_spec(**sections)))


def test_only_rank_zero_writes_the_job_directory(tmp_path, make_spec, monkeypatch):
    # Fails in the worker's option checks (the reward module is imported there), before any model loads.
    spec = spec_from_dict(make_spec(method={"name": "grpo", "reward_functions": ["no_such_module:fn"]},
                                    data={"source": "posttrain:gsm8k"}))
    monkeypatch.setenv("RANK", "1")
    result = run_worker(spec, tmp_path / "rank1")
    assert result.state == "failed" and "no_such_module" in result.error
    assert not (tmp_path / "rank1" / "status.json").exists() and not (tmp_path / "rank1" / "spec.json").exists()
    monkeypatch.setenv("RANK", "0")
    result = run_worker(spec, tmp_path / "rank0")
    assert JobDir(tmp_path / "rank0").read_status().state == "failed"


def test_only_rank_zero_writes_final(tmp_path, monkeypatch):
    from posttrain.job.final import save_final

    class Trainer:  # like transformers on a rank that should not save: called, writes nothing
        def __init__(self, writes: bool) -> None:
            self.writes = writes

        def save_model(self, path: str) -> None:
            if self.writes:
                Path(path).mkdir(parents=True, exist_ok=True)
                (Path(path) / "model.safetensors").write_text("weights")

    class Tokenizer:
        def save_pretrained(self, path: str) -> None:
            (Path(path) / "tokenizer.json").write_text("{}")

    job = JobDir(tmp_path / "job").create()
    monkeypatch.setenv("RANK", "1")
    save_final(Trainer(writes=False).save_model, Tokenizer(), job)
    assert not job.final_dir.exists() and not (job.root / ".final.partial").exists()
    monkeypatch.setenv("RANK", "0")
    save_final(Trainer(writes=True).save_model, Tokenizer(), job)
    assert sorted(p.name for p in job.final_dir.iterdir()) == ["model.safetensors", "tokenizer.json"]


def pause_at(step: int):
    """A trainer callback that sends the worker's own process the pause signal at ``step``, as the service would."""
    from transformers import TrainerCallback

    class PauseAt(TrainerCallback):
        def on_step_end(self, args, state, control, **_kwargs):
            if state.global_step == step:
                os.kill(os.getpid(), signal.SIGUSR1)

    return PauseAt()


PAUSABLE_METHODS = {
    "sft": {},
    "dpo": {"method": {"name": "dpo"}, "data": {"source": "posttrain:preference"}},
    "reward": {"method": "reward", "data": {"source": "posttrain:preference"}},
    "grpo": {"method": {"name": "grpo", "num_generations": 4, "max_completion_length": 8},
             "data": {"source": "posttrain:gsm8k"}, "training": {"per_device_train_batch_size": 4}},
}


@pytest.mark.parametrize("method", list(PAUSABLE_METHODS))
def test_sigusr1_pauses_with_a_checkpoint_and_resume_continues(tmp_path, make_spec, method):
    sections = PAUSABLE_METHODS[method]
    training = {"max_steps": 6, "save_steps": 100, "logging_steps": 1, **sections.get("training", {})}
    spec = spec_from_dict(make_spec(**{**sections, "training": training}))
    job = JobDir(tmp_path / "job")

    paused = run_worker(spec, job.root, extra_callbacks=[pause_at(2)])
    assert (paused.state, paused.exit_code) == ("paused", 75), paused.error
    assert job.read_stop_received() is None  # run in-process: nobody re-sends signals, nothing to acknowledge
    status = job.read_status()
    # The pause was seen at the next step boundary, and that step was saved (save_steps alone never would).
    assert status.state == "paused" and status.step == 3 and status.finished_at is None
    assert [p.name for p in job.checkpoints()] == ["checkpoint-3"] and not job.final_dir.exists()

    resumed = run_worker(spec, job.root, resume=True)
    assert resumed.state == "succeeded", resumed.error
    assert job.read_status().step == 6
    logged = [r["step"] for r in job.read_metrics() if "train_loss" not in r]
    assert logged == [1, 2, 3, 4, 5, 6]  # continued from step 3, not restarted
