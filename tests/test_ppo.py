"""PPO (method ppo) on the tiny model, against a reward model trained by a real posttrain reward job in this
module on a learnable preference: answers that contain WORD beat the same answers without it."""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from waiting import kill_process, wait_for

from posttrain.data import load_training_data
from posttrain.errors import ConfigError, DatasetError
from posttrain.job.directory import JobDir
from posttrain.rl.ppo import loss as ppo_loss
from posttrain.spec import DataSpec, spec_from_dict
from posttrain.worker import run_worker

WORD = "blue"
FILLERS = ["the cat sat", "we went home", "it is late", "read a book", "open the door", "a tall tree",
           "the sun rose", "she ran fast", "he ate bread", "a quiet lake", "birds can fly", "the old road"]
PROMPTS = ["Describe the sky.", "What colour is the sea?", "Name a colour.", "Tell me about a car.",
           "What do you see?", "Write a short line.", "Say something.", "Pick a word."]
METRICS = ("reward", "reward_with_kl", "kl", "policy_loss", "value_loss", "policy_clip_fraction",
           "value_clip_fraction", "explained_variance", "entropy", "response_length", "generation_tokens_per_s",
           "tokens_per_s")


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def preference_pairs() -> list[dict]:
    rows = []
    for i in range(96):
        filler = FILLERS[i % len(FILLERS)]
        cut = 1 + i % 3
        words = filler.split()
        chosen = " ".join([*words[:cut], WORD, *words[cut:]])
        rows.append({"prompt": PROMPTS[i % len(PROMPTS)], "chosen": chosen, "rejected": filler})
    return rows


@pytest.fixture(scope="module")
def reward_dir(tmp_path_factory) -> Path:
    """final/ of a posttrain reward job (a LoRA adapter with its score head) that learned to prefer WORD."""
    root = tmp_path_factory.mktemp("reward")
    data = write_jsonl(root / "pairs.jsonl", preference_pairs())
    spec = spec_from_dict({
        "model": {"name_or_path": "posttrain:tiny"}, "method": "reward", "peft": {"type": "lora"},
        "data": {"source": str(data)}, "tracking": {"report_to": []},
        "training": {"max_steps": 12, "per_device_train_batch_size": 8, "learning_rate": 5e-3, "logging_steps": 10,
                     "save_steps": None, "num_threads": 1},
    })
    result = run_worker(spec, root / "job", log_to_file=False)
    assert result.state == "succeeded", result.error
    return result.final_dir


@pytest.fixture(scope="module")
def prompts_file(tmp_path_factory) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("prompts") / "prompts.jsonl", [{"prompt": p} for p in PROMPTS])


def ppo_spec(reward_dir: Path, prompts: Path, **training) -> dict:
    return {
        "model": {"name_or_path": "posttrain:tiny"}, "peft": {"type": "lora"},
        "method": {"name": "ppo", "reward_model": str(reward_dir), "kl_coef": 0.02, "ppo_epochs": 2,
                   "num_mini_batches": 2, "response_length": 8, "temperature": 1.0},
        "data": {"source": str(prompts)}, "tracking": {"report_to": []},
        "training": {"max_steps": 24, "per_device_train_batch_size": 8, "learning_rate": 5e-3, "logging_steps": 1,
                     "save_steps": None, "num_threads": 1, **training},
    }


def test_ppo_evaluates_in_its_loop_and_keeps_its_best_checkpoint(tmp_path: Path, reward_dir: Path,
                                                                 prompts_file: Path):
    held_out = write_jsonl(tmp_path / "held-out.jsonl", [{"prompt": p, "answer": WORD} for p in PROMPTS[:4]])
    spec = ppo_spec(reward_dir, prompts_file, max_steps=4)
    spec["eval"] = {"data": str(held_out), "every_steps": 2, "max_new_tokens": 8, "select_best": "says_word",
                    "graders": [{"type": "string_check", "name": "says_word", "input": "{{sample.output_text}}",
                                 "reference": WORD, "operation": "ilike"}]}
    result = run_worker(spec_from_dict(spec), tmp_path / "run", log_to_file=False)
    assert result.state == "succeeded", result.error
    job = JobDir(tmp_path / "run")
    evaluations = [m for m in job.read_metrics() if m.get("kind") == "eval"]
    # Prompt/answer rows have no reply to score: the grader's metric only.
    assert [m["step"] for m in evaluations] == [2, 4] and all("eval_says_word" in m for m in evaluations)
    assert "eval_loss" not in evaluations[0]
    best = job.read_best()
    scores = {m["step"]: m["eval_says_word"] for m in evaluations}
    assert best["step"] == max(scores, key=lambda step: (scores[step], -step))  # the first of the best
    assert (job.checkpoint_dir(best["step"]) / "critic" / "adapter_config.json").is_file()  # a whole checkpoint

    # A metric the evaluation cannot report fails the job before it trains, naming the key.
    spec["eval"]["select_best"] = "loss"
    refused = run_worker(spec_from_dict(spec), tmp_path / "refused", log_to_file=False)
    assert refused.state == "failed" and refused.input_error and "eval.select_best" in refused.error
    assert refused.step == 0


