"""The online GRPO trainer against a real Atropos trajectory API (`run-api` on a loopback port).

No environment and no inference server here: the test plays the environment and POSTs scored groups
to /scored_data itself (the trainer runs with --no-sync). The end-to-end loop with both is tests/rl/test_loop.py.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from trainer_harness import (
    BAD,
    GOOD,
    completion_logprobs,
    finish,
    good_and_bad_group,
    start_trainer,
    trainer_log,
    wait_for_registration,
)
from trajectory_api import TrajectoryAPI
from waiting import kill_process, wait_for

from posttrain.job.directory import JobDir


def test_training_moves_the_policy_towards_high_scores(tmp_path: Path, tiny_model_dir: Path):
    base = {"good": completion_logprobs(tiny_model_dir, GOOD), "bad": completion_logprobs(tiny_model_dir, BAD)}
    job_dir = tmp_path / "run"
    with TrajectoryAPI(tmp_path / "api.log") as api:
        trainer = start_trainer(job_dir, api.url, "--training-steps", "6", "--lr", "3e-3",
                                "--checkpoint-interval", "0", "--benchmark")
        registration = api.wait_for_trainer()
        assert registration == {"batch_size": 4, "max_token_len": 64}
        for _ in range(6):
            # The sampler's log-probs are the base model's: the first step is exactly on-policy.
            api.post_group(good_and_bad_group(base))
        assert finish(trainer, job_dir) == 0, trainer_log(job_dir)
        assert api.status()["current_step"] == 6

    job = JobDir(job_dir)
    assert job.read_status().state == "succeeded" and job.read_status().step == 6
    metrics = job.read_metrics()
    assert [m["step"] for m in metrics] == [1, 2, 3, 4, 5, 6]
    for record in metrics:
        for key in ("loss", "lr", "reward_mean", "mean_ratio", "clipped_fraction", "sync_seconds",
                    "tokens_per_second", "grad_norm", "step_seconds", "wait_seconds"):
            assert key in record, (key, record)
        assert record["reward_mean"] == pytest.approx(0.5)
        assert record["sync_seconds"] == 0.0
    # Our log-probs of the posted tokens equal the sampler's: ratio 1, nothing clipped, on step 1.
    assert metrics[0]["mean_ratio"] == pytest.approx(1.0, abs=1e-4)
    assert metrics[0]["clipped_fraction"] == 0.0
    # Later batches carry the same (now stale) log-probs: the policy moved, and the clip engages.
    assert metrics[-1]["mean_ratio"] != pytest.approx(1.0, abs=1e-3)
    assert max(m["clipped_fraction"] for m in metrics) > 0

    after = {"good": completion_logprobs(job.final_dir, GOOD), "bad": completion_logprobs(job.final_dir, BAD)}
    assert sum(after["good"]) > sum(base["good"])
    assert sum(after["bad"]) < sum(base["bad"])
    margin_before = sum(base["good"]) - sum(base["bad"])
    margin_after = sum(after["good"]) - sum(after["bad"])
    assert margin_after > margin_before + 0.5, (margin_before, margin_after)


def test_a_killed_trainer_resumes_from_its_last_checkpoint_and_tells_the_api(tmp_path: Path):
    job_dir = tmp_path / "run"
    job = JobDir(job_dir)
    args = ("--training-steps", "5", "--lr", "1e-3", "--checkpoint-interval", "2")
    with TrajectoryAPI(tmp_path / "api1.log") as api:
        trainer = start_trainer(job_dir, api.url, *args)
        api.wait_for_trainer()
        for _ in range(3):
            api.post_group(good_and_bad_group())
        wait_for(lambda: (job.read_status().step if job.read_status() else 0) >= 3, timeout=300,
                 what="three trained steps")
        kill_process(trainer)  # SIGKILL: a crash, nothing gets to clean up
    assert job.read_status().state == "running"
    assert [p.name for p in job.checkpoints()] == ["checkpoint-2"]
    assert [m["step"] for m in job.read_metrics()] == [1, 2, 3]

    # Without --resume the job directory is refused, untouched.
    refused = subprocess.run(
        [sys.executable, "-m", "posttrain.cli", "rl", "train", "--model-name", "posttrain:tiny", "--no-sync",
         "--save-path", str(job_dir)], capture_output=True, text=True, timeout=120)
    assert refused.returncode == 2 and "--resume" in refused.stderr

    # A fresh API (the old one went down too): the trainer registers the step it continues from.
    with TrajectoryAPI(tmp_path / "api2.log") as api:
        trainer = start_trainer(job_dir, api.url, *args, "--resume")
        api.wait_for_trainer()
        assert api.status()["current_step"] == 2
        for _ in range(3):
            api.post_group(good_and_bad_group())
        assert finish(trainer, job_dir) == 0, trainer_log(job_dir)
        assert api.status()["current_step"] == 5
    status = job.read_status()
    assert (status.state, status.step, status.total_steps) == ("succeeded", 5, 5)
    # Step 3 of the killed run was not checkpointed: it is trained (and logged) again, once.
    assert [m["step"] for m in job.read_metrics()] == [1, 2, 3, 4, 5]
    assert "resuming from" in trainer_log(job_dir) and "checkpoint-2" in trainer_log(job_dir)
    assert (job.final_dir / "config.json").is_file()
    state = json.loads((job.checkpoints_dir / "checkpoint-4" / "trainer_state.json").read_text())
    assert state["step"] == 4


def test_a_pause_checkpoints_the_step_and_a_cancel_while_waiting_stops_at_once(tmp_path: Path):
    job_dir = tmp_path / "run"
    job = JobDir(job_dir)
    with TrajectoryAPI(tmp_path / "api.log") as api:
        trainer = start_trainer(job_dir, api.url, "--training-steps", "3", "--checkpoint-interval", "0")
        api.wait_for_trainer()
        api.post_group(good_and_bad_group())
        wait_for(lambda: (job.read_status().step if job.read_status() else 0) >= 1, timeout=300, what="step 1")
        trainer.send_signal(signal.SIGUSR1)  # what the job service sends to pause a job
        assert finish(trainer, job_dir, timeout=60) == 75, trainer_log(job_dir)
        assert job.read_status().state == "paused"
        assert [p.name for p in job.checkpoints()] == ["checkpoint-1"]  # saved although the interval is 0

        seen = len(trainer_log(job_dir))
        trainer = start_trainer(job_dir, api.url, "--training-steps", "3", "--checkpoint-interval", "0", "--resume")
        wait_for_registration(job_dir, after=seen)
        trainer.send_signal(signal.SIGTERM)  # no batch is coming: the wait itself must give way
        assert finish(trainer, job_dir, timeout=60) == 143, trainer_log(job_dir)
    status = job.read_status()
    assert (status.state, status.step) == ("cancelled", 1)


def test_an_unreachable_api_fails_the_job_with_its_address(tmp_path: Path):
    from trajectory_api import free_port

    from posttrain.rl.grpo.trajectory_client import TrajectoryAPIClient, TrajectoryAPIError

    url = f"http://127.0.0.1:{free_port()}"
    with TrajectoryAPIClient(url, poll_interval=0.05) as client, pytest.raises(TrajectoryAPIError, match=url):
        client.wait_until_up(timeout=0.3)


def test_a_lora_run_keeps_its_kl_reference_and_resumes_its_adapter(tmp_path: Path):
    job_dir = tmp_path / "run"
    job = JobDir(job_dir)
    args = ("--training-steps", "3", "--lr", "1e-2", "--checkpoint-interval", "1", "peft.type=lora", "peft.r=4",
            "peft.alpha=8", "method.beta=0.5")
    with TrajectoryAPI(tmp_path / "api.log") as api:
        trainer = start_trainer(job_dir, api.url, *args)
        api.wait_for_trainer()
        for _ in range(2):
            api.post_group(good_and_bad_group())
        wait_for(lambda: job.latest_checkpoint() is not None and job.latest_checkpoint().name == "checkpoint-2",
                 timeout=300, what="checkpoint-2")
        kill_process(trainer)
        seen = len(trainer_log(job_dir))
        trainer = start_trainer(job_dir, api.url, *args, "--resume")
        wait_for_registration(job_dir, after=seen)
        api.post_group(good_and_bad_group())
        assert finish(trainer, job_dir) == 0, trainer_log(job_dir)
    kl = [m["kl"] for m in job.read_metrics()]
    # The reference is the base (the adapter switched off): identical before the first update...
    assert kl[0] == pytest.approx(0.0, abs=1e-7)
    # ...and apart after it, also after the resume: the trained adapter was loaded, not a fresh one.
    assert kl[1] > 0 and kl[2] > 0
    assert (job.final_dir / "adapter_config.json").is_file()
    assert (job.checkpoints_dir / "checkpoint-2" / "model" / "adapter_config.json").is_file()


def test_an_online_run_evaluates_on_eval_data_every_few_steps(tmp_path: Path):
    """online_grpo reads no data.* section: eval.data gives it held-out prompts, answered by the live policy."""
    held_out = tmp_path / "held-out.jsonl"
    held_out.write_text("".join(json.dumps({"prompt": f"Say {word}.", "answer": word}) + "\n"
                                for word in ("red", "blue", "green")))
    job_dir = tmp_path / "run"
    with TrajectoryAPI(tmp_path / "api.log") as api:
        trainer = start_trainer(job_dir, api.url, "--training-steps", "4", "--checkpoint-interval", "0",
                                f"eval.data={held_out}", "eval.every_steps=2", "eval.graders=[exact_match]",
                                "eval.max_new_tokens=4", "eval.at_start=true")
        api.wait_for_trainer()
        for _ in range(4):
            api.post_group(good_and_bad_group())
        assert finish(trainer, job_dir) == 0, trainer_log(job_dir)

    job = JobDir(job_dir)
    evaluations = [m for m in job.read_metrics() if m.get("kind") == "eval"]
    assert [(m["step"], m["final"], m["samples"]) for m in evaluations] == [(0, False, 3), (2, False, 3), (4, True, 3)]
    assert all(m["eval_exact_match"] == 0.0 for m in evaluations)  # the tiny random model says none of them
    assert [m["step"] for m in job.read_metrics() if "kind" not in m] == [1, 2, 3, 4]  # training records apart
    assert job.read_status().eval["step"] == 4
    assert len((job.eval_dir / "answers-step-4.jsonl").read_text().splitlines()) == 3
