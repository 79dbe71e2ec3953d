"""The whole online RL loop, end to end, through `posttrain rl run`: atroposlib's real run-api, our inference
server, the GSM8k-format math environment (atroposlib BaseEnv, talking to the server as server_type=vllm) and
the online GRPO trainer, on the tiny model, in each weight bridge mode.

While a run goes on, a probe scores a fixed text on the server again and again, each time between two reads
of which policy the server holds (its model id and weights version): the scores must change whenever the
policy does, so every sync is seen to really serve new weights. Afterwards no process the run started may
be left, and its ports must be free. The synthetic task's reward must rise with the documented command.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import psutil
import pytest
import yaml
from inference_harness import free_port
from waiting import kill_process, wait_for

from posttrain.job.directory import JobDir
from posttrain.modeling import resolve_model_path
from posttrain.ports import port_in_use

ROOT = Path(__file__).resolve().parents[2]
LOOP_KEY = "loop-test-key"
PROBE_TEXT = "Elena buys 4 bags with 5 coins in each bag. How many coins does Elena buy? #### 20"


def loop_config(tmp_path: Path, mode: str, steps: int) -> tuple[Path, dict]:
    api_port, inference_port = free_port(), free_port()
    lora = mode == "lora_only"
    config = {
        "name": f"loop-{mode}",
        "model": "posttrain:tiny",
        "run_dir": str(tmp_path / "run"),
        "api": {"port": api_port},
        "inference": {"port": inference_port},
        "progress_interval": 1,
        "environments": [{"name": "gsm8k", "env": {
            "group_size": 4, "max_completion_tokens": 16, "max_token_length": 512, "max_batches_offpolicy": 1}}],
        "trainer": {
            "method": {"name": "online_grpo", "weight_bridge_mode": mode},
            "peft": {"type": "lora", "r": 8, "alpha": 16} if lora else {"type": "none"},
            "training": {"max_steps": steps, "per_device_train_batch_size": 8, "learning_rate": 1e-2 if lora else 1e-3,
                         "lr_scheduler_type": "constant", "max_seq_length": 512},
            "tracking": {"report_to": []},
        },
    }
    path = tmp_path / "loop.yaml"
    path.write_text(yaml.safe_dump(config))
    return path, config


class PolicyProbe(threading.Thread):
    """Scores PROBE_TEXT on the server (prompt logprobs, greedy) between two reads of the served policy's
    identity; keeps the scores whose identity did not change meanwhile. Also collects every process the run
    has started, to check afterwards that none is left."""

    def __init__(self, url: str, prompt: list[int], run_pid: int, job: JobDir, by_trainer_step: bool) -> None:
        super().__init__(daemon=True)
        self.url, self.prompt, self.run_pid, self.job = url, prompt, run_pid, job
        self.by_trainer_step = by_trainer_step
        self.samples: list[tuple[tuple, tuple[float, ...]]] = []
        self.seen_pids: set[int] = set()
        self.stopped = threading.Event()

    def identity(self, client: httpx.Client) -> tuple:
        if self.by_trainer_step:
            # shared_vllm: the server cannot tell (the trainer writes its memory); the trainer's recorded step
            # is a lower bound of the weights' step.
            status = self.job.read_status()
            return ("trainer step", status.step if status else 0)
        model = client.get(f"{self.url}/v1/models").json()["data"][0]["id"]
        return model, client.get(f"{self.url}/weights/info").json()["version"]

    def score(self, client: httpx.Client) -> tuple[float, ...]:
        body = {"prompt": {"prompt_token_ids": self.prompt}, "max_tokens": 1, "temperature": 0,
                "prompt_logprobs": 0}
        return flat_logprobs(client.post(f"{self.url}/generate", json=body).json()["prompt_logprobs"])

    def run(self) -> None:
        # rl run's server requires the run's key (here the one the test gave it) on everything but /health.
        with httpx.Client(timeout=30, headers={"Authorization": f"Bearer {LOOP_KEY}"}) as client:
            while not self.stopped.is_set():
                self.collect_pids()
                try:
                    before = self.identity(client)
                    scores = self.score(client)
                    if self.identity(client) == before:
                        self.samples.append((before, scores))
                except (httpx.HTTPError, KeyError, ValueError):
                    pass  # not up yet, restarting (mode none), or gone
                time.sleep(0.05)

    def collect_pids(self) -> None:
        with contextlib.suppress(psutil.Error):
            self.seen_pids.update(p.pid for p in psutil.Process(self.run_pid).children(recursive=True))

    def policies(self) -> list[tuple[tuple, tuple[float, ...]]]:
        """(identity, scores) of each policy seen, in the order they were served."""
        seen: list[tuple[tuple, tuple[float, ...]]] = []
        for identity, scores in self.samples:
            if not seen or seen[-1][0] != identity:
                seen.append((identity, scores))
        return seen


def flat_logprobs(entries: list) -> tuple[float, ...]:
    return tuple(float(value) for entry in entries if entry for value in entry.values())


def local_scores(model_dir: Path | str, prompt: list[int]) -> tuple[float, ...]:
    """The probe's scores computed here, from the trainer's final weights, with the server's own code."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from posttrain.inference.generation import SamplingParams, generate_batch

    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    params = SamplingParams(max_tokens=1, temperature=0, prompt_logprobs=0)
    return flat_logprobs(generate_batch(model, tokenizer, [prompt], [params])[0].prompt_logprobs)


