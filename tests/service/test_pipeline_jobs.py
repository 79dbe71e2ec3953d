"""A pipeline through the job service: one job whose worker runs the stages, each in its own job directory
inside the job's. A real server on loopback, real workers training the tiny model."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from service_harness import ServerProcess, module_server, worker_processes
from typer.testing import CliRunner
from waiting import wait_for

from posttrain.client import TERMINAL, ServiceError
from posttrain.commands.jobs import jobs_app
from posttrain.job.directory import JobDir
from posttrain.pipeline import plan_pipeline
from posttrain.service.scheduler import spec_environment

ROOT = Path(__file__).resolve().parents[2]
FEW = {"max_steps": 2, "save_steps": 2, "per_device_train_batch_size": 2, "num_threads": 1, "logging_steps": 1}


def pipeline(second_stage_steps: int = 2) -> dict:
    """sft (full fine-tune) -> reward model trained on sft's output."""
    return {
        "defaults": {"training": FEW, "data": {"max_samples": 32}, "tracking": {"report_to": []}},
        "stages": [
            {"name": "sft", "peft": {"type": "none"}},
            {"name": "reward", "method": "reward", "model": {"name_or_path": "${stages.sft.final}"},
             "data": {"source": "posttrain:concise"},
             "training": {"max_steps": second_stage_steps, "save_steps": 10_000}},
        ],
    }


@pytest.fixture(scope="module")
def server(request, tmp_path_factory):
    yield from module_server(request, tmp_path_factory, "--slots", "1", "--cancel-grace", "30")


def test_a_pipeline_is_one_job_whose_status_shows_its_stages(server: ServerProcess, monkeypatch):
    with server.client() as client:
        job = client.submit(pipeline())
        assert job.method == "pipeline" and job.model == "posttrain:tiny"
        done = client.wait(job.id, timeout=300)
        assert done.state == "succeeded", (done.error, client.logs(job.id))
        root = server.data_dir / "jobs" / job.id
        assert [(s.name, s.method, s.state, s.step) for s in done.stages] == [
            ("sft", "sft", "succeeded", 2), ("reward", "reward", "succeeded", 2)]
        assert [s.dir for s in done.stages] == [str(root / "sft"), str(root / "reward")]
        assert (done.step, done.total_steps) == (4, 4)
        # The reward stage started from the sft stage's final/ inside the job's directory.
        reward_spec = JobDir(root / "reward").read_spec_dict()
        assert reward_spec["model"]["name_or_path"] == str(root / "sft" / "final")
        artifacts = {artifact.path for artifact in client.artifacts(job.id).artifacts}
        assert {"sft/final/model.safetensors", "reward/final/adapter_config.json"} <= artifacts
        metrics = [record for record in client.metrics(job.id) if "loss" in record]
        assert [(record["stage"], record["stage_step"], record["step"]) for record in metrics] == [
            ("sft", 1, 1), ("sft", 2, 2), ("reward", 1, 3), ("reward", 2, 4)]

    monkeypatch.setenv("POSTTRAIN_SERVER", server.url)
    shown = CliRunner().invoke(jobs_app, ["status", job.id])
    assert shown.exit_code == 0, shown.output
    assert re.search(r"sft +sft +succeeded +step 2/2", shown.output)
    assert re.search(r"reward +reward +succeeded +step 2/2", shown.output)


def test_a_bad_stage_is_refused_at_submission_with_its_name(server: ServerProcess):
    bad = pipeline()
    bad["stages"][1]["model"]["name_or_path"] = "${stages.sf.final}"
    with server.client() as client, pytest.raises(ServiceError) as caught:
        client.submit(bad)
    assert caught.value.status_code == 422
    assert "stages.reward: ${stages.sf.final} names no stage 'sf'; did you mean 'sft'?" in str(caught.value)
    with server.client() as client, pytest.raises(ServiceError) as caught:
        client.submit(pipeline(), overrides=["stages.reward.data.source=/no/such/file.jsonl"])
    assert caught.value.status_code == 422 and "stages.reward:" in str(caught.value)


def test_pause_resume_and_cancel_act_on_the_running_stage(server: ServerProcess):
    with server.client() as client:
        job = client.submit(pipeline(second_stage_steps=400))
        root = server.data_dir / "jobs" / job.id
        wait_for(lambda: (info := client.get_job(job.id)).stage == "reward" and info.stages[1].step >= 2, 240,
                 "the reward stage to train")
        sft_final = (root / "sft" / "final" / "model.safetensors").stat().st_mtime_ns
        client.pause(job.id)
        paused = client.wait(job.id, timeout=120, states={"paused", *TERMINAL})
        assert paused.state == "paused", paused.error
        assert [s.state for s in paused.stages] == ["succeeded", "paused"]
        paused_at = paused.stages[1].step
        assert JobDir(root / "reward").latest_checkpoint().name == f"checkpoint-{paused_at}"

        # Resumed: sft is not run again; reward continues from its checkpoint.
        client.resume(job.id)
        wait_for(lambda: (info := client.get_job(job.id)).state == "running" and info.stage == "reward"
                 and info.stages[1].step > paused_at, 240, "the reward stage to continue")
        assert (root / "sft" / "final" / "model.safetensors").stat().st_mtime_ns == sft_final
        steps = [r["stage_step"] for r in client.metrics(job.id, limit=10_000) if r.get("stage") == "reward"
                 and "loss" in r]
        assert steps == list(range(1, len(steps) + 1))  # no step lost or repeated over the pause

        client.cancel(job.id)
        cancelled = client.wait(job.id, timeout=120)
        assert cancelled.state == "cancelled"
        assert [s.state for s in cancelled.stages] == ["succeeded", "cancelled"]
        wait_for(lambda: not worker_processes(server.data_dir), 30, "the worker to exit")


def test_a_pipeline_worker_gets_the_tracker_settings_any_stage_asks_for(monkeypatch):
    monkeypatch.setenv("WANDB_PROJECT", "rlhf")
    plan = plan_pipeline({"name": "p", "stages": [{"name": "a"}, {"name": "b", "tracking": {"report_to": ["wandb"]}}]})
    assert spec_environment(plan.plan_json())["WANDB_PROJECT"] == "rlhf"
    assert "WANDB_PROJECT" not in spec_environment(plan_pipeline({"name": "p", "stages": [{"name": "a"}]}).plan_json())


def test_the_rlhf_example_runs_through_the_service(server: ServerProcess):
    text = (ROOT / "examples" / "tiny-rlhf.yaml").read_text()
    short = ["stages.sft.training.max_steps=2", "stages.reward.training.max_steps=2", "stages.ppo.training.max_steps=2",
             "stages.ppo.training.save_steps=2", "stages.ppo.method.response_length=8", "training.num_threads=1"]
    with server.client() as client:
        job = client.submit(yaml=text, overrides=short)
        done = client.wait(job.id, timeout=600)
        assert done.state == "succeeded", (done.error, client.logs(job.id))
        assert [(s.name, s.method, s.state) for s in done.stages] == [
            ("sft", "sft", "succeeded"), ("reward", "reward", "succeeded"), ("ppo", "ppo", "succeeded")]
        ppo = [record for record in client.metrics(job.id) if record["stage"] == "ppo"]
        assert ppo and {"reward", "kl"} <= set(ppo[-1])
