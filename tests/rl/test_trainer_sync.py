"""The trainer pushing its weights to a real inference server (`posttrain rl serve-inference`) through each
weight bridge, with rollouts POSTed to a real run-api by the test (no environment: see test_loop.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
from inference_harness import greedy, local_greedy, start_server
from ports import port_is_free
from trainer_harness import finish, good_and_bad_group, start_trainer, trainer_log
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


def test_a_resumed_shared_run_puts_its_checkpoint_back_into_the_served_weights(tmp_path: Path,
                                                                               tiny_model_dir: Path):
    job_dir = tmp_path / "run"
    job = JobDir(job_dir)
    args = ("--weight-bridge-mode", "shared_vllm", "--training-steps", "3", "--lr", "1e-2",
            "--checkpoint-interval", "2")
    base, tokenizer = load_for_inference(tiny_model_dir)
    base_greedy = local_greedy(base, tokenizer, PROBE)
    server = start_server("posttrain:tiny", tmp_path, "--shared-weights")
    try:
        with TrajectoryAPI(tmp_path / "api1.log") as api:
            trainer = start_trainer(job_dir, api.url, *args, "--vllm-port", server.url.rsplit(":", 1)[1], sync=True)
            api.wait_for_trainer()
            for _ in range(2):
                api.post_group(good_and_bad_group())
            wait_for(lambda: job.latest_checkpoint() is not None, timeout=300, what="checkpoint-2")
            kill_process(trainer)
    finally:
        server.stop()
    # The server went down too: a new one serves the untrained model from a fresh shared buffer.
    server = start_server("posttrain:tiny", tmp_path, "--shared-weights")
    try:
        assert greedy(server.url, PROBE) == base_greedy
        with TrajectoryAPI(tmp_path / "api2.log") as api:
            trainer = start_trainer(job_dir, api.url, *args, "--vllm-port", server.url.rsplit(":", 1)[1], "--resume",
                                    sync=True)
            api.wait_for_trainer()  # registering comes after the resumed weights were pushed
            checkpoint, tokenizer = load_for_inference(job.checkpoints_dir / "checkpoint-2" / "model")
            served = greedy(server.url, PROBE)
            assert served == local_greedy(checkpoint, tokenizer, PROBE) != base_greedy
            api.post_group(good_and_bad_group())
            assert finish(trainer, job_dir) == 0, trainer_log(job_dir)
    finally:
        server.stop()
    assert [m["step"] for m in job.read_metrics()] == [1, 2, 3]
