"""torchrun launcher: the same worker module, one process per device, on one node or many.

:func:`torchrun_command` turns the spec's ``distributed`` section into
``python -m torch.distributed.run ... -m posttrain.worker --spec ... --job-dir ...``; the CLI runs it in the
foreground and the service through :class:`TorchrunLauncher`.

Process tree: torch 2.13 starts every rank in a session of its own, so signalling torchrun's process group
never reaches the ranks. :class:`TorchrunWorker` therefore walks the tree (psutil, recursively): a cancel
sends SIGTERM to torchrun (which forwards it to every rank and SIGKILLs them after its shutdown timeout),
a pause sends SIGUSR1 to the ranks themselves (torchrun would treat it as a shutdown), a kill reaches every
process of the tree, and once torchrun has exited whatever is left of the tree is killed.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path

import psutil

from posttrain.errors import ConfigError
from posttrain.job.directory import JobDir
from posttrain.job_paths import bind_job_dir
from posttrain.launchers import Launcher, LaunchRequest, WorkerExit, WorkerHandle
from posttrain.launchers.local import job_environment, worker_arguments
from posttrain.ports import LOOPBACK, free_port
from posttrain.spec import DistributedSpec, JobSpec, spec_from_dict

WORKER_MODULE = "posttrain.worker"
LOCAL_RENDEZVOUS_HOST = LOOPBACK


def visible_gpu_count(env: Mapping[str, str]) -> int:
    """GPUs a run started with ``env`` sees: the entries of CUDA_VISIBLE_DEVICES when the scheduler (or the
    user) set it, else what torch counts here (0 without CUDA)."""
    visible = env.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return len([device for device in visible.split(",") if device.strip() and device.strip() != "-1"])
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def processes_per_node(dist: DistributedSpec, env: Mapping[str, str]) -> int:
    if dist.nproc_per_node != "auto":
        return int(dist.nproc_per_node)
    return max(1, visible_gpu_count(env))


def rendezvous_backend(dist: DistributedSpec) -> str:
    """c10d assigns node ranks at rendezvous and ignores node_rank; a user who pins node ranks on a
    multi-node run gets the static backend, which honours them."""
    if dist.rdzv_backend != "auto":
        return dist.rdzv_backend
    return "static" if dist.nnodes > 1 and "node_rank" in dist.model_fields_set else "c10d"


def check_layout(dist: DistributedSpec) -> None:
    if dist.nnodes > 1 and not dist.rdzv_endpoint:
        raise ConfigError("a multi-node run needs the HOST:PORT every node meets at", "distributed.rdzv_endpoint")
    if dist.rdzv_endpoint:
        host, _, port = dist.rdzv_endpoint.rpartition(":")
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ConfigError(f"{dist.rdzv_endpoint!r} is not HOST:PORT", "distributed.rdzv_endpoint")


def torchrun_command(spec: JobSpec, worker_args: list[str], env: Mapping[str, str] | None = None,
                     python: str = sys.executable, run_id: str = "posttrain") -> list[str]:
    """The torchrun command line that runs ``python -m posttrain.worker *worker_args`` on this node."""
    dist = spec.distributed
    check_layout(dist)
    env = os.environ if env is None else env
    argv = [python, "-m", "torch.distributed.run",
            "--nproc-per-node", str(processes_per_node(dist, env)),
            "--nnodes", str(dist.nnodes),
            "--max-restarts", str(dist.max_restarts)]
    backend = rendezvous_backend(dist)
    if dist.nnodes == 1 and not dist.rdzv_endpoint:
        # One node: a private rendezvous on loopback, on master_port or a port free now.
        port = dist.master_port or free_port()  # the rendezvous binds it a moment later
        argv += ["--rdzv-backend", "static", "--node-rank", "0",
                 "--master-addr", LOCAL_RENDEZVOUS_HOST, "--master-port", str(port)]
    elif backend == "static":
        host, _, port = str(dist.rdzv_endpoint).rpartition(":")
        argv += ["--rdzv-backend", "static", "--node-rank", str(dist.node_rank),
                 "--master-addr", host, "--master-port", port]
    else:
        argv += ["--rdzv-backend", "c10d", "--rdzv-endpoint", str(dist.rdzv_endpoint), "--rdzv-id", run_id]
    return [*argv, "-m", WORKER_MODULE, *worker_args]


def rank_environment(spec: JobSpec, env: Mapping[str, str]) -> dict[str, str]:
    """Threads per rank: one OpenMP thread unless training.num_threads says otherwise (two ranks with
    torch's default of two threads each were many times slower than one each on a 2-core machine)."""
    threads = spec.training.num_threads or 1
    return {**env, "OMP_NUM_THREADS": str(threads), "PYTHONUNBUFFERED": "1"}


# -- the service's side -------------------------------------------------------------------------------


def _tree(root: psutil.Process) -> list[psutil.Process]:
    try:
        return [root, *root.children(recursive=True)]
    except psutil.Error:
        return []


def _signal_processes(processes: list[psutil.Process], sig: int) -> None:
    for process in processes:
        with contextlib.suppress(psutil.Error):
            process.send_signal(sig)


class TorchrunWorker(WorkerHandle):
    """torchrun (the agent) and its ranks. Started here (exit code known) or re-adopted after a server
    restart (``process`` only, exit code unknown). psutil identifies a process by pid and start time, so
    a pid reused later is never signalled."""

    def __init__(self, process: psutil.Process, popen: subprocess.Popen[bytes] | None = None) -> None:
        self.agent = process
        self.popen = popen
        self.pid = process.pid
        self._known: dict[int, psutil.Process] = {}
        self._stopping = False  # torchrun got its SIGTERM/SIGINT

    def _alive(self) -> bool:
        if self.popen is not None:
            return self.popen.poll() is None
        try:
            return self.agent.is_running() and self.agent.status() != psutil.STATUS_ZOMBIE
        except psutil.Error:
            return False

    def _processes(self) -> list[psutil.Process]:
        """The agent and every descendant seen so far (ranks stay known after their parent exits)."""
        for process in _tree(self.agent):
            self._known.setdefault(process.pid, process)
        alive = []
        for pid, process in list(self._known.items()):
            try:
                if process.is_running():
                    alive.append(process)
                    continue
            except psutil.Error:
                pass
            del self._known[pid]
        return alive

    def ranks(self) -> list[psutil.Process]:
        return [process for process in self._processes() if process.pid != self.pid]

    def poll(self) -> WorkerExit | None:
        self._processes()  # remember the ranks while the agent can still name them
        if self._alive():
            return None
        _signal_processes(self._processes(), signal.SIGKILL)  # nothing of the job outlives torchrun
        return WorkerExit(self.popen.wait() if self.popen is not None else None)

    def signal(self, sig: int) -> None:
        if not self._alive():
            return
        if sig == signal.SIGKILL:
            _signal_processes(self._processes(), sig)
        elif not self._stopping:
            # torchrun forwards SIGTERM/SIGINT to every rank's session and kills them after its timeout. It
            # acts on the first only: a second would cut that shutdown short, so a repeat (the scheduler's,
            # while rank 0 has not acknowledged the cancel yet) is not sent on.
            _signal_processes([self.agent], sig)
            self._stopping = sig in (signal.SIGTERM, signal.SIGINT)

    def signal_main(self, sig: int) -> None:
        """A pause: SIGUSR1 to the ranks (they agree on the step to stop at); torchrun would die of it."""
        if self._alive():
            _signal_processes(self.ranks(), sig)


def _job_spec(job_dir: Path) -> JobSpec:
    return spec_from_dict(JobDir(job_dir).read_spec_dict())


class TorchrunLauncher(Launcher):
    name = "torchrun"

    def __init__(self, python: str = sys.executable) -> None:
        self.python = python

    def launch(self, request: LaunchRequest) -> WorkerHandle:
        job_dir = JobDir(request.job_dir)
        env = job_environment(request)
        spec = _job_spec(job_dir.root)
        argv = torchrun_command(spec, worker_arguments(request), env, self.python, run_id=request.job_id)
        with open(job_dir.log_path, "ab") as log:
            popen = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                     env=rank_environment(spec, env), cwd=job_dir.root, start_new_session=True)
        return TorchrunWorker(psutil.Process(popen.pid), popen)

    def adopt(self, job_dir: Path, pid: int | None) -> WorkerHandle | None:
        """torchrun of ``job_dir`` left by an earlier server: the recorded pid, or any torchrun whose
        worker arguments name the job directory (never one of its ranks)."""
        job_dir = job_dir.resolve()
        candidates = []
        if pid is not None:
            with contextlib.suppress(psutil.Error):
                candidates.append(psutil.Process(pid))
        candidates += list(psutil.process_iter())
        for process in candidates:
            if _is_agent_of(process, job_dir):
                return TorchrunWorker(process)
        return None


