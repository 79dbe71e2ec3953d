"""A real Atropos trajectory API (atroposlib's `run-api`) on a free loopback port, for the trainer tests,
and the scored groups an environment would post to it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
from ports import free_port
from waiting import stop_process, wait_for


class TrajectoryAPI:
    """`run-api --host 127.0.0.1 --port P` as a subprocess; use as a context manager."""

    def __init__(self, log_path: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        self.process: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> TrajectoryAPI:
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "atroposlib.cli.run_api", "--host", "127.0.0.1", "--port", str(self.port)],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                env={**os.environ, "OMP_NUM_THREADS": "1"})
        wait_for(self._up, timeout=60, what=f"run-api on port {self.port}")
        return self

    def __exit__(self, *_: object) -> None:
        stop_process(self.process, 10)

    def _up(self) -> bool:
        assert self.process is not None
        if self.process.poll() is not None:
            raise AssertionError(f"run-api exited:\n{self.log_path.read_text()}")
        try:
            return httpx.get(f"{self.url}/info", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    def info(self) -> dict[str, Any]:
        return httpx.get(f"{self.url}/info", timeout=5).json()

    def status(self) -> dict[str, Any]:
        return httpx.get(f"{self.url}/status", timeout=5).json()

    def wait_for_trainer(self, timeout: float = 180) -> dict[str, Any]:
        """The registration the trainer made (POSTing scored data before it registers would keep the API
        from ever initialising its batch state)."""
        return wait_for(lambda: (info := self.info())["batch_size"] > 0 and info, timeout=timeout,
                        what="the trainer to register with run-api")

    def post_group(self, group: dict[str, Any]) -> None:
        response = httpx.post(f"{self.url}/scored_data", json=group, timeout=10)
        response.raise_for_status()
        assert response.json()["status"] == "received", response.text


def scored_group(prompt: list[int], completions: list[list[int]], scores: list[float],
                 logprobs: list[list[float]] | None = None, **extra: Any) -> dict[str, Any]:
    """A group as an environment posts it: prompt + completion tokens, the prompt masked out (-100)."""
    group: dict[str, Any] = {
        "tokens": [prompt + c for c in completions],
        "masks": [[-100] * len(prompt) + c for c in completions],
        "scores": scores,
        **extra,
    }
    if logprobs is not None:
        group["inference_logprobs"] = [[1.0] * len(prompt) + lp for lp in logprobs]
    return group