def test_the_reward_model_learned_the_preference(reward_dir: Path):
    from posttrain.modeling import render_scored, resolve_placement
    from posttrain.rl.ppo.models import RewardModel, load_sequence_classifier

    spec = spec_from_dict({"method": {"name": "ppo", "reward_model": str(reward_dir)}, "training": {"max_steps": 1}})
    model, tokenizer = load_sequence_classifier(spec, resolve_placement(spec.model), str(reward_dir), "reward")
    reward = RewardModel(model.eval(), tokenizer)
    prompt = [{"role": "user", "content": "Pick something."}]
    held_out = ["a red house", "the dog barked", "my green hat"]  # none of these in training
    with_word = reward.score([render_scored(tokenizer, prompt, f"{WORD} {t}") for t in held_out], 128, 8)
    without = reward.score([render_scored(tokenizer, prompt, t) for t in held_out], 128, 8)
    assert (with_word > without).all(), (with_word, without)


def test_ppo_raises_the_reward_model_score_while_kl_stays_bounded(tmp_path: Path, reward_dir: Path,
                                                                   prompts_file: Path):
    result = run_worker(spec_from_dict(ppo_spec(reward_dir, prompts_file)), tmp_path / "run", log_to_file=False)
    assert result.state == "succeeded", result.error
    job = JobDir(tmp_path / "run")
    metrics = job.read_metrics()
    assert [m["step"] for m in metrics] == list(range(1, 25))
    for record in metrics:
        for key in METRICS:
            assert key in record, key
    rewards = [m["reward"] for m in metrics]
    third = len(rewards) // 3
    first, last = rewards[:third], rewards[-third:]
    # The rise of the mean reward from the first third of the run to the last must stand clear of the step-to-
    # step noise: three standard errors of the difference of the two means (a policy that does not learn passes
    # this about once in a thousand runs).
    rise = statistics.fmean(last) - statistics.fmean(first)
    noise = math.sqrt((statistics.variance(first) + statistics.variance(last)) / third)
    assert rise > max(3 * noise, 0.05), (rise, noise, rewards)
    kls = [m["kl"] for m in metrics]
    assert max(kls[-third:]) < 8.0, kls  # nats per answer of at most 8 tokens: the policy stays near its base
    assert all(0 <= m["policy_clip_fraction"] <= 1 and 0 <= m["value_clip_fraction"] <= 1 for m in metrics)
    assert (job.final_dir / "adapter_config.json").is_file()


def start_worker(spec: dict, job_dir: Path, *args: str) -> subprocess.Popen:
    job_dir.mkdir(parents=True, exist_ok=True)
    spec_path = job_dir.parent / f"{job_dir.name}-spec.json"
    spec_path.write_text(json.dumps(spec))
    return subprocess.Popen([sys.executable, "-m", "posttrain.worker", "--spec", str(spec_path), "--job-dir",
                             str(job_dir), *args], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            stdin=subprocess.DEVNULL, env={**os.environ, "OMP_NUM_THREADS": "1"})


def test_a_killed_ppo_run_resumes_from_its_checkpoint_and_finishes(tmp_path: Path, reward_dir: Path,
                                                                   prompts_file: Path):
    job_dir = tmp_path / "run"
    job = JobDir(job_dir)
    spec = ppo_spec(reward_dir, prompts_file, max_steps=12, save_steps=2, per_device_train_batch_size=4)
    spec["peft"] = {"type": "none"}  # full actor and critic: both whole models and their optimizers round-trip
    spec["method"]["kl_target"] = 1.0  # the adaptive KL coefficient is part of the state
    worker = start_worker(spec, job_dir)
    try:
        def three_steps() -> bool:
            assert worker.poll() is None, f"the worker exited with {worker.returncode}: {job.read_status()}"
            return (job.read_status().step if job.read_status() else 0) >= 3

        wait_for(three_steps, timeout=600, what="three PPO steps")
    finally:
        kill_process(worker)  # SIGKILL: a crash, nothing gets to clean up
    killed = job.read_metrics()
    saved = job.latest_checkpoint()
    if JobDir.checkpoint_step(saved) >= len(killed):
        # The kill landed just after a checkpoint (a step takes a tenth of a second on an idle machine): resume
        # from the one before it (two are kept), so that a step logged after the checkpoint exists to compare.
        shutil.rmtree(saved)
        saved = job.latest_checkpoint()
    at = JobDir.checkpoint_step(saved)
    assert job.read_status().state == "running" and 2 <= at < len(killed) < 12
    for name in ("model/config.json", "critic/config.json", "optimizer.pt", "critic_optimizer.pt", "rng.pt"):
        assert (saved / name).is_file(), name
    ppo_state = json.loads((saved / "ppo_state.json").read_text())
    assert ppo_state["data_position"] == at * 8  # 8 rollouts per step (4 x 1 x num_mini_batches 2)
    assert ppo_state["kl_controller"]["value"] != spec["method"]["kl_coef"]  # adapted

    worker = start_worker(spec, job_dir, "--resume")
    try:
        assert worker.wait(600) == 0
    finally:
        kill_process(worker)
    status = job.read_status()
    assert (status.state, status.step, status.total_steps) == ("succeeded", 12, 12)
    metrics = job.read_metrics()
    assert [m["step"] for m in metrics] == list(range(1, 13))  # steps after the checkpoint logged once, again
    # Actor, critic, optimizers, KL controller, data position and random generators all came back: the step
    # after the checkpoint repeats the killed run's exactly.
    again, before = metrics[at], killed[at]
    assert again["kl_coef"] == pytest.approx(ppo_state["kl_controller"]["value"])
    for key in ("kl_coef", "reward", "kl", "policy_loss", "value_loss", "response_length"):
        assert again[key] == pytest.approx(before[key], rel=1e-4, abs=1e-6), key
    assert (job.final_dir / "config.json").is_file()


