"""The trainer pushing its weights to a real inference server (`posttrain rl serve-inference`) through each
weight bridge, with rollouts POSTed to a real run-api by the test (no environment: see test_loop.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
from inference_harness import get, greedy, local_greedy, start_server
from ports import port_is_free
from trainer_harness import finish, good_and_bad_group, start_trainer, trainer_log, wait_for_registration
from trajectory_api import TrajectoryAPI, free_port
from waiting import kill_process, wait_for

from posttrain.job.directory import JobDir
from posttrain.modeling import load_for_inference

PROBE = [11, 12, 13, 14, 15]


@pytest.mark.parametrize("mode, server_flags", [
    ("lora_only", ("--enable-lora", "--max-lora-rank", "8")),
    ("shared_vllm", ("--shared-weights",)),
])
def test_the_server_serves_the_weights_the_trainer_ended_with(tmp_path: Path, tiny_model_dir: Path, mode: str,
                                                               server_flags: tuple[str, ...]):
    server = start_server("posttrain:tiny", tmp_path, *server_flags)
    job_dir = tmp_path / "run"
    try:
        with TrajectoryAPI(tmp_path / "api.log") as api:
            port = server.url.rsplit(":", 1)[1]
            trainer = start_trainer(job_dir, api.url, "--weight-bridge-mode", mode, "--vllm-port", port,
                                    "--training-steps", "3", "--lr", "1e-2", "--lora-r", "8", "--lora-alpha", "16",
                                    "--checkpoint-interval", "0", sync=True)
            api.wait_for_trainer()
            for _ in range(3):
                api.post_group(good_and_bad_group())
            assert finish(trainer, job_dir) == 0, trainer_log(job_dir)
        metrics = JobDir(job_dir).read_metrics()
        assert [m["step"] for m in metrics] == [1, 2, 3]
        assert all(m["sync_seconds"] > 0 for m in metrics)
        served = greedy(server.url, PROBE)
        model, tokenizer = load_for_inference(JobDir(job_dir).final_dir)
        assert served == local_greedy(model, tokenizer, PROBE)
        base, tokenizer = load_for_inference(tiny_model_dir)
        assert served != local_greedy(base, tokenizer, PROBE)  # what it serves is not the untrained model
    finally:
        server.stop()


def test_none_mode_starts_restarts_and_stops_its_own_server(tmp_path: Path):
    port = free_port()
    job_dir = tmp_path / "run"
    with TrajectoryAPI(tmp_path / "api.log") as api:
        trainer = start_trainer(job_dir, api.url, "--weight-bridge-mode", "none", "--vllm-port", str(port),
                                "--vllm-restart-interval", "2", "--training-steps", "2", "--lr", "1e-2",
                                "--checkpoint-interval", "0", sync=True)
        api.wait_for_trainer()
        for _ in range(2):
            api.post_group(good_and_bad_group())
        assert finish(trainer, job_dir) == 0, trainer_log(job_dir)
    metrics = JobDir(job_dir).read_metrics()
    assert metrics[0]["sync_seconds"] == 0.0  # step 1: not a restart step
    assert metrics[1]["sync_seconds"] > 0  # step 2: saved and restarted the server on the new weights
    assert (job_dir / "sync" / "server-weights" / "step-2" / "config.json").is_file()
    assert port_is_free(port)  # the trainer stopped the server it started


@pytest.mark.parametrize("mode, server_flags", [
    ("lora_only", ("--enable-lora", "--max-lora-rank", "8")),
    ("shared_vllm", ("--shared-weights",)),
    ("broadcast", ()),
    ("none", None),  # the trainer starts and owns its server: the one it had goes down with it (parent_watch)
])
def test_a_killed_trainer_resumes_against_the_server_it_was_syncing_to(tmp_path: Path, mode: str,
                                                                         server_flags: tuple[str, ...] | None):
    """SIGKILL after checkpoint-2 and step 3's sync, then --resume against the same server, started once here:
    what the killed run left there (the adapter name step 3 loads again, the shared buffer it trained, its
    broadcast group) must not block the resumed run, which pushes checkpoint-2 at once and ends serving its
    final weights. In none mode the server is the trainer's own, so the resumed run starts one on the same port."""
    job_dir = tmp_path / "run"
    job = JobDir(job_dir)
    server = start_server("posttrain:tiny", tmp_path, *server_flags) if server_flags is not None else None
    port = server.url.rsplit(":", 1)[1] if server is not None else str(free_port())
    url = f"http://127.0.0.1:{port}"
    args = ("--weight-bridge-mode", mode, "--vllm-port", port, "--training-steps", "4", "--lr", "1e-2",
            "--lora-r", "8", "--lora-alpha", "16", "--checkpoint-interval", "2", "--vllm-restart-interval", "2")
    try:
        with TrajectoryAPI(tmp_path / "api.log") as api:
            trainer = start_trainer(job_dir, api.url, *args, sync=True)
            api.wait_for_trainer()
            for _ in range(3):
                api.post_group(good_and_bad_group())
            wait_for(lambda: (job.read_status().step if job.read_status() else 0) >= 3, timeout=300,
                     what="three synced steps")
            kill_process(trainer)  # waiting for step 4's batch: nothing gets to clean up
            assert [p.name for p in job.checkpoints()] == ["checkpoint-2"]
            left = greedy(url, PROBE) if server is not None else None  # the killed run's step 3

            seen = len(trainer_log(job_dir))
            trainer = start_trainer(job_dir, api.url, *args, "--resume", sync=True)
            wait_for_registration(job_dir, after=seen)  # registering comes after the resumed weights were pushed
            checkpoint, tokenizer = load_for_inference(job.checkpoints_dir / "checkpoint-2" / "model")
            resumed = local_greedy(checkpoint, tokenizer, PROBE)
            assert greedy(url, PROBE) == resumed != left
            for _ in range(2):
                api.post_group(good_and_bad_group())
            assert finish(trainer, job_dir) == 0, trainer_log(job_dir)
        status = job.read_status()
        assert (status.state, status.step) == ("succeeded", 4)
        assert [m["step"] for m in job.read_metrics()] == [1, 2, 3, 4]
        if server is None:
            return  # none mode: the trainer stopped its own server when it ended
        final, tokenizer = load_for_inference(job.final_dir)
        assert greedy(url, PROBE) == local_greedy(final, tokenizer, PROBE)
        if mode == "lora_only":
            # The killed run had loaded step 3's name: reloaded in place, said so, and unloaded at step 4.
            assert "adapter 'policy-step-3' was already loaded" in trainer_log(job_dir)[seen:]
            assert [m["id"] for m in get(f"{url}/v1/models").json()["data"]] == ["posttrain:tiny", "policy-step-4"]
    finally:
        if server is not None:
            server.stop()
