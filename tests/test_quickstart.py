"""`posttrain quickstart`: ReaLHF's quickstart command lines, run as their users type them."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from posttrain.errors import ConfigError, UnsupportedError
from posttrain.quickstart import KEYS, keys_for, keys_table, translate
from posttrain.spec import spec_from_dict

ROOT = Path(__file__).resolve().parents[1]

# The seed's sft command line (docs/quickstart.md), with its model and data pointed at what ships here and
# pipeline_parallel_size 1 (pipeline parallelism is refused; see test_the_seed_s_pipeline_stages_are_refused).
SEED_SFT = [
    "experiment_name=my-cool-experiment", "trial_name=dp-pp-20231207",
    "model.type=llama",
    "model.path=posttrain:tiny",
    "model.parallel.pipeline_parallel_size=1",
    "model.parallel.data_parallel_size=1",
    "model.gradient_checkpointing=False",
    "save_freq=10",
    "eval_freq=1",
    "optimizer.lr=2e-5",
    "dataset.max_seqlen=256",
    "dataset.train_tokens_per_batch=2048",
    "dataset.valid_tokens_per_batch=2048",
    "dataset.train_path=posttrain:alpaca",
    "dataset.valid_path=posttrain:alpaca",
]


def quickstart(*args: str, cwd: Path, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "posttrain.cli", "quickstart", *args], cwd=cwd,
                          capture_output=True, text=True, timeout=600,
                          env={**os.environ, "COLUMNS": "200", "OMP_NUM_THREADS": "1"})
    if check:
        assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc


def finished_run(job_dir: Path, steps: int) -> list[dict]:
    status = json.loads((job_dir / "status.json").read_text())
    assert status["state"] == "succeeded" and status["step"] == steps, status
    assert (job_dir / "final" / "config.json").exists()  # a full model: ReaLHF trains every weight
    return [json.loads(line) for line in (job_dir / "metrics.jsonl").read_text().splitlines()]


def test_the_seed_s_sft_command_runs_to_completion(tmp_path):
    proc = quickstart("sft", *SEED_SFT, "--set", "training.max_steps=3", cwd=tmp_path)
    assert "ignored model.type=llama" in proc.stderr
    records = finished_run(tmp_path / "runs" / "my-cool-experiment" / "dp-pp-20231207", 3)
    train = [r for r in records if "loss" in r]
    assert train and all(r["tokens_per_batch"] == 2048 for r in train)
    assert any("eval_loss" in r for r in records)  # eval_freq=1 with a valid_path evaluates


@pytest.mark.parametrize("experiment, role", [("rw", "model"), ("dpo", "actor")])
def test_rw_and_dpo_run_to_completion(tmp_path, experiment, role):
    quickstart(experiment, "experiment_name=pairs", f"trial_name={experiment}", f"{role}.path=posttrain:tiny",
               "dataset.train_path=posttrain:preference", "dataset.max_seqlen=128",
               "dataset.train_tokens_per_batch=1024", "optimizer.lr=1e-4", "--output-root", "out",
               "--set", "training.max_steps=2", cwd=tmp_path)
    spec = json.loads((tmp_path / "out" / "pairs" / experiment / "spec.json").read_text())
    assert spec["method"]["name"] == {"rw": "reward", "dpo": "dpo"}[experiment]
    assert spec["training"]["per_device_train_batch_size"] == 4  # 1024 tokens / (2 x 128) per pair
    finished_run(tmp_path / "out" / "pairs" / experiment, 2)


def test_dry_run_prints_a_job_spec_that_posttrain_train_accepts(tmp_path):
    keys = [key.replace("data_parallel_size=1", "data_parallel_size=2") for key in SEED_SFT]
    proc = quickstart("sft", *keys, "n_gpus_per_node=2", "mode=local", "--dry-run", cwd=tmp_path)
    assert not (tmp_path / "runs").exists()
    data = yaml.safe_load(proc.stdout)
    assert "# ignored: model.type=llama" in proc.stdout and "# ignored: mode=local" in proc.stdout
    spec = spec_from_dict(data)
    assert spec.method.name == "sft" and spec.model.name_or_path == "posttrain:tiny"
    assert spec.training.tokens_per_batch == 1024  # ReaLHF's global 2048 over 2 data-parallel ranks
    assert spec.training.learning_rate == 2e-5 and spec.training.max_seq_length == 256
    assert (spec.training.save_steps, spec.training.eval_steps) == (10, 1)
    assert spec.training.gradient_checkpointing is False
    assert spec.data.validation.source == "posttrain:alpaca"
    assert (spec.distributed.launcher, spec.distributed.nproc_per_node) == ("torchrun", 2)
    assert spec.distributed.data_parallel_size == 2
    assert spec.output.dir == str(Path("runs") / "my-cool-experiment" / "dp-pp-20231207")


def test_the_seed_s_pipeline_stages_are_refused(tmp_path):
    keys = [k for k in SEED_SFT if "pipeline_parallel_size" not in k] + ["model.parallel.pipeline_parallel_size=4"]
    proc = quickstart("sft", *keys, "--dry-run", cwd=tmp_path, check=False)
    assert proc.returncode == 2
    assert "pipeline parallelism is not supported" in proc.stderr


def test_unknown_key_names_the_closest_one(tmp_path):
    proc = quickstart("sft", *SEED_SFT, "model.paht=x", "--dry-run", cwd=tmp_path, check=False)
    assert proc.returncode == 2
    assert "unknown key 'model.paht' for quickstart sft; did you mean 'model.path'?" in proc.stderr


# A ReaLHF ppo command line: actor, critic, reference and reward model, PPO hyper-parameters, prompt data.
SEED_PPO = [
    "experiment_name=e", "trial_name=t", "actor.type=llama", "actor.path=posttrain:tiny", "critic.type=llama",
    "critic.path=runs/rw/final", "ref.path=posttrain:tiny", "rew.type=llama", "rew.path=runs/rw/final",
    "ppo.max_new_tokens=32", "ppo.temperature=0.9", "ppo.ppo_n_minibatches=2", "ppo.kl_ctl=0.1",
    "ppo.discount=0.99", "ppo.gae_lambda=0.9", "ppo.eps_clip=0.15", "ppo.value_eps_clip=0.3",
    "ppo.max_reward_clipping=5", "ppo.adv_norm=false", "ppo.top_p=1.0", "ppo.greedy=false",
    "dataset.max_prompt_len=64", "dataset.train_bs_n_seqs=8", "optimizer.lr=1e-5", "critic_optimizer.lr=5e-6",
    "dataset.train_path=posttrain:preference",
]


def test_ppo_keys_become_method_ppo():
    plan = translate("ppo", SEED_PPO, overrides=["training.max_steps=3"])
    method = plan.spec.method
    assert method.name == "ppo" and plan.spec.model.name_or_path == "posttrain:tiny"
    assert (method.reward_model, method.critic_model) == ("runs/rw/final", "runs/rw/final")
    assert (method.response_length, method.temperature, method.num_mini_batches, method.kl_coef) == (32, 0.9, 2, 0.1)
    assert (method.gamma, method.lam, method.cliprange, method.cliprange_value) == (0.99, 0.9, 0.15, 0.3)
    assert (method.reward_clip, method.whiten_advantages, method.max_prompt_length) == (5, False, 64)
    assert (method.critic_learning_rate, plan.spec.training.learning_rate) == (5e-6, 1e-5)
    assert plan.spec.training.per_device_train_batch_size == 4  # 8 prompts per step / 2 mini-batches
    assert plan.spec.data.source == "posttrain:preference" and plan.spec.peft.type == "none"
    for note in ("actor.type=llama", "critic.type=llama", "rew.type=llama", "ref.path=posttrain:tiny",
                 "ppo.top_p=1.0", "ppo.greedy=False"):
        assert any(ignored.startswith(note) for ignored in plan.ignored), note


@pytest.mark.parametrize("keys, error, message", [
    (["ppo.eps_clp=0.1"], ConfigError, "unknown key 'ppo.eps_clp' for quickstart ppo; did you mean 'ppo.eps_clip'?"),
    (["critic.parallel.data_parallel_size=2"], ConfigError, "unknown key 'critic.parallel.data_parallel_size'"),
    (["ref.path=posttrain:smollm2"], UnsupportedError, "PPO's reference model is the actor's starting model"),
    (["ppo.top_p=0.9"], UnsupportedError, "ppo.top_p=0.9: not supported"),
    (["ppo.top_k=50"], UnsupportedError, "top-k sampling is not supported"),
    (["ppo.use_adaptive_kl_ctl=true"], ConfigError, "needs the controller's target KL: --set method.kl_target"),
    (["dataset.train_bs_n_seqs=7", "ppo.ppo_n_minibatches=2"], ConfigError, "7 prompts per step do not split evenly"),
    (["n_gpus_per_node=2"], UnsupportedError, "quickstart ppo: PPO runs in a single process only"),
    (["n_nodes=2"], UnsupportedError, "quickstart ppo: PPO runs in a single process only"),
    (["actor.parallel.data_parallel_size=2"], UnsupportedError, "PPO runs in a single process only"),
])
def test_bad_ppo_keys_get_clear_errors(keys, error, message):
    with pytest.raises(error, match=re.escape(message)):
        translate("ppo", ["experiment_name=e", "trial_name=t", "rew.path=posttrain:tiny", *keys],
                  overrides=["training.max_steps=2"])
    with pytest.raises(ConfigError, match=r"rew\.path is required"):
        translate("ppo", ["experiment_name=e", "trial_name=t"])


def test_quickstart_ppo_runs_a_short_ppo_job(tmp_path):
    # posttrain:tiny as the reward model is a random score head: this checks the translated job runs,
    # not that it learns (tests/test_pipeline.py trains a real reward model first).
    proc = quickstart("ppo", "experiment_name=e", "trial_name=t", "actor.path=posttrain:tiny",
                      "rew.path=posttrain:tiny", "ppo.max_new_tokens=8", "dataset.train_bs_n_seqs=2",
                      "--set", "training.max_steps=2", "--set", "peft.type=lora", cwd=tmp_path)
    job_dir = tmp_path / "runs" / "e" / "t"
    status = json.loads((job_dir / "status.json").read_text())
    assert status["state"] == "succeeded" and status["step"] == 2, proc.stderr
    records = [json.loads(line) for line in (job_dir / "metrics.jsonl").read_text().splitlines()]
    assert {"reward", "kl", "policy_loss", "value_loss"} <= set(records[-1])


@pytest.mark.parametrize("keys, error, message", [
    (["mode=slurm"], UnsupportedError, "mode=slurm: posttrain does not submit to slurm"),
    (["allocation_mode=search"], UnsupportedError, "no allocation search"),
    (["allocation_mode=pipe_data", "n_nodes=2", "n_gpus_per_node=8"], UnsupportedError, "pipelines across nodes"),
    (["model.parallel.use_sequence_parallel=true"], UnsupportedError, "use_sequence_parallel=true is not supported"),
    (["dataset.max_seqlen=0"], ConfigError, "dataset.max_seqlen=0: expected a positive whole number"),
    (["dataset.path=a", "dataset.train_path=b"], ConfigError, "'dataset.train_path' is given twice (as dataset.path"),
    (["trial_name=../up"], ConfigError, "names a folder"),
    (["actor.path=x"], ConfigError, "unknown key 'actor.path' for quickstart sft; did you mean 'model.path'"),
    (["optimizer.lr=fast"], ConfigError, "quickstart sft: training.learning_rate"),
])
def test_bad_keys_get_clear_errors(keys, error, message):
    given = dict(key.split("=", 1) for key in ["experiment_name=e", "trial_name=t", *keys])  # later keys win
    with pytest.raises(error, match=re.escape(message)):
        translate("sft", [f"{key}={value}" for key, value in given.items()])


def test_names_are_required():
    with pytest.raises(ConfigError, match="experiment_name is required"):
        translate("sft", ["trial_name=t"])


def test_allocation_modes_and_dpo_reference():
    plan = translate("dpo", ["experiment_name=e", "trial_name=t", "actor.path=posttrain:tiny",
                             "ref.path=posttrain:smollm2", "beta=0.2", "allocation_mode=pipe_data",
                             "n_gpus_per_node=4", "dataset.train_tokens_per_batch=8192", "dataset.max_seqlen=512"])
    spec = plan.spec
    assert spec.method.reference_model == "posttrain:smollm2" and spec.method.beta == 0.2
    assert spec.distributed.data_parallel_size == 4 and spec.distributed.nproc_per_node == 4
    assert spec.training.per_device_train_batch_size == 2  # 8192 / 4 ranks / (2 x 512)
    model = translate("rw", ["experiment_name=e", "trial_name=t", "allocation_mode=pipe_model", "n_gpus_per_node=2",
                             "recover_mode=resume", "wandb_mode=disabled"])
    assert model.spec.distributed.tensor_parallel_size == 2 and model.resume
    assert model.spec.method.name == "reward" and model.spec.tracking.report_to == []


MULTI_PROCESS_KEYS = ("n_nodes", "n_gpus_per_node", "data_parallel_size", "model_parallel_size")


def test_every_key_is_translated_or_reported():
    # Each accepted key, given alone, either changes the JobSpec or is reported as ignored.
    values = {"experiment_name": "e", "trial_name": "t", "seed": 3, "total_train_epochs": 2, "save_freq": 5,
              "eval_freq": 5, "type": "llama", "path": "posttrain:smollm2", "gradient_checkpointing": True,
              "enable_bf16": True, "enable_fp16": True, "data_parallel_size": 2, "model_parallel_size": 2,
              "pipeline_parallel_size": 1, "use_sequence_parallel": False, "optimizer.type": "adam",
              "optimizer.lr": 0.5, "optimizer.weight_decay": 0.5, "optimizer.lr_scheduler_type": "cosine",
              "optimizer.warmup_steps_proportion": 0.5, "dataset.train_path": "x.jsonl", "dataset.path": "x.jsonl",
              "dataset.valid_path": "v.jsonl", "dataset.max_seqlen": 64, "dataset.train_tokens_per_batch": 4096,
              "dataset.valid_tokens_per_batch": 4096, "beta": 0.3, "n_nodes": 2, "n_gpus_per_node": 2,
              "allocation_mode": "manual", "mode": "local", "wandb_mode": "online", "recover_mode": "auto",
              "recover_retries": 2, "debug": False, "partition": "dev", "image_name": "img",
              "allocation_use_cache": True}
    values.update({"ppo.max_new_tokens": 32, "ppo.temperature": 0.5, "ppo.ppo_n_minibatches": 2, "ppo.kl_ctl": 0.3,
                   "ppo.discount": 0.9, "ppo.gae_lambda": 0.9, "ppo.eps_clip": 0.1, "ppo.value_eps_clip": 0.1,
                   "ppo.max_reward_clipping": 3, "ppo.adv_norm": False, "ppo.greedy": False, "ppo.top_p": 1.0,
                   "ppo.top_k": 0, "ppo.min_new_tokens": 0, "ppo.value_norm": False,
                   "ppo.reward_output_scaling": 1.0, "ppo.reward_output_bias": 0, "ppo.use_adaptive_kl_ctl": False,
                   "critic_optimizer.lr": 1e-5, "dataset.max_prompt_len": 64, "dataset.train_bs_n_seqs": 4})
    required = {"ppo": ["rew.path=posttrain:tiny"]}  # ppo needs a reward model and a step count
    overrides = {"ppo": ["training.max_steps=1"]}
    for experiment in ("sft", "rw", "dpo", "ppo"):
        given = ["experiment_name=e", "trial_name=t", *required.get(experiment, [])]
        base = translate(experiment, given, overrides=overrides.get(experiment)).spec.model_dump(exclude_unset=True)
        for key in keys_for(experiment):
            if key in ("experiment_name", "trial_name") or any(g.startswith(f"{key}=") for g in given):
                continue
            value = values.get(key, values.get(key.rsplit(".", 1)[-1]))
            if experiment == "ppo" and key == "ref.path":
                value = "posttrain:tiny"  # the actor's own path: anything else is refused
            pair = f"{key}={json.dumps(value)}"
            if experiment == "ppo" and value == 2 and key.rsplit(".", 1)[-1] in MULTI_PROCESS_KEYS:
                with pytest.raises(UnsupportedError, match="single process only"):  # PPO is one process for now
                    translate(experiment, [*given, pair], overrides=overrides.get(experiment))
                continue
            plan = translate(experiment, [*given, pair], overrides=overrides.get(experiment))
            changed = plan.spec.model_dump(exclude_unset=True) != base or plan.resume
            assert changed or any(note.startswith(f"{key}=") for note in plan.ignored), (experiment, key)


def test_docs_table_is_generated_from_the_keys():
    docs = (ROOT / "docs" / "quickstart.md").read_text()
    assert keys_table() in docs, "docs/quickstart.md is stale: paste posttrain.quickstart.keys_table()"
    assert len(KEYS) == keys_table().count("\n") - 1


def test_quickstart_ppo_dry_run_prints_the_jobspec_it_runs():
    from typer.testing import CliRunner

    from posttrain.cli import app

    result = CliRunner().invoke(app, ["quickstart", "ppo", *SEED_PPO, "--set", "training.max_steps=3", "--dry-run"])
    assert result.exit_code == 0, result.output
    printed = yaml.safe_load(result.stdout)
    assert printed["method"] == {"name": "ppo", "reward_model": "runs/rw/final", "critic_model": "runs/rw/final",
                                 "response_length": 32, "temperature": 0.9, "num_mini_batches": 2, "kl_coef": 0.1,
                                 "gamma": 0.99, "lam": 0.9, "cliprange": 0.15, "cliprange_value": 0.3,
                                 "reward_clip": 5, "whiten_advantages": False, "max_prompt_length": 64,
                                 "critic_learning_rate": 5e-6}
    assert "# ignored: ref.path=posttrain:tiny" in result.stdout
    assert spec_from_dict(printed).method.name == "ppo"  # what it prints is a config posttrain train runs