# ---------------------------------------------------------------------------------------------------
# The arithmetic, on hand-built tensors


def test_gae_matches_the_recursion_by_hand_and_stops_at_the_end_of_each_answer():
    rewards = torch.tensor([[0.0, 0.0, 1.0, 5.0], [0.5, 2.0, 0.0, 0.0]])
    values = torch.tensor([[0.1, 0.2, 0.3, 9.0], [1.0, 0.5, 7.0, 7.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0], [1.0, 1.0, 0.0, 0.0]])
    gamma, lam = 0.9, 0.8
    advantages, returns = ppo_loss.gae(rewards, values, mask, gamma, lam)
    # Row 0: three real tokens; whatever sits beyond them (reward 5, value 9) must not leak in.
    d2 = 1.0 - 0.3
    d1 = 0.0 + gamma * 0.3 - 0.2
    d0 = 0.0 + gamma * 0.2 - 0.1
    a2, a1 = d2, d1 + gamma * lam * d2
    a0 = d0 + gamma * lam * a1
    assert advantages[0].tolist() == pytest.approx([a0, a1, a2, 0.0])
    b1 = 2.0 - 0.5
    b0 = 0.5 + gamma * 0.5 - 1.0 + gamma * lam * b1
    assert advantages[1].tolist() == pytest.approx([b0, b1, 0.0, 0.0])
    assert returns[0].tolist() == pytest.approx([a0 + 0.1, a1 + 0.2, a2 + 0.3, 0.0])


