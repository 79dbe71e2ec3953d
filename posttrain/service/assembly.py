"""The parts of a job service, built in one place: the data dir's lock, the store, the launchers and the
scheduler over them, and the inference backend that serves the trained models. ``posttrain serve`` (the
FastAPI app) and the Llama Stack inline providers (the same service without HTTP) both open a
:class:`ServiceCore`."""

from __future__ import annotations

import fcntl
import os
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from posttrain.launchers import Launcher
from posttrain.launchers.kfp import KFPLauncher
from posttrain.launchers.local import LocalLauncher
from posttrain.launchers.routing import RoutingLauncher
from posttrain.launchers.torchrun import TorchrunLauncher
from posttrain.launchers.warm import WarmLauncher
from posttrain.service.inference_worker import InferenceBackend, InferenceWorker
from posttrain.service.scheduler import Scheduler
from posttrain.service.settings import ServiceSettings
from posttrain.service.store import JobStore


def lock_data_dir(data_dir: Path) -> IO[str]:
    """Hold an exclusive lock on the data dir for the server's lifetime: two servers recovering the same
    jobs could each start a worker for one job. (Workers do not inherit it: Popen closes other fds.)"""
    handle = open(data_dir / "server.lock", "a+")  # noqa: SIM115 - held until shutdown
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        owner = handle.read().strip() or "unknown"
        handle.close()
        raise RuntimeError(f"another posttrain server (pid {owner}) is using data dir {data_dir}") from None
    handle.seek(0)
    handle.truncate()
    handle.write(f"{os.getpid()}\n")
    handle.flush()
    return handle


def local_launcher(settings: ServiceSettings) -> Launcher:
    """Workers on this machine: forked from a warm template when the settings allow it, else cold."""
    if settings.starts_workers_warm:
        return WarmLauncher(settings.worker_command, settings.data_dir / "warm-template.log")
    return LocalLauncher(settings.worker_command)


def service_launcher(settings: ServiceSettings) -> RoutingLauncher:
    """Every launcher the job service runs jobs with, by ``distributed.launcher`` value."""
    # torchrun starts `python -m posttrain.worker` itself: with the workers' Python when that is the command.
    python = settings.worker_python
    launchers: dict[str, Launcher] = {"local": local_launcher(settings), "torchrun": TorchrunLauncher(python),
                                      "kfp": KFPLauncher(python)}
    return RoutingLauncher(launchers)


def inference_backend(settings: ServiceSettings) -> InferenceBackend:
    """What generates for the OpenAI inference routes: posttrain's inference worker, or vLLM on a GPU."""
    if settings.inference_backend == "vllm":
        from posttrain.service.vllm_backend import VllmBackend

        return VllmBackend(settings)
    return InferenceWorker(settings)


@dataclass
class ServiceCore:
    """What runs jobs and serves their models for a service: opened with :meth:`open`, scheduling from
    :meth:`start` to :meth:`close` (running workers outlive it; the next core on the same data dir re-adopts
    them). The inference backend starts its process on the first request and stops it on :meth:`close`;
    whoever awaits its requests also awaits its ``aclose()`` first, on the same event loop."""

    settings: ServiceSettings
    store: JobStore
    launcher: Launcher
    scheduler: Scheduler
    lock: IO[str]
    inference: InferenceBackend

    @classmethod
    def open(cls, settings: ServiceSettings, launcher: Launcher | None = None,
             extra_dirs: tuple[Path, ...] = ()) -> ServiceCore:
        for folder in (settings.jobs_dir, settings.files_dir, *extra_dirs):
            folder.mkdir(parents=True, exist_ok=True)
        lock = lock_data_dir(settings.data_dir)
        try:
            store = JobStore(settings.database_url)
            launcher = launcher or service_launcher(settings)  # by each job's distributed.launcher
        except BaseException:
            lock.close()
            raise
        return cls(settings, store, launcher, Scheduler(store, launcher, settings), lock, inference_backend(settings))

    def start(self) -> None:
        self.scheduler.start()  # re-adopts the workers of jobs that ran while no server was up

    def close(self) -> None:
        self.inference.close()
        self.scheduler.stop()
        self.launcher.close()
        self.store.close()
        self.lock.close()
