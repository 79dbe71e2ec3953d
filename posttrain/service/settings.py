"""Settings of one service instance (built by ``posttrain serve`` or by tests)."""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from posttrain.service.auth import Principal

DEFAULT_PORT = 8322
DEFAULT_DATA_DIR = "posttrain-data"
MiB = 1024 * 1024
INFERENCE_BACKENDS = ("posttrain", "vllm")


def default_worker_command() -> list[str]:
    return [sys.executable, "-m", "posttrain.worker"]


@dataclass
class ServiceSettings:
    data_dir: Path = field(default_factory=lambda: Path(DEFAULT_DATA_DIR))
    db_url: str | None = None  # default: SQLite file in data_dir
    slots: int = 1  # jobs running at once
    devices: list[str] | None = None  # CUDA_VISIBLE_DEVICES for each slot, when given
    api_keys: dict[str, Principal] = field(default_factory=dict)  # sha256 hex -> owner; empty = no auth
    max_body_bytes: int = 8 * MiB  # JSON/YAML request bodies
    max_upload_bytes: int = 1024 * MiB  # one dataset upload
    cancel_grace_s: float = 30.0  # SIGTERM -> SIGKILL
    max_retries: int = 2  # requeues of a job whose worker died (killed, server restart)
    poll_interval_s: float = 0.25  # scheduler tick
    worker_command: list[str] = field(default_factory=default_worker_command)
    # Fork workers from a template process that has imported the training stack (launchers/warm.py):
    # a job starts in well under a second instead of ~5. Only with the default worker command.
    warm_workers: bool = True
    # Server folders a spec may read data or models from. With API keys (a shared server) only these and
    # the uploads folder are readable, so a client cannot make the server read /etc; without keys (a
    # personal loopback server) any local path is allowed.
    allowed_paths: list[Path] = field(default_factory=list)
    # Whether a keyed server runs code that jobs bring along (model.trust_remote_code, 'module:function'
    # rewards). Off by default: any key holder could otherwise run code as the server's user. A server
    # without keys (one local user) always allows it.
    allow_user_code: bool = False
    # Host names (besides loopback ones) a server without keys answers; see hosts.py (DNS rebinding).
    allowed_hosts: list[str] = field(default_factory=list)
    # With API keys: hosts besides loopback a job may connect to (online_grpo's api_url and inference_host,
    # distributed.rdzv_endpoint), and how many ranks a torchrun job may fork (None: this machine's CPUs/GPUs).
    allowed_network_hosts: list[str] = field(default_factory=list)
    max_processes_per_job: int | None = None
    max_restarts_per_job: int = 3
    max_log_followers: int = 32  # log streams open at once; more get 429
    # The inference worker (OpenAI /v1/chat/completions, /v1/completions), beside the training slots: what
    # it may use (torch threads; a device such as cpu, cuda or cuda:1) and the memory its loaded weights may
    # take. A serving load never takes a training slot.
    inference_threads: int | None = None  # None: 1 on CPU
    inference_device: str = "auto"
    inference_memory_mb: int = 4096
    inference_dtype: str = "auto"  # auto: bfloat16 on GPUs and CPUs with native bf16 (AMX), else float32
    inference_max_batch_size: int = 64
    inference_startup_timeout_s: float = 180.0
    inference_command: list[str] | None = None  # instead of posttrain's worker (gets --port PORT appended)
    # What generates: posttrain's own engine in its inference worker, or `vllm serve --enable-lora` (one per
    # base model, on a GPU with vLLM installed; service/vllm_backend.py).
    inference_backend: str = "posttrain"
    max_metrics_records: int = 10_000  # largest page of GET /metrics

    def __post_init__(self) -> None:
        self.data_dir = Path(self.data_dir).resolve()
        self.allowed_paths = [Path(path).resolve() for path in self.allowed_paths]
        if self.max_processes_per_job is not None and self.max_processes_per_job < 1:
            raise ValueError("max_processes_per_job must be at least 1")
        if self.max_restarts_per_job < 0:
            raise ValueError("max_restarts_per_job must be 0 or more")
        if self.slots < 1:
            raise ValueError("slots must be at least 1")
        if self.inference_memory_mb < 1:
            raise ValueError("inference_memory_mb must be at least 1")
        if self.inference_threads is not None and self.inference_threads < 1:
            raise ValueError("inference_threads must be at least 1")
        if self.inference_dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise ValueError(f"inference dtype {self.inference_dtype!r}: use auto, float32, bfloat16 or float16")
        if self.inference_backend not in INFERENCE_BACKENDS:
            raise ValueError(f"inference backend {self.inference_backend!r}: use {' or '.join(INFERENCE_BACKENDS)}")
        if self.inference_device_kind not in ("auto", "cpu", "cuda", "mps"):
            raise ValueError(f"inference device {self.inference_device!r}: use auto, cpu, cuda, cuda:N or mps")
        if self.devices is not None and len(self.devices) != self.slots:
            raise ValueError(f"{len(self.devices)} devices given for {self.slots} slots; give one per slot")

    @property
    def worker_python(self) -> str:
        """The Python that has torch and runs posttrain's processes (workers, the inference worker): the
        worker command's own when that is posttrain's worker, else this one. The Llama Stack provider runs
        in an environment without torch and points ``worker_command`` at posttrain's."""
        command = self.worker_command
        return command[0] if command[1:] == default_worker_command()[1:] else sys.executable

    @property
    def inference_device_kind(self) -> str:
        """The worker's --device: ``cuda:1`` is ``cuda`` with only GPU 1 visible (inference_environment)."""
        return self.inference_device.partition(":")[0]

    @property
    def inference_environment(self) -> dict[str, str]:
        env = {}
        kind, _, index = self.inference_device.partition(":")
        if kind == "cuda" and index:
            env["CUDA_VISIBLE_DEVICES"] = index
        if self.inference_threads:
            env["OMP_NUM_THREADS"] = str(self.inference_threads)
        return env

    @property
    def processes_per_job(self) -> int:
        if self.max_processes_per_job is not None:
            return self.max_processes_per_job
        return max(os.cpu_count() or 1, gpu_count())

    @property
    def jobs_dir(self) -> Path:
        return self.data_dir / "jobs"

    @property
    def files_dir(self) -> Path:
        return self.data_dir / "files"

    @property
    def starts_workers_warm(self) -> bool:
        """Warm start forks posttrain's own worker from a template run by the worker command's Python; any
        other worker command (a wrapper, a test's fake worker) starts cold."""
        command = self.worker_command
        return self.warm_workers and len(command) == 3 and command[1:] == default_worker_command()[1:]

    @property
    def keyed(self) -> bool:
        """A shared server: clients are told apart by key, and what they may make it do is restricted."""
        return bool(self.api_keys)

    @property
    def restricts_local_paths(self) -> bool:
        return self.keyed

    @property
    def runs_user_code(self) -> bool:
        return self.allow_user_code or not self.keyed

    @property
    def database_url(self) -> str:
        return normalize_db_url(self.db_url) if self.db_url else f"sqlite:///{self.data_dir / 'posttrain.db'}"


def gpu_count() -> int:
    """NVIDIA GPUs the driver lists, without importing torch into the API process (0 without the driver)."""
    gpus = Path("/proc/driver/nvidia/gpus")
    return len(list(gpus.iterdir())) if gpus.is_dir() else 0


def normalize_db_url(url: str) -> str:
    """Accept plain ``postgresql://`` URLs and use the psycopg (v3) driver for them."""
    for prefix in ("postgresql://", "postgres://"):
        if url.startswith(prefix):
            return "postgresql+psycopg://" + url[len(prefix):]
    return url
