"""`posttrain pipeline`: stages planned and validated up front, run one by one through the worker path."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from waiting import wait_for

from posttrain.errors import ConfigError
from posttrain.job.directory import JobDir
from posttrain.pipeline import load_pipeline, plan_pipeline

ROOT = Path(__file__).resolve().parents[1]
POSTTRAIN = [sys.executable, "-m", "posttrain.cli"]
FEW_STEPS = {"max_steps": 2, "per_device_train_batch_size": 2, "logging_steps": 1, "save_steps": 2,
             "learning_rate": 1e-3}


def sft_reward_dpo(data_source: str = "posttrain:preference") -> dict:
    """sft (full fine-tune) -> reward on its output -> dpo on its output, with the reward model's
    pipeline ref in a place every method accepts (the dpo reference model)."""
    return {
        "name": "chain",
        "defaults": {"model": {"name_or_path": "posttrain:tiny"}, "training": FEW_STEPS,
                     "tracking": {"report_to": "none"}},
        "stages": [
            {"name": "sft", "method": "sft", "peft": {"type": "none"}, "data": {"source": "posttrain:alpaca"}},
            {"name": "reward", "method": "reward", "model": {"name_or_path": "${stages.sft.final}"},
             "data": {"source": "posttrain:concise"}},
            {"name": "dpo", "model": {"name_or_path": "${stages.sft.final}"},
             "method": {"name": "dpo", "reference_model": "${stages.sft.final}"},
             "data": {"source": data_source}},
        ],
    }


def two_stages(**second) -> dict:
    return {"name": "p", "stages": [{"name": "sft"}, {"name": "dpo", "method": "dpo", **second}]}


# -- validation, before anything runs ---------------------------------------------------------------


@pytest.mark.parametrize(("document", "message"), [
    ({"name": "p", "stage": []}, "unknown pipeline key 'stage'; did you mean 'stages'?"),
    ({"name": "p", "stages": []}, "non-empty list of stages"),
    ({"name": "p", "stages": [{"method": "sft"}]}, "stages[0].name: each stage needs a name"),
    ({"name": "p", "stages": [{"name": "a.b"}]}, "stages[0].name"),
    ({"name": "p", "stages": [{"name": "final"}]}, "'final' is a name the pipeline's own folder uses"),
    ({"name": "p", "stages": [{"name": "a"}, {"name": "a"}]}, "two stages are named 'a'"),
    ({"name": "p", "stages": [{"name": "sft", "training": {"max_step": 3}}]},
     "stages.sft: unknown key 'training.max_step'; did you mean 'training.max_steps'?"),
    (two_stages(model={"name_or_path": "${stages.sf.final}"}), "names no stage 'sf'; did you mean 'sft'?"),
    (two_stages(model={"name_or_path": "${stages.sft.weights}"}), "a stage has no 'weights'"),
    (two_stages(model={"name_or_path": "${sft.final}"}), "is not a stage reference"),
    (two_stages(model={"name_or_path": "${stages.dpo.final}"}), "stages.dpo: refers to its own output"),
    ({"name": "p", "stages": [{"name": "a", "model": {"name_or_path": "${stages.b.final}"}}, {"name": "b"}]},
     "stages.a: uses the output of stage 'b', which runs after it"),
    ({"name": "p", "stages": [{"name": "a", "model": {"name_or_path": "${stages.b.final}"}},
                              {"name": "b", "model": {"name_or_path": "${stages.a.final}"}}]},
     "uses the output of a cycle (a -> b -> a)"),
    (two_stages(output={"dir": "elsewhere"}), "stages.dpo.output.dir: the pipeline puts each stage in"),
    ({"name": "p", "stages": [{"name": "a", "output": {"save_final": False}},
                              {"name": "b", "model": {"name_or_path": "${stages.a.final}"}}]},
     "stages.b: uses ${stages.a.final}, but stage 'a' does not save one (output.save_final: false)"),
    (two_stages(distributed={"launcher": "torchrun", "nproc_per_node": 4}),
     "stages.dpo.distributed.launcher: torchrun is not supported in a pipeline"),
    ({"name": "p", "defaults": {"distributed": {"launcher": "kfp"}}, "stages": [{"name": "sft"}]},
     "stages.sft.distributed.launcher: kfp is not supported in a pipeline"),
])
def test_bad_pipelines_are_refused_with_the_stage_and_key(document, message):
    with pytest.raises(ConfigError) as caught:
        plan_pipeline(document)
    assert message in caught.value.message


def test_overrides_address_one_stage_or_every_stage():
    with pytest.raises(ConfigError, match="no stage named 'dp'; did you mean 'dpo'"):
        plan_pipeline(two_stages(), ["stages.dp.training.max_steps=3"])
    plan = plan_pipeline(two_stages(), ["stages.dpo.training.max_steps=3", "training.learning_rate=0.01",
                                        "defaults.training.seed=7", "name=renamed"])
    sft, dpo = plan.stages
    assert (sft.spec.training.max_steps, dpo.spec.training.max_steps) == (-1, 3)
    assert sft.spec.training.learning_rate == dpo.spec.training.learning_rate == 0.01
    assert sft.spec.training.seed == dpo.spec.training.seed == 7
    assert plan.name == "renamed" and plan.root == Path("runs/renamed").resolve()


def test_references_resolve_to_earlier_stages_job_dirs(tmp_path):
    plan = plan_pipeline(sft_reward_dpo(), root=tmp_path / "chain")
    sft, reward, dpo = plan.stages
    assert [s.name for s in plan.stages] == ["sft", "reward", "dpo"]
    assert sft.spec.output.dir == str(tmp_path / "chain" / "sft")
    assert reward.spec.model.name_or_path == str(tmp_path / "chain" / "sft" / "final")
    assert dpo.spec.method.reference_model == str(tmp_path / "chain" / "sft" / "final")
    assert (reward.needs, dpo.needs) == (["sft"], ["sft"])
    # defaults are merged under each stage; a stage's own keys win
    assert reward.spec.training.max_steps == 2 and sft.spec.peft.type == "none" and reward.spec.peft.type == "lora"
    assert reward.spec.name == "chain-reward"


def test_the_shipped_example_plans(tmp_path):
    plan = load_pipeline(ROOT / "examples" / "tiny-rlhf.yaml", root=tmp_path / "rlhf")
    assert [stage.spec.method.name for stage in plan.stages][:2] == ["sft", "reward"]
    assert plan.stages[1].spec.model.name_or_path == str(tmp_path / "rlhf" / "sft" / "final")


def test_a_bad_file_names_itself(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump({"stages": [{"name": "x", "methd": "sft"}]}))
    with pytest.raises(ConfigError, match=r"p.yaml: stages.x: unknown key 'methd'; did you mean 'method'"):
        load_pipeline(path)


# -- running: one command, every stage through the worker -------------------------------------------


def posttrain(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([*POSTTRAIN, *args], cwd=cwd, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "COLUMNS": "200", "OMP_NUM_THREADS": "1"})


def test_sft_reward_dpo_runs_from_one_command_and_a_rerun_skips_what_succeeded(tmp_path):
    (tmp_path / "chain.yaml").write_text(yaml.safe_dump(sft_reward_dpo("missing.jsonl")))
    # The dpo stage's data is missing: sft and reward run, dpo fails and names itself.
    first = posttrain("pipeline", "chain.yaml", cwd=tmp_path)
    root = tmp_path / "runs" / "chain"
    assert first.returncode == 2, first.stderr
    assert "stage dpo" in first.stderr and "missing.jsonl" in first.stderr
    status = json.loads((root / "status.json").read_text())
    assert status["state"] == "failed" and status["stage"] == "dpo"
    assert [s["state"] for s in status["stages"]] == ["succeeded", "succeeded", "failed"]
    sft_final = (root / "sft" / "final" / "model.safetensors").stat().st_mtime_ns
    # The reward stage trained on top of sft's final/ (a full model), as its spec says.
    assert json.loads((root / "reward" / "spec.json").read_text())["model"]["name_or_path"] == str(root / "sft" / "final")
    assert (root / "reward" / "final" / "adapter_config.json").exists()

    # Fixed with an override, the rerun skips sft and reward and runs dpo.
    second = posttrain("pipeline", "chain.yaml", "stages.dpo.data.source=posttrain:preference", cwd=tmp_path)
    assert second.returncode == 0, second.stderr
    assert second.stderr.count("skipped (done)") == 2
    assert (root / "sft" / "final" / "model.safetensors").stat().st_mtime_ns == sft_final
    status = json.loads((root / "status.json").read_text())
    assert status["state"] == "succeeded" and all(s["state"] == "succeeded" for s in status["stages"])
    assert (root / "dpo" / "final" / "adapter_config.json").exists()
    # The pipeline's metrics: every stage's records, tagged, their steps counted on over the stages.
    metrics = [json.loads(line) for line in (root / "metrics.jsonl").read_text().splitlines()]
    assert {record["stage"] for record in metrics} == {"sft", "reward", "dpo"}
    steps = [record["step"] for record in metrics if "loss" in record]
    assert steps == sorted(steps) and steps[-1] == 6 and status["step"] == 6 and status["total_steps"] == 6

    # A finished stage whose spec changed is not silently reused.
    third = posttrain("pipeline", "chain.yaml", "stages.sft.training.learning_rate=0.5", cwd=tmp_path)
    assert third.returncode == 2
    assert "stages.sft: already succeeded" in third.stderr and "training.learning_rate" in third.stderr


# The shipped example, cut to a few steps per stage; its reward stage long enough to be killed part-way.
SHORT_RLHF = ["stages.sft.training.max_steps=4", "stages.reward.training.max_steps=16",
              "stages.reward.training.save_steps=2", "stages.ppo.training.max_steps=2",
              "stages.ppo.training.save_steps=2", "stages.ppo.method.response_length=8"]


def test_the_rlhf_example_runs_sft_reward_ppo_and_resumes_a_killed_stage_from_another_directory(tmp_path,
                                                                                                 monkeypatch):
    """Started in one directory (into runs/tiny-rlhf there), resumed and re-read from another: the job
    directories stand on their own, every path their specs hold is absolute."""
    from posttrain.preflight import preflight
    from posttrain.spec import spec_from_dict

    command = ["pipeline", str(ROOT / "examples" / "tiny-rlhf.yaml"), *SHORT_RLHF]
    root = tmp_path / "runs" / "tiny-rlhf"
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    process = subprocess.Popen([*POSTTRAIN, *command], cwd=tmp_path, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL, env={**os.environ, "OMP_NUM_THREADS": "1"},
                               start_new_session=True)
    try:
        wait_for(lambda: JobDir(root / "reward").latest_checkpoint(), 300, "a checkpoint of the reward stage")
    finally:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    assert JobDir(root / "reward").read_status().step < 16

    command += ["--output", str(root)]
    refused = posttrain(*command, cwd=elsewhere)
    assert refused.returncode == 2 and "stages.reward:" in refused.stderr and "--resume" in refused.stderr
    resumed = posttrain(*command, "--resume", cwd=elsewhere)
    assert resumed.returncode == 0, resumed.stderr
    assert "skipped (done)" in resumed.stderr and "resuming from" in resumed.stderr
    status = json.loads((root / "status.json").read_text())
    assert [(s["name"], s["method"], s["state"], s["step"]) for s in status["stages"]] == [
        ("sft", "sft", "succeeded", 4), ("reward", "reward", "succeeded", 16), ("ppo", "ppo", "succeeded", 2)]
    reward_steps = [record["step"] for record in JobDir(root / "reward").read_metrics() if "loss" in record]
    assert reward_steps == list(range(1, 17))  # continued from the checkpoint: no step lost or counted twice

    ppo = JobDir(root / "ppo")
    spec = ppo.read_spec_dict()
    assert (spec["model"]["name_or_path"], spec["method"]["reward_model"], spec["output"]["dir"]) == (
        str(root / "sft" / "final"), str(root / "reward" / "final"), str(root / "ppo"))
    assert {"reward", "kl", "policy_loss", "value_loss"} <= set(ppo.read_metrics()[-1])
    assert (ppo.final_dir / "adapter_config.json").exists()

    # Every stage's spec.json, read from a third directory, names models and data that are there.
    monkeypatch.chdir(tmp_path / "runs")
    for stage in ("sft", "reward", "ppo"):
        preflight(spec_from_dict(JobDir(root / stage).read_spec_dict()))
    again = posttrain("train", str(ppo.spec_path), "--output", "ppo-again", "training.max_steps=1",
                      cwd=elsewhere)
    assert again.returncode == 0, again.stderr
    assert JobDir(elsewhere / "ppo-again").read_status().state == "succeeded"


def test_train_and_validate_point_a_pipeline_file_to_the_pipeline_command():
    from typer.testing import CliRunner

    from posttrain.cli import app

    for command in ("train", "validate"):
        result = CliRunner().invoke(app, [command, str(ROOT / "examples" / "tiny-rlhf.yaml")])
        assert result.exit_code == 2
        assert "is a pipeline (it has stages:); run it with: posttrain pipeline" in " ".join(result.output.split())


def test_a_pause_on_a_stage_s_last_step_pauses_before_the_next_stage(tmp_path, monkeypatch):
    # The worker's own pause handling is tested with real signals (tests/service/test_pipeline_jobs.py);
    # a pause landing exactly on a stage's last step cannot be timed, so run_worker reports one here.
    import posttrain.worker
    from posttrain.job.result import JobResult
    from posttrain.pipeline import run_pipeline

    ran = []

    def finished_with_a_pause(spec, job_dir, resume=False, log_to_file=True):
        ran.append(Path(job_dir).name)
        JobDir(job_dir).create().update_status(state="succeeded", step=1)
        return JobResult(state="succeeded", job_dir=Path(job_dir), pause_pending=True)

    monkeypatch.setattr(posttrain.worker, "run_worker", finished_with_a_pause)
    result = run_pipeline(plan_pipeline(two_stages(), root=tmp_path / "p"))
    assert (result.state, ran, result.exit_code) == ("paused", ["sft"], 75)
    assert json.loads((tmp_path / "p" / "status.json").read_text())["state"] == "paused"
