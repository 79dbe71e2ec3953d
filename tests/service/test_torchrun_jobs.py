"""Jobs whose spec says distributed.launcher=torchrun, through a real server: real torchrun, two CPU ranks.

torch starts every rank in a session of its own, so these tests look for every process of a job's tree
(torchrun and its ranks), not just a process group, when they check that nothing is left running.
"""

from __future__ import annotations

import contextlib
import json
import sys
from pathlib import Path

import psutil
import pytest
from service_harness import ServerProcess, module_server, train_spec
from waiting import wait_for

from posttrain.client import TERMINAL
from posttrain.job.directory import JobDir
from posttrain.launchers import LaunchRequest
from posttrain.launchers.local import LocalLauncher
from posttrain.launchers.routing import LauncherUnavailable, RoutingLauncher

TWO_RANKS = {"launcher": "torchrun", "nproc_per_node": 2}
LONG = {"max_steps": 400, "save_steps": 10_000}


@pytest.fixture(scope="module")
def server(request, tmp_path_factory):
    yield from module_server(request, tmp_path_factory, "--slots", "1", "--cancel-grace", "30")


def torchrun_spec(strategy: str = "ddp", **training: object) -> dict:
    return {**train_spec(**training), "distributed": {**TWO_RANKS, "strategy": strategy}}


def job_processes(job_dir: Path) -> list[psutil.Process]:
    """Live processes whose command line names ``job_dir``: torchrun and each of its ranks."""
    found = []
    for process in psutil.process_iter():
        with contextlib.suppress(psutil.Error):
            cmdline = process.cmdline()
            if "--job-dir" in cmdline and Path(cmdline[cmdline.index("--job-dir") + 1]) == job_dir \
                    and process.status() != psutil.STATUS_ZOMBIE:
                found.append(process)
    return found


def job_dir_of(server: ServerProcess, job_id: str) -> Path:
    return (server.data_dir / "jobs" / job_id).resolve()


def test_a_torchrun_job_trains_on_two_ranks_and_exports_a_plain_model(server: ServerProcess):
    with server.client() as client:
        job = client.submit(torchrun_spec("fsdp"))
        job = client.wait(job.id, timeout=300)
        assert job.state == "succeeded", job.error
        assert (job.step, job.total_steps) == (4, 4)
        job_dir = job_dir_of(server, job.id)
        assert "fsdp: full_shard over mesh (2,)" in (job_dir / "worker.log").read_text()
        assert (job_dir / "worker.rank1.log").is_file()
        assert client.artifacts(job.id).checkpoints == ["checkpoint-2", "checkpoint-4"]
        assert (job_dir / "final" / "adapter_config.json").is_file()
        assert not job_processes(job_dir)


def test_pausing_a_torchrun_job_stops_every_rank_at_one_step_and_resume_continues(server: ServerProcess):
    with server.client() as client:
        job = client.submit(torchrun_spec(**LONG))
        wait_for(lambda: client.get_job(job.id).step >= 3, 300, "the job to train")
        client.pause(job.id)
        paused = client.wait(job.id, timeout=300, states={"paused", *TERMINAL})
        assert paused.state == "paused", paused.error
        job_dir = JobDir(job_dir_of(server, job.id))
        # Both ranks stopped after the same step and saved one complete sharded checkpoint of it.
        assert [path.name for path in job_dir.checkpoints()] == [f"checkpoint-{paused.step}"]
        assert not job_processes(job_dir.root)

        client.resume(job.id)
        wait_for(lambda: client.get_job(job.id).step > paused.step, 300, "the resumed job to train")
        client.cancel(job.id)  # (the rest of the 400 steps would only cost time)
        assert client.wait(job.id, timeout=300).state == "cancelled"
        steps = [record["step"] for record in client.metrics(job.id) if "loss" in record]
        assert steps == list(range(1, len(steps) + 1)) and len(steps) > paused.step


def test_cancel_after_a_server_restart_leaves_no_rank_alive(start_server):
    server = start_server("--slots", "1", "--cancel-grace", "30")
    with server.client() as client:
        job = client.submit(torchrun_spec(**LONG))
        wait_for(lambda: client.get_job(job.id).step >= 2, 300, "the job to train")
    job_dir = job_dir_of(server, job.id)
    processes = job_processes(job_dir)
    assert len(processes) == 3  # torchrun and two ranks, each rank in a session of its own
    assert len({process.pid for process in processes} - {process.ppid() for process in processes}) == 2

    server.kill()  # the job runs on; the next server re-adopts it through the torchrun launcher
    server = start_server("--slots", "1", "--cancel-grace", "30", data_dir=server.data_dir)
    with server.client() as client:
        assert client.get_job(job.id).state == "running"
        client.cancel(job.id)
        assert client.wait(job.id, timeout=300).state == "cancelled"
    wait_for(lambda: not any(process.is_running() and process.status() != psutil.STATUS_ZOMBIE
                             for process in processes), 60, "every rank to exit")


def test_a_launcher_this_server_lacks_fails_the_job_with_a_clear_error(tmp_path):
    # A server registers every launcher name (kfp too), so the router is built here without one; the
    # scheduler fails a job whose launch raises this OSError with its message.
    job_dir = JobDir(tmp_path / "job").create()
    job_dir.write_spec(json.dumps({**train_spec(), "distributed": {"launcher": "kfp"}}))
    router = RoutingLauncher({"local": LocalLauncher([sys.executable, "-m", "posttrain.worker"])})
    with pytest.raises(LauncherUnavailable, match=r"distributed\.launcher=kfp is not available on this server"):
        router.launch(LaunchRequest("job-1", job_dir.root))
    assert router.adopt(job_dir.root, None) is None
