"""Evaluation built into jobs (posttrain.eval): eval records, the best checkpoint, forgetting, DPO and reward
metrics, the reward-hacking guard, and `posttrain eval` comparing models. Real training on the tiny model."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from posttrain.job.directory import JobDir
from posttrain.spec import spec_from_dict
from posttrain.worker import run_worker

FACTS = [("What is the capital of France?", "Paris"), ("What is the capital of Japan?", "Tokyo"),
         ("What is the capital of Peru?", "Lima"), ("What is the capital of Kenya?", "Nairobi")]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def eval_records(job_dir: Path) -> list[dict]:
    return [r for r in JobDir(job_dir).read_metrics() if r.get("kind") == "eval"]


def train(make_spec, job_dir: Path, **sections) -> JobDir:
    result = run_worker(spec_from_dict(make_spec(**sections)), job_dir)
    assert result.state == "succeeded", result.error
    return JobDir(job_dir)


@pytest.fixture(scope="module")
def facts(tmp_path_factory) -> dict[str, Path]:
    """A tiny model taught four facts (a full fine-tune that answers them right: the regression set's "base"),
    the facts as question/answer rows, and the same as SFT rows."""
    from tests.conftest import quick_spec

    folder = tmp_path_factory.mktemp("facts")
    questions = write_jsonl(folder / "facts.jsonl", [{"prompt": q, "answer": a} for q, a in FACTS])
    sft_rows = write_jsonl(folder / "facts-sft.jsonl", [{"instruction": q, "output": f"{a}."} for q, a in FACTS])
    spec = quick_spec(peft={"type": "none"}, data={"source": str(sft_rows)},
                      training={"max_steps": 40, "per_device_train_batch_size": 4, "logging_steps": 10,
                                "save_steps": 40, "learning_rate": 3e-3},
                      eval={"regression": str(questions), "every_steps": 40, "max_new_tokens": 8})
    result = run_worker(spec_from_dict(spec), folder / "teach")
    assert result.state == "succeeded", result.error
    final = eval_records(folder / "teach")[-1]
    assert final["final"] and final["eval_regression_accuracy"] == 1.0, final  # it answers all four right
    return {"model": folder / "teach" / "final", "questions": questions, "job": folder / "teach"}


def test_sft_job_evaluates_at_each_interval_and_keeps_the_best_checkpoint(tmp_path, make_spec):
    jd = train(make_spec, tmp_path / "run",
               data={"source": "posttrain:alpaca", "validation": {"split_ratio": 0.1}},
               training={"max_steps": 6, "save_steps": 2, "save_total_limit": 1},
               # The earliest evaluation has the highest loss: "max" keeps it, so rotation must spare it.
               eval={"every_steps": 2, "max_samples": 6, "graders": ["text_similarity"], "max_new_tokens": 8,
                     "select_best": "loss", "mode": "max", "at_start": True})
    records = eval_records(jd.root)
    assert [r["step"] for r in records] == [0, 2, 4, 6] and [r["final"] for r in records] == [False] * 3 + [True]
    for record in records:  # loss and a generation-based metric at each interval
        assert record["eval_loss"] > 0 and 0 <= record["eval_text_similarity"] <= 1 and record["samples"] == 6
    losses = {r["step"]: r["eval_loss"] for r in records if r["step"] > 0}
    best_step = max(losses, key=losses.get)
    best = jd.read_best()
    assert best == {"metric": "eval_loss", "mode": "max", "value": losses[best_step], "step": best_step,
                    "checkpoint": f"checkpoints/checkpoint-{best_step}"}
    assert jd.checkpoint_dir(best_step) in jd.checkpoints()  # kept although save_total_limit=1
    assert jd.final_dir.is_dir()  # final/ is the last step, whichever is best
    marker = jd.checkpoint_marker(jd.checkpoint_dir(best_step))
    assert marker["eval"]["step"] == best_step and marker["eval"]["metrics"]["loss"] == losses[best_step]
    status = jd.read_status()
    assert status.eval["step"] == 6 and status.eval["final"] and status.best == best
    # Every answer is kept, with its scores.
    answers = [json.loads(line) for line in (jd.eval_dir / "answers-step-6.jsonl").read_text().splitlines()]
    assert len(answers) == 6 and {"prompt", "reference", "answer", "scores"} <= set(answers[0])
    # Training records stay as they were: no eval keys mixed in.
    assert all("eval_loss" not in r for r in jd.read_metrics() if r.get("kind") is None)


def test_a_regression_set_reports_what_a_narrow_fine_tune_made_the_model_forget(tmp_path, make_spec, facts):
    jd = train(make_spec, tmp_path / "narrow", model={"name_or_path": str(facts["model"])}, peft={"type": "none"},
               data={"source": "posttrain:style"},
               training={"max_steps": 20, "learning_rate": 3e-3, "save_steps": 20},
               eval={"regression": str(facts["questions"]), "every_steps": 10, "max_new_tokens": 8, "at_start": True})
    records = eval_records(jd.root)
    assert (records[0]["step"], records[0]["eval_regression_accuracy"]) == (0, 1.0)
    assert records[-1]["eval_regression_accuracy"] < 1.0
    assert records[-1]["eval_regression_forgotten"] == len(FACTS) * (1 - records[-1]["eval_regression_accuracy"])
    forgotten = [json.loads(line) for line in (jd.eval_dir / "answers-step-20.jsonl").read_text().splitlines()]
    assert {row["set"] for row in forgotten} == {"regression"}
    assert any(row["scores"]["right"] == 0.0 and row["reference"] not in row["answer"] for row in forgotten)


def test_dpo_and_reward_jobs_report_preference_and_pairwise_accuracy(tmp_path, make_spec):
    common = {"data": {"source": "posttrain:preference", "validation": {"split_ratio": 0.05}},
              "training": {"max_steps": 2, "save_steps": 2}, "eval": {"max_samples": 4}}
    dpo = eval_records(train(make_spec, tmp_path / "dpo", method="dpo", **common).root)[-1]
    assert 0 <= dpo["eval_rewards/accuracies"] <= 1 and "eval_rewards/margins" in dpo and dpo["eval_loss"] > 0
    reward = eval_records(train(make_spec, tmp_path / "reward", method="reward", **common).root)[-1]
    assert 0 <= reward["eval_pairwise_accuracy"] <= 1 and reward["eval_pairwise_accuracy"] == reward["eval_accuracy"]


def hackable_grpo(facts: dict[str, Path], **evaluation) -> dict:
    """GRPO from the facts model with a deliberately hackable reward: the built-in `length` (which prefers
    short answers) weighted -1, so longer is better. The held-out grader checks the exact reply, which knows
    nothing of length."""
    return {
        "model": {"name_or_path": str(facts["model"])}, "peft": {"type": "none"},
        "method": {"name": "grpo", "reward_functions": ["length"], "reward_weights": [-1.0], "num_generations": 4,
                   "max_completion_length": 16, "temperature": 2.0},
        "data": {"source": str(facts["questions"])},
        "training": {"max_steps": 16, "per_device_train_batch_size": 8, "logging_steps": 1, "save_steps": 100,
                     "learning_rate": 1e-2},
        "eval": {"data": str(facts["questions"]), "every_steps": 4, "at_start": True, "max_new_tokens": 16,
                 "graders": [{"name": "exact", "type": "exact_match", "reference": "{{item.answer}}."}],
                 "divergence_tolerance": 0.2, "divergence_window": 3, **evaluation},
        "tracking": {"report_to": []},
    }


def test_the_guard_warns_when_a_hackable_reward_climbs_and_the_held_out_score_falls(tmp_path, facts):
    result = run_worker(spec_from_dict(hackable_grpo(facts)), tmp_path / "hack")
    assert result.state == "succeeded", result.error
    jd = JobDir(tmp_path / "hack")
    rewards = [r["reward"] for r in jd.read_metrics() if "reward" in r]
    assert sum(rewards[-4:]) / 4 > sum(rewards[:4]) / 4  # the reward climbs...
    held_out = eval_records(jd.root)
    assert held_out[0]["eval_exact"] == 1.0 and held_out[-1]["eval_exact"] < 1.0  # ...the held-out score does not
    events = [r for r in jd.read_metrics() if r.get("kind") == "event"]
    assert events and events[0]["event"] == "divergence" and "reward hacking suspected" in events[0]["message"]
    assert jd.read_status().warnings == [e["message"] for e in events]
    assert "WARNING posttrain.worker: eval step" in jd.log_path.read_text()


def test_stop_on_divergence_stops_the_job_with_a_checkpoint(tmp_path, facts):
    result = run_worker(spec_from_dict(hackable_grpo(facts, stop_on_divergence=True)), tmp_path / "stop")
    assert result.state == "failed" and "stop_on_divergence" in result.error
    jd = JobDir(tmp_path / "stop")
    stopped_at = next(r["step"] for r in jd.read_metrics() if r.get("kind") == "event")
    assert result.step == stopped_at < 16
    assert [JobDir.checkpoint_step(c) for c in jd.checkpoints()] == [stopped_at]
    assert not jd.final_dir.exists()
    assert jd.read_status().state == "failed"


def test_posttrain_eval_compares_a_base_and_a_fine_tuned_model(tmp_path, facts):
    out = tmp_path / "compare.json"
    proc = subprocess.run(
        [sys.executable, "-m", "posttrain.cli", "eval", "posttrain:tiny", str(facts["job"]), "--data",
         str(facts["questions"]), "--grader", "string_check", "--max-new-tokens", "8", "--json", str(out)],
        capture_output=True, text=True, timeout=300, env={**__import__("os").environ, "COLUMNS": "200"})
    assert proc.returncode == 0, proc.stderr
    results = json.loads(out.read_text())
    base, tuned = results["models"]
    assert (base["model"], tuned["model"]) == ("posttrain:tiny", str(facts["job"]))
    assert "final" in tuned["loaded"]
    assert base["metrics"]["string_check"] == 0.0 and tuned["metrics"]["string_check"] == 1.0
    assert [a["answer"] for a in tuned["answers"]] == ["Paris.", "Tokyo.", "Lima.", "Nairobi."]
    assert "string_check" in proc.stderr and "Paris." in proc.stderr  # the table and the answers, side by side


def test_posttrain_eval_asks_a_served_model_by_its_id(tmp_path, facts):
    """`server:<model id>`: the answers of a model an OpenAI-compatible server serves (here the project's own
    inference server on loopback), the same greedy answers as the model loaded locally."""
    from ports import free_port

    from posttrain.inference.process import InferenceServerProcess

    port = free_port()
    server = InferenceServerProcess(
        [sys.executable, "-m", "posttrain.cli", "rl", "serve-inference", "--model", str(facts["model"]), "--port",
         str(port), "--served-model-name", "facts-model"],
        f"http://127.0.0.1:{port}", log_path=tmp_path / "server.log", startup_timeout=180)
    server.start()
    try:
        out = tmp_path / "served.json"
        proc = subprocess.run(
            [sys.executable, "-m", "posttrain.cli", "eval", "server:facts-model", str(facts["model"]), "--server",
             f"http://127.0.0.1:{port}", "--data", str(facts["questions"]), "--grader", "string_check",
             "--max-new-tokens", "8", "--json", str(out)],
            capture_output=True, text=True, timeout=300)
    finally:
        server.stop()
    assert proc.returncode == 0, proc.stderr
    served, local = json.loads(out.read_text())["models"]
    assert served["loaded"] == "served model facts-model" and "loss" not in served["metrics"]  # no weights: no loss
    assert served["metrics"]["string_check"] == local["metrics"]["string_check"] == 1.0
    assert [a["answer"] for a in served["answers"]] == [a["answer"] for a in local["answers"]]
