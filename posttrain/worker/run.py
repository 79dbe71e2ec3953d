"""One job, start to end: the job directory, logging, signals, status, then the method's own ``run``.

SIGINT/SIGTERM cancel at the next step boundary (a second one stops at once); SIGUSR1 pauses there with a
checkpoint (see :mod:`posttrain.job.signals`). Whatever happens, the last status is written in a
``finally`` block, so the directory always ends in a terminal state (or ``paused``).
"""

from __future__ import annotations

import logging
import os
import time
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from posttrain.errors import PosttrainError
from posttrain.job.context import RunContext
from posttrain.job.directory import JobDir
from posttrain.job.ranks import RankInfo, is_main_process, launcher_pid, record_status
from posttrain.job.result import JobResult
from posttrain.job.resume import check_fresh_job_dir
from posttrain.job.signals import (
    CANCEL_SIGNALS,
    PAUSE_SIGNAL,
    StopRequest,
    install_stop_handlers,
    restore_handlers,
)
from posttrain.job_paths import bind_job_dir
from posttrain.spec import JobSpec, spec_to_json
from posttrain.worker.logs import setup_logging
from posttrain.worker.registry import runner_for

log = logging.getLogger("posttrain.worker")


def run_worker(spec: JobSpec, job_dir: str | Path, resume: bool = False, log_to_file: bool = True,
               extra_callbacks: Sequence[Any] = (), recorded_spec: JobSpec | None = None) -> JobResult:
    """Run one job to its end and record it in ``job_dir``.

    ``extra_callbacks`` are ``transformers.TrainerCallback`` objects added after posttrain's own (TRL methods).
    ``recorded_spec``: what spec.json says when it is not ``spec`` itself (a KFP train step runs the job's
    spec on prepared data).

    Never raises for job failures; raises ConfigError, touching nothing, when ``job_dir`` already
    holds another run and ``resume`` is not set.
    """
    from posttrain.distributed.runtime import leave_process_group, restarted_by_torchrun

    jd = JobDir(job_dir)
    resume = resume or restarted_by_torchrun()  # torchrun's elastic restart continues the run
    if not resume:
        check_fresh_job_dir(jd)
    jd.create()
    setup_logging(jd, log_to_file)
    stop = StopRequest()
    previous_handlers = install_stop_handlers(stop)
    started = time.perf_counter()
    result = JobResult(state="failed", job_dir=jd.root)
    status = jd.read_status()
    attempt = (status.attempt + 1) if status else 1
    try:
        spec = bind_job_dir(spec, jd.root)
        if is_main_process():
            jd.write_spec(spec_to_json(bind_job_dir(recorded_spec, jd.root) if recorded_spec else spec))
        record_status(jd, state="running", pid=launcher_pid(), attempt=attempt, error=None, finished_at=None)
        context = _prepare(spec, jd, resume, stop, result, extra_callbacks)
        result = runner_for(spec.method.name)(context)
    except KeyboardInterrupt as exc:
        result.state, result.cancelled_by = "cancelled", str(exc) or "SIGINT"
    except PosttrainError as exc:
        log.error("%s", exc.message)
        result.state, result.error, result.input_error = "failed", exc.message, True
    except Exception as exc:
        log.error("training failed:\n%s", traceback.format_exc())
        result.state, result.error = "failed", f"{type(exc).__name__}: {exc}"
    finally:
        restore_handlers(previous_handlers, CANCEL_SIGNALS)
        result.runtime_s = time.perf_counter() - started
        # A pause is recorded by the method's run; a failure while pausing is a real failure, not a pause.
        if stop.is_set() and not stop.pausing and result.state != "succeeded":
            result.state, result.cancelled_by = "cancelled", stop.signal_name
        try:
            status = jd.read_status()
            result.step = status.step if status else result.step
            record_status(jd, state=result.state, error=result.error, step=result.step)
        finally:
            # Only now: until the end is recorded, status.json says "running" with this pid, which tells the
            # service it may send a pause, and SIGUSR1's default action would kill the process.
            restore_handlers(previous_handlers, (PAUSE_SIGNAL,))
        # After the restore: a pause arriving later reaches the previous handler (a pipeline's) instead.
        result.pause_pending = result.state == "succeeded" and stop.is_set() and stop.pausing
        leave_process_group()
    return result


def _prepare(spec: JobSpec, jd: JobDir, resume: bool, stop: StopRequest, result: JobResult,
             extra_callbacks: Sequence[Any]) -> RunContext:
    """What every method needs before it starts: checked options (reward modules imported here), device,
    dtype and threads, the process group of a torchrun run, seeds."""
    from transformers import set_seed

    from posttrain.distributed.runtime import init_process_group
    from posttrain.modeling import apply_threads, resolve_placement
    from posttrain.preflight import check_options

    check_options(spec, warnings := [], import_rewards=True)
    for warning in warnings:
        log.warning("%s", warning)
    placement = resolve_placement(spec.model)
    threads = apply_threads(spec.training.num_threads, placement.device)
    rank_info = init_process_group(spec, placement.device) if spec.distributed.launcher == "torchrun" else None
    if rank_info is not None:
        record_node(spec, jd, rank_info)
    os.environ["TENSORBOARD_LOGGING_DIR"] = str(jd.tensorboard_dir)
    set_seed(spec.training.seed)
    log.info("job %s: method=%s model=%s device=%s dtype=%s threads=%d", spec.name or jd.root.name,
             spec.method.name, spec.model.name_or_path, placement.device, str(placement.dtype).removeprefix("torch."),
             threads)
    return RunContext(spec=spec, job_dir=jd, resume=resume, stop=stop, result=result, placement=placement,
                      threads=threads, rank_info=rank_info, extra_callbacks=extra_callbacks)


def record_node(spec: JobSpec, jd: JobDir, rank_info: RankInfo) -> None:
    """On a multi-node run, a node that holds no rank 0 has done its part when its ranks end well; when its
    job directory is its own (not rank 0's on shared storage), its first rank records there which node it
    is and where rank 0 writes the results, and keeps that node's state. Every rank calls this (rank 0
    tells the others where it writes)."""
    import socket

    from posttrain.distributed.runtime import from_rank0

    mine = jd.read_status() if rank_info.rank == 0 else None
    rank0 = from_rank0({"host": socket.gethostname(), "job_dir": str(jd.root.resolve()),
                        "created_at": mine.created_at if mine is not None else None})
    if not rank_info.leads_a_node_without_rank0:
        return
    own = jd.read_status()  # read after rank 0 spoke: it recorded "running" before it joined the group
    if own is not None and own.created_at == rank0["created_at"]:
        return  # rank 0's own status.json: the job directory is shared, rank 0 keeps it
    jd.write_spec(spec_to_json(spec))
    jd.update_status(state="running", pid=launcher_pid(), attempt=(own.attempt if own else 0) + 1, error=None,
                     finished_at=None, node_rank=rank_info.node_rank, rank0_host=rank0["host"],
                     rank0_job_dir=rank0["job_dir"])
    log.info("node %d: rank 0 writes the run's results to %s:%s", rank_info.node_rank, rank0["host"],
             rank0["job_dir"])