def test_shaped_rewards_put_the_score_on_the_last_real_token_and_the_kl_on_every_one():
    kl = torch.tensor([[0.5, 0.5, 0.5], [1.0, 2.0, 3.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
    rewards = ppo_loss.shaped_rewards(torch.tensor([2.0, -1.0]), kl, mask, kl_coef=0.1)
    assert rewards.tolist() == [pytest.approx([-0.05, 1.95, 0.0]), pytest.approx([-0.1, -0.2, -1.3])]


def test_whitening_ignores_masked_entries_and_can_keep_the_mean():
    values = torch.tensor([[1.0, 2.0, 3.0, 100.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    white = ppo_loss.masked_whiten(values, mask)
    assert white.tolist()[0] == pytest.approx([-1.0, 0.0, 1.0, 0.0], abs=1e-4)
    kept = ppo_loss.masked_whiten(values, mask, shift_mean=False)
    assert kept.tolist()[0] == pytest.approx([1.0, 2.0, 3.0, 0.0], abs=1e-4)


def test_policy_clip_takes_the_pessimistic_term():
    old = torch.zeros(1, 4)
    new = torch.log(torch.tensor([[1.5, 0.5, 1.1, 1.5]]))
    advantages = torch.tensor([[1.0, -1.0, 1.0, -1.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    stats = ppo_loss.policy_loss(new, old, advantages, mask, cliprange=0.2)
    # 1.5 with A=1 -> clipped to 1.2; 0.5 with A=-1 -> clipped to 0.8 (the larger loss); 1.1 unclipped.
    assert float(stats.loss) == pytest.approx((-1.2 + 0.8 - 1.1) / 3)
    assert stats.clip_fraction == pytest.approx(2 / 3)


def test_value_clip_keeps_new_values_near_the_rollouts():
    old = torch.tensor([[0.0, 0.0]])
    new = torch.tensor([[1.0, 0.1]])
    returns = torch.tensor([[1.0, 1.0]])
    stats = ppo_loss.value_loss(new, old, returns, torch.ones(1, 2), cliprange_value=0.2)
    # Token 0: clipped to 0.2, error 0.64 > 0 unclipped; token 1: both inside, error 0.81.
    assert float(stats.loss) == pytest.approx(0.5 * (0.64 + 0.81) / 2)
    assert stats.clip_fraction == pytest.approx(0.5)
    # Returns 1, 2 (variance 0.5), values 1, 1.5: residuals 0, 0.5 (variance 0.125) -> 1 - 0.25.
    assert ppo_loss.explained_variance(torch.tensor([[1.0, 1.5]]), torch.tensor([[1.0, 2.0]]),
                                       torch.ones(1, 2)) == pytest.approx(0.75)


def test_adaptive_kl_moves_towards_its_target_and_a_fixed_one_stays():
    adaptive = ppo_loss.KLController(0.1, target=1.0, horizon=100)
    adaptive.update(current_kl=5.0, num_rollouts=10)  # far above target: error capped at +0.2
    assert adaptive.value == pytest.approx(0.1 * 1.02)
    adaptive.update(current_kl=0.5, num_rollouts=10)
    assert adaptive.value == pytest.approx(0.1 * 1.02 * 0.98)  # below target: capped at -0.2
    fixed = ppo_loss.KLController(0.1)
    fixed.update(current_kl=5.0, num_rollouts=10)
    assert fixed.value == 0.1
    k3 = ppo_loss.token_kl(torch.tensor([0.0, 1.0]), torch.tensor([0.0, 0.0]), "k3")
    assert k3.tolist() == pytest.approx([0.0, float(torch.exp(torch.tensor(-1.0))) + 1 - 1])


# ---------------------------------------------------------------------------------------------------
# Spec and data


def test_ppo_reads_prompt_only_rows_and_grpo_still_needs_answers(tmp_path: Path):
    rows = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "Hi"}, {"messages": [{"role": "user", "content": "Yo"}]}])
    data = load_training_data(DataSpec(source=str(rows)), "ppo")
    assert data.train["prompt"] == [[{"role": "user", "content": "Hi"}], [{"role": "user", "content": "Yo"}]]
    with pytest.raises(DatasetError, match="answer"):
        load_training_data(DataSpec(source=str(rows)), "grpo")
    ended = write_jsonl(tmp_path / "e.jsonl", [{"messages": [{"role": "user", "content": "a"},
                                                             {"role": "assistant", "content": "b"}]}])
    with pytest.raises(DatasetError, match="assistant turn"):
        load_training_data(DataSpec(source=str(ended)), "ppo")


def test_ppo_spec_errors_name_the_key():
    with pytest.raises(ConfigError, match=r"method\.reward_model"):
        spec_from_dict({"method": "ppo", "training": {"max_steps": 2}})
    with pytest.raises(ConfigError, match=r"training\.max_steps"):
        spec_from_dict({"method": {"name": "ppo", "reward_model": "x"}})
    with pytest.raises(ConfigError, match=r"did you mean 'method\.cliprange_value'"):
        spec_from_dict({"method": {"name": "ppo", "reward_model": "x", "cliprange_values": 0.1},
                        "training": {"max_steps": 2}})


def test_a_missing_reward_model_fails_before_training_and_names_the_key(tmp_path: Path, prompts_file: Path):
    spec = spec_from_dict({"method": {"name": "ppo", "reward_model": str(tmp_path / "nowhere")},
                           "data": {"source": str(prompts_file)}, "training": {"max_steps": 2},
                           "tracking": {"report_to": []}})
    result = run_worker(spec, tmp_path / "run", log_to_file=False)
    assert result.state == "failed" and result.input_error
    assert "method.reward_model" in result.error and "nowhere" in result.error


def test_a_pause_checkpoints_the_step_it_stops_at(tmp_path: Path, reward_dir: Path, prompts_file: Path):
    job = JobDir(tmp_path / "run")
    worker = start_worker(ppo_spec(reward_dir, prompts_file, max_steps=200), job.root)
    try:
        def two_steps() -> bool:
            assert worker.poll() is None, f"the worker exited with {worker.returncode}: {job.read_status()}"
            return (job.read_status().step if job.read_status() else 0) >= 2

        wait_for(two_steps, timeout=600, what="two PPO steps")
        worker.send_signal(signal.SIGUSR1)
        assert worker.wait(300) == 75  # EX_TEMPFAIL: paused, continue later
    finally:
        kill_process(worker)
    status = job.read_status()
    assert status.state == "paused" and 2 <= status.step < 200
    assert job.latest_checkpoint() == job.checkpoints_dir / f"checkpoint-{status.step}"
    assert (job.latest_checkpoint() / "critic" / "adapter_config.json").is_file()
