"""Jobs whose spec says distributed.launcher=kfp, through a real server: each runs its Kubeflow pipeline
(prepare-data -> train -> export) with kfp.local, and reads like any other job."""

from __future__ import annotations

import contextlib
import re
from pathlib import Path

import psutil
import pytest
from service_harness import ServerProcess, module_server, train_spec
from waiting import wait_for

KFP = {"launcher": "kfp"}


@pytest.fixture(scope="module")
def server(request, tmp_path_factory):
    yield from module_server(request, tmp_path_factory, "--slots", "1", "--cancel-grace", "60")


def job_dir_of(server: ServerProcess, job_id: str) -> Path:
    return (server.data_dir / "jobs" / job_id).resolve()


def pipeline_processes(job_dir: Path) -> list[psutil.Process]:
    """Live processes of a job's pipeline: the driver (its --job-dir) and the steps kfp.local started."""
    found = []
    for process in psutil.process_iter():
        with contextlib.suppress(psutil.Error):
            cmdline = process.cmdline()
            if process.status() == psutil.STATUS_ZOMBIE:
                continue
            if ("--job-dir" in cmdline and Path(cmdline[cmdline.index("--job-dir") + 1]) == job_dir) or \
                    (any("kfp.dsl.executor_main" in part for part in cmdline) and str(job_dir) in " ".join(cmdline)):
                found.append(process)
    return found


def test_a_kfp_job_runs_the_pipeline_and_reads_like_any_job(server: ServerProcess):
    with server.client() as client:
        job = client.submit({**train_spec(), "distributed": KFP})
        job = client.wait(job.id, timeout=600)
        job_dir = job_dir_of(server, job.id)
        assert job.state == "succeeded", job.error or (job_dir / "worker.log").read_text()[-3000:]
        assert (job.step, job.total_steps) == (4, 4)
        assert client.artifacts(job.id).checkpoints == ["checkpoint-2", "checkpoint-4"]
        assert [r["step"] for r in client.metrics(job.id) if "loss" in r] == [1, 2, 3, 4]
        log = re.sub(r"\x1b\[[0-9;]*m", "", (job_dir / "worker.log").read_text())  # kfp.local colours its lines
        for step in ("prepare-data", "train", "export"):
            assert f"Task '{step}' finished with status SUCCESS" in log, step
        assert next((job_dir / "kfp" / "outputs").rglob("export/model/adapter_config.json"))
        assert not pipeline_processes(job_dir)


def test_cancelling_a_kfp_job_stops_its_steps_and_records_cancelled(server: ServerProcess):
    with server.client() as client:
        job = client.submit({**train_spec(max_steps=5000, save_steps=10_000), "distributed": KFP})
        wait_for(lambda: client.get_job(job.id).step >= 1, 600, "the train step to run")
        job_dir = job_dir_of(server, job.id)
        assert any("kfp.dsl.executor_main" in " ".join(p.cmdline()) for p in pipeline_processes(job_dir))
        client.cancel(job.id)
        cancelled = client.wait(job.id, timeout=300)
        assert cancelled.state == "cancelled"
        assert "SIGTERM received: stopping after the current step" in (job_dir / "worker.log").read_text()
        wait_for(lambda: not pipeline_processes(job_dir), 30, "every pipeline process to end")
