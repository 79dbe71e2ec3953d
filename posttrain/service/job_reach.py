"""What a job may write, fork and connect to on a shared (keyed) server, beyond the files it reads.

submission.py checks the paths a job reads; these are the other ways one key holder could reach past
their own job: a write location (``method.sync_dir`` of online_grpo and of ppo with server rollouts, which
the trainer empties and fills), the number of processes a torchrun job forks, and the hosts a job connects to (the trajectory API, the
inference server, a rendezvous endpoint). A server without keys is one user's own: it checks none of this.
"""

from __future__ import annotations

from pathlib import Path
from urllib.parse import urlsplit

from posttrain.errors import ConfigError, PosttrainError
from posttrain.service.hosts import is_loopback
from posttrain.service.settings import ServiceSettings
from posttrain.spec import JobSpec


class NotAllowedHere(PosttrainError):
    """The job asks for more than this shared server's operator allows (processes, network hosts)."""

    status_code = 403


def uses_weight_sync(spec: JobSpec) -> bool:
    """Whether the job pushes weights to an inference server: online_grpo (unless sync_weights is off) and
    ppo with rollout_backend=server. Only those read method.sync_dir and method.inference_host."""
    method = spec.method
    if method.name == "online_grpo":
        return method.sync_weights
    return method.name == "ppo" and method.rollout_backend == "server"


def check_write_paths(spec: JobSpec, settings: ServiceSettings, own_dir: Path) -> None:
    """On a keyed server a job writes only inside its own directory (the trainer rmtrees sync_dir)."""
    method = spec.method
    if not settings.keyed or not getattr(method, "sync_dir", None):
        return
    path = Path(method.sync_dir).expanduser().resolve()
    if not path.is_relative_to(own_dir.resolve()):
        raise ConfigError(f"{method.sync_dir!r} is outside this job's own directory: on this server a job "
                          "writes only there; remove method.sync_dir (default <job dir>/sync) or give a "
                          "relative folder", "method.sync_dir")


def network_targets(spec: JobSpec) -> dict[str, str]:
    """The hosts a job connects to, by dotted key."""
    targets = {}
    method = spec.method
    if method.name == "online_grpo":
        targets["method.api_url"] = urlsplit(method.api_url).hostname or method.api_url
    if uses_weight_sync(spec):
        targets["method.inference_host"] = method.inference_host
    if spec.distributed.launcher == "torchrun" and spec.distributed.rdzv_endpoint:
        endpoint = spec.distributed.rdzv_endpoint
        targets["distributed.rdzv_endpoint"] = urlsplit(f"//{endpoint}").hostname or endpoint
    return targets


def check_network_targets(spec: JobSpec, settings: ServiceSettings) -> None:
    if not settings.keyed:
        return
    allowed = {host.lower() for host in settings.allowed_network_hosts}
    for key, host in network_targets(spec).items():
        if not is_loopback(host) and host.lower() not in allowed:
            raise NotAllowedHere(f"{key}: host {host!r} is not allowed on this server: a job connects only to "
                                 "loopback hosts unless the server was started with --allow-network-host HOST")


def check_process_count(spec: JobSpec, settings: ServiceSettings) -> None:
    """A torchrun job forks nproc_per_node x nnodes ranks (again on each elastic restart)."""
    distributed = spec.distributed
    if not settings.keyed or distributed.launcher != "torchrun":
        return
    per_node = 1 if distributed.nproc_per_node == "auto" else distributed.nproc_per_node  # auto: the devices
    processes = per_node * distributed.nnodes
    if processes > settings.processes_per_job:
        raise NotAllowedHere(f"distributed.nproc_per_node x distributed.nnodes = {processes} processes; this server "
                             f"allows at most {settings.processes_per_job} per job (--max-processes-per-job)")
    if distributed.max_restarts > settings.max_restarts_per_job:
        raise NotAllowedHere(f"distributed.max_restarts={distributed.max_restarts}; this server allows at most "
                             f"{settings.max_restarts_per_job} (--max-restarts-per-job)")


def check_job_reach(spec: JobSpec, settings: ServiceSettings, own_dir: Path) -> None:
    """Every rule of this module for one job (``own_dir``: the directory it runs in; ``spec`` bound to it by
    posttrain.job_paths.bind_job_dir, so a relative sync_dir already names a folder in it)."""
    check_write_paths(spec, settings, own_dir)
    check_process_count(spec, settings)
    check_network_targets(spec, settings)
