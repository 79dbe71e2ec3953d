"""Helpers of the trainer tests: `posttrain rl train` as a subprocess, its log, and the scored groups the
tests post to the trajectory API in place of an environment."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch
from trajectory_api import scored_group
from waiting import kill_process, wait_for

PROMPT = [11, 12, 13, 14]
GOOD = [21, 22, 23]
BAD = [31, 32, 33]


def start_trainer(job_dir: Path, api_url: str, *args: str, sync: bool = False) -> subprocess.Popen:
    """`posttrain rl train` on the tiny model, as a user runs it (without weight sync unless ``sync``)."""
    log = open(job_dir.parent / f"{job_dir.name}-trainer.log", "ab")  # noqa: SIM115 - handed to the child
    command = [sys.executable, "-m", "posttrain.cli", "rl", "train", "--model-name", "posttrain:tiny",
               *([] if sync else ["--no-sync"]), "--api-url", api_url, "--save-path", str(job_dir),
               "--batch-size", "4", "--max-token-len", "64", *args,
               "method.poll_interval=0.1", "training.num_threads=1", "tracking.report_to=[]"]
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                               env={**os.environ, "OMP_NUM_THREADS": "1"})
    log.close()
    return process


def trainer_log(job_dir: Path) -> str:
    return (job_dir.parent / f"{job_dir.name}-trainer.log").read_text(errors="replace")


def wait_for_registration(job_dir: Path, after: int) -> None:
    """Until a trainer started when its log was ``after`` characters long has registered with the API."""
    wait_for(lambda: "registered with the trajectory API" in trainer_log(job_dir)[after:], timeout=300,
             what="the trainer to register")


def finish(process: subprocess.Popen, job_dir: Path, timeout: float = 300) -> int:
    try:
        return process.wait(timeout)
    except subprocess.TimeoutExpired:
        kill_process(process)
        raise AssertionError(f"trainer still running after {timeout}s:\n{trainer_log(job_dir)}") from None


def completion_logprobs(model_dir: Path, completion: list[int]) -> list[float]:
    """log p(token | prompt, earlier completion tokens) for each completion token."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    tokens = torch.tensor([PROMPT + completion])
    with torch.no_grad():
        logprobs = model(tokens[:, :-1]).logits[0].log_softmax(-1)
    positions = torch.arange(len(PROMPT) - 1, tokens.shape[1] - 1)
    return logprobs[positions, tokens[0, len(PROMPT):]].tolist()


def good_and_bad_group(logprobs: dict[str, list[float]] | None = None) -> dict:
    """Two samples of GOOD (score 1) and two of BAD (score 0), optionally with the sampler's log-probs."""
    sampled = None if logprobs is None else [logprobs["good"], logprobs["bad"]] * 2
    return scored_group(PROMPT, [GOOD, BAD, GOOD, BAD], [1.0, 0.0, 1.0, 0.0], sampled)