def _is_agent_of(process: psutil.Process, job_dir: Path) -> bool:
    try:
        cmdline = process.cmdline()
        if process.status() == psutil.STATUS_ZOMBIE:
            return False
    except psutil.Error:
        return False
    if "torch.distributed.run" not in cmdline or "--job-dir" not in cmdline:
        return False
    index = cmdline.index("--job-dir")
    return index + 1 < len(cmdline) and Path(cmdline[index + 1]).resolve() == job_dir


# -- the CLI's side -----------------------------------------------------------------------------------


def run_torchrun(spec: JobSpec, job_dir: Path, resume: bool = False):
    """Run ``spec`` under torchrun in the foreground (``posttrain train ... distributed.launcher=torchrun``) and
    return the worker's result as rank 0 recorded it in ``job_dir``. SIGINT/SIGTERM are passed on to torchrun,
    which passes them to every rank: they stop after the same step, as a single worker does."""
    import json
    import tempfile
    import time

    from posttrain.job.result import JobResult
    from posttrain.job.resume import check_fresh_job_dir
    from posttrain.spec import spec_to_json

    jd = JobDir(job_dir)
    if not resume:
        check_fresh_job_dir(jd)
    jd.create()
    spec = bind_job_dir(spec, jd.root)
    # The ranks read the spec from a file of this launch (rank 0 writes spec.json as every worker does).
    with tempfile.NamedTemporaryFile("w", suffix=".json", prefix="posttrain-spec-", delete=False) as handle:
        handle.write(spec_to_json(spec))
    worker_args = ["--spec", handle.name, "--job-dir", str(jd.root), *(["--resume"] if resume else [])]
    argv = torchrun_command(spec, worker_args, os.environ, run_id=_run_id(jd.root))
    started = time.perf_counter()
    # Its own session: a Ctrl-C reaches torchrun once, through us, not twice (terminal + forward), which
    # could interrupt its shutdown of the ranks half-way.
    process = subprocess.Popen(argv, env=rank_environment(spec, os.environ), start_new_session=True)
    stopper = _Stopper(process)
    forward = {sig: signal.signal(sig, stopper.handle) for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    try:
        code = process.wait()
    finally:
        for sig, previous in forward.items():
            signal.signal(sig, previous)
        Path(handle.name).unlink(missing_ok=True)
    status = jd.read_status()
    if status is not None and status.node_rank is not None and status.state == "succeeded" and code != 0:
        # This node's first rank ended well, another of its ranks did not: the node failed.
        status = jd.update_status(state="failed", error=f"torchrun exited with code {code}; see the ranks' logs "
                                                        f"in {jd.root}")
    state = status.state if status is not None else "failed"
    result = JobResult(state=state if state != "running" else "failed", job_dir=jd.root,
                       runtime_s=time.perf_counter() - started)
    if status is not None:
        result.step, result.total_steps, result.error = status.step, status.total_steps, status.error
        if status.node_rank is not None:
            result.node_rank, result.rank0_results = status.node_rank, f"{status.rank0_host}:{status.rank0_job_dir}"
    if result.state == "failed" and result.error is None:
        result.error = f"torchrun exited with code {code}; see the ranks' logs in {jd.root}"
    if result.state == "cancelled":
        result.cancelled_by = "SIGTERM"
    losses = [record["loss"] for record in jd.read_metrics() if isinstance(record.get("loss"), float)]
    result.final_loss = losses[-1] if losses else None
    speeds = [record["tokens_per_s"] for record in jd.read_metrics() if "tokens_per_s" in record]
    result.tokens_per_s = speeds[-1] if speeds else None
    result.final_dir = jd.final_dir if result.state == "succeeded" and jd.final_dir.is_dir() else None
    result.metrics = {"torchrun_exit_code": code, "spec": json.loads(spec_to_json(spec))["distributed"]}
    return result


class _Stopper:
    """Signals to the CLI while torchrun runs: the first goes to torchrun (which stops every rank after the
    same step), a second one straight to the ranks (the worker's "stop at once")."""

    def __init__(self, process: subprocess.Popen[bytes]) -> None:
        self.agent = psutil.Process(process.pid)
        self.sent = False

    def handle(self, signum: int, _frame: object) -> None:
        targets = [self.agent] if not self.sent else _tree(self.agent)[1:]
        self.sent = True
        _signal_processes(targets, signum)


def _run_id(job_dir: Path) -> str:
    """The c10d rendezvous id every node of a run must share: the job directory's name."""
    return "".join(char if char.isalnum() or char in "-_" else "-" for char in job_dir.name) or "posttrain"
