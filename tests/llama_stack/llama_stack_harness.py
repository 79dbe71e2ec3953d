"""Helpers of the Llama Stack tests: a real `llama stack run` (Llama Stack 0.6.1, its own Python 3.12
environment built by `make llama-stack-venv`) on a free loopback port, driven by the official client."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import psutil
from clock_step import ClockStep
from waiting import kill_process, stop_process, wait_for

from posttrain.llama_stack.run_config import run_yaml

REPO = Path(__file__).resolve().parents[2]
VENV = REPO / ".venv-llama-stack"
LS_PYTHON = VENV / "bin" / "python"
CLIENT_SCRIPT = Path(__file__).with_name("ls_client.py")
STARTUP_TIMEOUT_S = 120
JOBS = "/v1alpha/post-training/jobs"


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class LlamaStackServer:
    """`llama stack run` with a run.yaml from `posttrain llama-stack config`; workers run under this
    test's interpreter (the posttrain venv), the server under Llama Stack's own."""

    def __init__(self, data_dir: Path, provider: str, *, url: str | None = None, api_key: str | None = None,
                 providers_d: bool = False, clock_step: bool = False) -> None:
        self.data_dir = data_dir
        self.provider = provider
        # clock_step.stepped() makes the server see the wall clock stepped (only with clock_step=True).
        self.clock_step = ClockStep(data_dir.parent / f"{data_dir.name}-clock-step")
        self.env = {**os.environ, **(self.clock_step.environment() if clock_step else {})}
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = data_dir / "llama-stack-server.log"
        self.run_yaml = data_dir / "run.yaml"
        data_dir.mkdir(parents=True, exist_ok=True)
        options: dict[str, Any] = {"port": self.port, "worker_python": sys.executable, "providers_d": providers_d}
        if url is not None:
            options.update(url=url, api_key=api_key)
        self.run_yaml.write_text(run_yaml(provider, data_dir, **options))  # type: ignore[arg-type]
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> LlamaStackServer:
        templates_before = self.templates_ready()
        log = open(self.log_path, "ab")  # noqa: SIM115 - handed to the child
        # --port: 0.6.1 ignores server.port without it.
        self.process = subprocess.Popen([str(VENV / "bin" / "llama"), "stack", "run", str(self.run_yaml),
                                         "--port", str(self.port)], cwd=self.data_dir, stdout=log,
                                        stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=self.env)
        log.close()
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"llama stack run exited with {self.process.returncode}:\n{self.log()}")
            try:
                if httpx.get(f"{self.url}/v1/health", timeout=2).status_code == 200:
                    if self.provider == "inline":  # jobs start warm once the template has imported torch
                        wait_for(lambda: self.templates_ready() > templates_before, STARTUP_TIMEOUT_S,
                                 "the inline provider's warm template")
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        self.kill()
        raise RuntimeError(f"llama stack run not healthy in {STARTUP_TIMEOUT_S}s:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def templates_ready(self) -> int:
        """How many warm templates of the inline provider have finished importing (its log is appended)."""
        path = self.data_dir / "posttrain" / "warm-template.log"
        return path.read_text(errors="replace").count("imports took") if path.exists() else 0

    def warm_template_pid(self) -> int:
        """The inline provider's warm template: the process of `llama stack run` that forks the workers."""
        for process in psutil.Process(self.process.pid).children(recursive=True):
            if "posttrain.launchers.zygote" in process.cmdline():
                return process.pid
        raise AssertionError("the inline provider runs no warm template")

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None and \
            httpx.get(f"{self.url}/v1/health", timeout=5).status_code == 200

    def stop(self) -> None:
        stop_process(self.process, 30)

    def kill(self) -> None:
        kill_process(self.process)

    # -- the official client (run under Llama Stack's Python) ----------------------------------------
    def call(self, action: str, **kwargs: Any) -> Any:
        done = subprocess.run([str(LS_PYTHON), str(CLIENT_SCRIPT), self.url, action, json.dumps(kwargs)],
                              capture_output=True, text=True, timeout=180)
        if done.returncode != 0:
            raise RuntimeError(f"ls_client {action} failed:\n{done.stderr}")
        return json.loads(done.stdout.strip().splitlines()[-1])

    # -- the routes llama-stack-client 0.6.1 calls on stale paths: plain HTTP -------------------------
    def get(self, path: str) -> httpx.Response:
        return httpx.get(f"{self.url}{path}", timeout=60)

    def status(self, job_uuid: str) -> dict[str, Any]:
        response = self.get(f"{JOBS}/{job_uuid}/status")
        assert response.status_code == 200, response.text
        return response.json()

    def artifacts(self, job_uuid: str) -> dict[str, Any]:
        response = self.get(f"{JOBS}/{job_uuid}/artifacts")
        assert response.status_code == 200, response.text
        return response.json()

    def cancel(self, job_uuid: str) -> httpx.Response:
        return httpx.post(f"{self.url}{JOBS}/{job_uuid}/cancel", timeout=60)

    def wait_finished(self, job_uuid: str, timeout: float = 300) -> dict[str, Any]:
        return wait_for(lambda: (status := self.status(job_uuid))["status"] in ("completed", "failed", "cancelled")
                        and status, timeout, f"job {job_uuid} to finish")


def messages_rows(count: int = 12) -> list[dict[str, Any]]:
    """Llama Stack's `post-training/messages` rows."""
    return [{"messages": [{"role": "user", "content": f"What is {i} plus {i}?"},
                          {"role": "assistant", "content": f"{i} plus {i} is {2 * i}."}]} for i in range(count)]


def preference_rows(count: int = 8) -> list[dict[str, Any]]:
    return [{"prompt": f"Say the number {i}.", "chosen": f"{i}", "rejected": f"I will not say {i}."}
            for i in range(count)]


def training_config(dataset_id: str, steps: int = 3, **data: Any) -> dict[str, Any]:
    """A TrainingConfig of a few steps on the tiny model (fp32: CPU)."""
    return {"n_epochs": 1, "max_steps_per_epoch": steps, "gradient_accumulation_steps": 1, "dtype": "fp32",
            "data_config": {"dataset_id": dataset_id, "batch_size": 2, "shuffle": True, "data_format": "dialog",
                            **data},
            "optimizer_config": {"optimizer_type": "adamw", "lr": 1e-3, "weight_decay": 0.0, "num_warmup_steps": 0}}


LORA = {"type": "LoRA", "lora_attn_modules": ["q_proj", "v_proj", "output_proj"], "apply_lora_to_mlp": True,
        "apply_lora_to_output": False, "rank": 4, "alpha": 8}


def sft_request(job_uuid: str, dataset_id: str, steps: int = 3, **data: Any) -> dict[str, Any]:
    return {"job_uuid": job_uuid, "model": "posttrain:tiny", "training_config": training_config(dataset_id, steps, **data),
            "algorithm_config": LORA, "hyperparam_search_config": {}, "logger_config": {}}
