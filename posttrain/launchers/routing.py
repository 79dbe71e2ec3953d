"""The service's launcher: each job goes to the launcher its spec names in ``distributed.launcher``.

``local`` jobs start as before (warm or cold, :mod:`posttrain.launchers.warm`), ``torchrun`` jobs through
:class:`~posttrain.launchers.torchrun.TorchrunLauncher`, ``kfp`` jobs as a Kubeflow pipeline run by kfp.local
(:class:`~posttrain.launchers.kfp.KFPLauncher`). A launcher missing from the mapping the service builds
(:func:`posttrain.service.assembly.service_launcher`) makes its jobs fail at start with a message saying so.
Re-adoption after a server restart asks the same launcher that started the job.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from posttrain.job.directory import JobDir
from posttrain.launchers import Launcher, LaunchRequest, WorkerHandle

DEFAULT_LAUNCHER = "local"


class LauncherUnavailable(OSError):
    """A job names a launcher this server does not have (an OSError: the scheduler fails the job with it)."""


def launcher_name(job_dir: Path) -> str:
    """``distributed.launcher`` of the spec in ``job_dir`` (the service wrote and validated it at submit)."""
    try:
        spec = JobDir(job_dir).read_spec_dict()
    except (OSError, ValueError):
        return DEFAULT_LAUNCHER  # unreadable: the local worker reports the problem in the job's status
    distributed = spec.get("distributed") if isinstance(spec, dict) else None
    name = distributed.get("launcher") if isinstance(distributed, dict) else None
    return name if isinstance(name, str) else DEFAULT_LAUNCHER


class RoutingLauncher(Launcher):
    name = "routing"

    def __init__(self, launchers: dict[str, Launcher]) -> None:
        self.launchers = launchers

    def for_job(self, job_dir: Path) -> Launcher:
        name = launcher_name(job_dir)
        launcher = self.launchers.get(name)
        if launcher is None:
            raise LauncherUnavailable(
                f"distributed.launcher={name} is not available on this server (it has: {', '.join(self.launchers)})")
        return launcher

    def launch(self, request: LaunchRequest) -> WorkerHandle:
        return self.for_job(request.job_dir).launch(request)

    def adopt(self, job_dir: Path, pid: int | None) -> WorkerHandle | None:
        try:
            launcher = self.for_job(job_dir)
        except LauncherUnavailable:
            return None  # nothing of ours can be running it
        return launcher.adopt(job_dir, pid)

    def state(self) -> dict[str, Any]:
        state: dict[str, Any] = {"launchers": sorted(self.launchers)}
        for launcher in self.launchers.values():
            state.update(launcher.state())
        return state

    def close(self) -> None:
        for launcher in self.launchers.values():
            launcher.close()