def differ(a: tuple[float, ...], b: tuple[float, ...]) -> bool:
    return len(a) != len(b) or max(abs(x - y) for x, y in zip(a, b, strict=True)) > 1e-6


def probe_prompt() -> list[int]:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(resolve_model_path("posttrain:tiny"))(PROBE_TEXT).input_ids


def start_run(config_path: Path, *overrides: str, log: Path) -> subprocess.Popen:
    with open(log, "wb") as out:
        return subprocess.Popen([sys.executable, "-m", "posttrain.cli", "rl", "run", str(config_path), *overrides],
                                stdout=out, stderr=subprocess.STDOUT, cwd=ROOT,
                                env={**os.environ, "OMP_NUM_THREADS": "1", "POSTTRAIN_INFERENCE_API_KEY": LOOP_KEY})


def alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def assert_nothing_left(probe: PolicyProbe, config: dict) -> None:
    assert len(probe.seen_pids) >= 4  # api, inference, trainer, environment at least
    assert [pid for pid in probe.seen_pids if alive(pid)] == []
    ports = [config["api"]["port"], config["inference"]["port"]]
    assert [port for port in ports if port_in_use("127.0.0.1", port)] == []


@pytest.mark.parametrize(("mode", "steps", "interrupt"), [
    ("none", 2, False),          # the trainer restarts its own server on each step's checkpoint
    ("lora_only", 40, True),     # adapters hot-loaded; Ctrl-C after 3 steps stops everything
    ("shared_vllm", 3, False),   # one copy of the weights, updated in place
])
def test_the_loop_serves_new_weights_after_every_sync_and_leaves_nothing_behind(tmp_path, mode, steps, interrupt):
    config_path, config = loop_config(tmp_path, mode, steps)
    run = start_run(config_path, log=tmp_path / "run.out")
    job = JobDir(tmp_path / "run" / "trainer")
    prompt = probe_prompt()
    probe = PolicyProbe(f"http://127.0.0.1:{config['inference']['port']}", prompt, run.pid, job,
                        by_trainer_step=mode == "shared_vllm")
    probe.start()
    try:
        if interrupt:
            wait_for(lambda: run.poll() is not None or len(job.read_metrics()) >= 3, timeout=600,
                     what="three training steps")
            run.send_signal(signal.SIGINT)  # what Ctrl-C in the terminal sends
        code = run.wait(600)
    finally:
        probe.stopped.set()
        probe.join(30)
        kill_process(run)
    output = (tmp_path / "run.out").read_text()
    if interrupt:
        assert code == 130, output
        assert "rl run interrupted: stopped by SIGINT" in output
    else:
        assert code == 0, output
        assert "rl run completed: trainer finished" in output
        assert job.read_status().state == "succeeded"
    metrics = job.read_metrics()
    assert len(metrics) >= (3 if interrupt else steps)
    assert all(record["reward_mean"] is not None for record in metrics)

    policies = probe.policies()
    assert len(policies) >= 2, f"the probe saw no sync: {[p[0] for p in policies]}\n{output}"
    if mode == "shared_vllm":
        # A sample labelled with the trainer's recorded step may already show the next step's weights (the
        # optimizer writes the server's memory before the step is recorded), so neighbours may agree. What
        # must hold: the server served the base model first, new outputs while training, and after the last
        # step exactly the weights the trainer saved as final/.
        scores = [score for _, score in probe.samples]
        assert not differ(scores[0], local_scores(resolve_model_path("posttrain:tiny"), prompt))
        assert sum(differ(a, b) for a, b in itertools.pairwise(scores)) >= 1
        assert policies[-1][0] == ("trainer step", steps), [p[0] for p in policies]
        final = local_scores(job.final_dir, prompt)
        assert max(abs(a - b) for a, b in zip(policies[-1][1], final, strict=True)) < 1e-4
    else:
        for (before, old), (after, new) in itertools.pairwise(policies):
            assert differ(old, new), f"the server's outputs did not change from {before} to {after}"
    if mode == "none":
        # Restarts on the checkpoint of each step: the served model is that checkpoint.
        assert policies[-1][0][0].endswith(f"step-{steps}"), [p[0] for p in policies]
    assert_nothing_left(probe, config)


def test_the_synthetic_task_reward_rises_with_the_documented_command(tmp_path):
    """`posttrain rl run examples/rl-digits-tiny.yaml`, only moved to free ports and a temporary directory."""
    api_port, inference_port = free_port(), free_port()
    run = start_run(ROOT / "examples" / "rl-digits-tiny.yaml", f"api.port={api_port}",
                    f"inference.port={inference_port}", f"run_dir={tmp_path / 'run'}", log=tmp_path / "run.out")
    try:
        code = run.wait(900)
    finally:
        kill_process(run)
    output = (tmp_path / "run.out").read_text()
    assert code == 0, output
    rewards = [record["reward_mean"] for record in JobDir(tmp_path / "run" / "trainer").read_metrics()]
    assert len(rewards) == 40
    first, last = sum(rewards[:5]) / 5, sum(rewards[-5:]) / 5
    assert last > first + 0.1, f"reward did not rise: {rewards}"
    assert "reward_mean" in output and "->" in output  # the run's summary line
